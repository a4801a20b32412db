"""Preemption and Ctrl-C: the first signal asks for a checkpoint and a stop, a second Ctrl-C aborts."""

from __future__ import annotations

import os
import signal

import pytest

from dist_kd.train.common import StopSignal


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_asks_for_a_checkpoint_and_a_stop(sig):
    before = signal.getsignal(sig)
    stop = StopSignal()
    try:
        assert not stop.requested
        os.kill(os.getpid(), sig)
        assert stop.requested
    finally:
        stop.restore()
    assert signal.getsignal(sig) is before


def test_second_ctrl_c_aborts_but_a_repeated_sigterm_does_not():
    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the cluster repeating itself: still one clean stop
        assert stop.requested
        with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
