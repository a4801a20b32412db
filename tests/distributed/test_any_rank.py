"""The stop check's agreement: any rank's flag reaches every rank (2 gloo ranks)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.distributed


def test_any_rank_is_the_or_of_every_rank(ranks, tmp_path):
    ranks("any_rank.py", str(tmp_path))
    expected = {"none": False, "only_last_rank": True, "only_rank_0": True, "all": True}
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected
