#!/usr/bin/env bash
# Install dist_kd (editable) with the real assets; `bash launch/setup.sh dev` adds the test and lint tools.
# On a machine without an NVIDIA GPU, torch is pinned to the CPU wheel: an unpinned torch pulls several GB
# of CUDA packages that a CPU cannot use.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
extras="assets"
[ "${1:-}" = "dev" ] && extras="dev,assets"
if ! python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch (the CPU wheel without an NVIDIA GPU)" >&2
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q torch==2.13.0
  fi
fi
echo "setup: installing dist_kd and its dependencies ($extras; a few minutes on a fresh machine)" >&2
python -m pip install -q -e ".[$extras]"
echo "setup: done" >&2
