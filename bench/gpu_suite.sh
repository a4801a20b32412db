#!/usr/bin/env bash
# The GPU suite (bench/gpu_suite.py) on a CUDA machine, in one command:
#
#   bash bench/gpu_suite.sh OUTPUT_DIR
#
#   bash bench/gpu_suite.sh OUTPUT_DIR --smoke    # the same install and code paths on a CPU (a dry run)
#
# Installs the wheels carried in .whl/ (made by `bash bench/gpu_wheels.sh` where pip can download): deepspeed,
# webdataset, datasets, textbrewer and what they need, which CUDA images lack. When .whl/text holds the BBC
# News articles and all-MiniLM-L6-v2's tokenizer (gpu_wheels.sh copies them), the suite adds the real-text rows.
# Then runs the suite; everything lands in OUTPUT_DIR (gpu_suite.json, gpu_suite.md, suite.log), the two
# reports rewritten after every row. Further arguments go to bench/gpu_suite.py.
set -euo pipefail
out=${1:?usage: bash bench/gpu_suite.sh OUTPUT_DIR [gpu_suite.py arguments]}
out=$(realpath -m "$out")  # where it was given: a relative one landed under the repository
shift
cd "$(dirname "$0")/.."
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "gpu_suite: installing the carried wheels" >&2
  site=${GPU_SUITE_SITE:-/tmp/site}
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! error=$(python3 -c "import deepspeed, webdataset" 2>&1); then
  echo "$error" | tail -n 5 >&2
  echo "gpu_suite: deepspeed or webdataset does not import (above); carry their wheels and what they need in" \
    ".whl/ (bash bench/gpu_wheels.sh)" >&2
  exit 2
fi
text=()
if [[ -d .whl/text/bbc && -d .whl/text/tokenizer ]]; then
  text=(--text .whl/text/bbc --text-tokenizer .whl/text/tokenizer)
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 bench/gpu_suite.py --output "$out" ${text[@]+"${text[@]}"} "$@" 2>&1 | tee "$out/suite.log"
