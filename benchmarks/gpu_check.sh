#!/usr/bin/env bash
# The GPU figures in one script (issue 14): ends within its budget (default 570 s) on one H100/H200.
#
#   bash benchmarks/gpu_prep.sh                              # here, once: wheels + CIFAR-10 archive
#   bash benchmarks/gpu_check.sh                             # on the device machine (see RESULTS.md)
#   OUT=$(mktemp -d) bash benchmarks/gpu_check.sh --smoke    # here, on the CPU: every step, tiny sizes
#
# Steps, each under its own `timeout`; a step that fails or times out is recorded and the next
# one runs; after every step OUT/gpu_check.json and OUT/gpu_check.md are rewritten, so that even a
# run cut short leaves its results. OUT also gets gpu_check.log and raw.tar.gz (every step's own
# JSON and log). Each step's limit keeps back the time the later steps need, so the whole script
# ends inside --budget. Run order (the tables list the steps in the issue's order):
#   0. setup: lightly wheels into /tmp/site, pip install --no-deps -e ., unpack CIFAR-10
#   1. benchmarks/throughput.py, bf16: resnet18 @ 32, batch 512, rows labelfew, lightly, bare on
#      the 50,000 CIFAR-10 training JPEGs; resnet50 @ 224, batch 256, rows labelfew (device path),
#      lightly, bare, cpu-path (the PIL worker path), stream (workers decode) and stream-device (nvJPEG
#      decode on the GPU, `--decode-on device`) on 1,024 synthetic 500x375 JPEG photos
#   2. benchmarks/sync_check.py: host syncs per step of pretrain's loop (sync debug mode "warn"),
#      2 epochs of 11 steps
#   3. labelfew pretrain on the 50,000 CIFAR-10 training images (recipes/cifar10-resnet18.toml),
#      epochs sized to --pretrain-seconds (default 300, less when less is left) from the rates of
#      steps 1 and 2; benchmarks/knn_check.py: kNN, k=200, T=0.1, all training labels as the
#      bank, on the 10,000 test images
#   4. labelfew pretrain --sync-bn forced on one GPU: one epoch of the 10,000 test images (19 steps)
#   1b. resnet18 @ 32 again with --compile, in the time left (compiling takes minutes, so it comes
#      after the pretraining run rather than shortening it)
#   3c. labelfew evaluate (kNN + linear probe) in the time left
#
# Options: --smoke (CPU, test_resnet, a few hundred images, 1 epoch: ~1 min on 2 idle cores, budget
# 900 s), --budget SECONDS,
# --pretrain-seconds SECONDS, --skip-compile, --keep (keep the work folder). PYTHON=... picks the
# interpreter (default: python3; with --smoke, .venv/bin/python when there is one).
set -uo pipefail # no -e: a failing step is recorded and the script goes on

SMOKE=0 BUDGET="" PRETRAIN_SECONDS="" SKIP_COMPILE=0 KEEP=0
while (($#)); do
  case $1 in
    --smoke) SMOKE=1 ;;
    --budget) BUDGET=$2 && shift ;;
    --pretrain-seconds) PRETRAIN_SECONDS=$2 && shift ;;
    --skip-compile) SKIP_COMPILE=1 ;;
    --keep) KEEP=1 ;;
    -h | --help) sed -n '2,/^set /p' "$0" | sed 's/^# \{0,1\}//;$d' && exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2 && exit 2 ;;
  esac
  shift
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
STARTED=$(date +%s)
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=${OUT:-$REPO/benchmarks/.cache/gpu-check-$STAMP}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$WORK/logs"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

if ((SMOKE)); then
  MODE=smoke
  PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo "$REPO/.venv/bin/python" || echo python3)}
  BUDGET=${BUDGET:-900} PRETRAIN_SECONDS=${PRETRAIN_SECONDS:-20} MIN_STEP=10 # a bound: ~1 min on idle cores
  R18=(--arch test_resnet --image-size 32 --batch-size 32 --steps 2 --warmup 1 --repeats 1 --limit 256)
  R18_COMPILE_ROWS=bare # compiling on 2 CPU cores takes a minute per model
  R50=(--arch test_resnet --image-size 96 --batch-size 16 --steps 1 --warmup 1 --repeats 1 --synthetic-count 48)
  SYNC=(--arch test_resnet --batch-size 32 --steps-per-epoch 5 --epochs 2)
  TRAIN=(--arch test_resnet --batch-size 64) MAX_EPOCHS=1
  SYNCBN=(--arch test_resnet --batch-size 32)
  # seconds kept back for the steps after step 1, step 2, pretraining, kNN
  RESERVE_AFTER_T1=60 RESERVE_AFTER_SYNC=50 RESERVE_AFTER_PRETRAIN=30 RESERVE_AFTER_KNN=20
  COMPILE_LIMIT=45 COMPILE_LIGHTLY_FROM=0 PRETRAIN_MARGIN=10
else
  MODE=gpu
  PY=${PYTHON:-python3}
  BUDGET=${BUDGET:-570} PRETRAIN_SECONDS=${PRETRAIN_SECONDS:-300} MIN_STEP=20
  R18=(--arch resnet18 --image-size 32 --batch-size 512 --precision bf16 --steps 20 --warmup 5 --repeats 3)
  R18_COMPILE_ROWS=labelfew,bare,lightly # lightly last: its batch-N passes make dynamo recompile
  R50=(--arch resnet50 --image-size 224 --batch-size 256 --precision bf16 --steps 10 --warmup 3 --repeats 3
    --synthetic-count 1024)
  SYNC=(--batch-size 512 --steps-per-epoch 11 --epochs 2)
  TRAIN=() MAX_EPOCHS=800
  SYNCBN=(--batch-size 512)
  # step 2 ~35 s, pretraining at least 180 s (+ 30 s margin), kNN ~45 s, --sync-bn ~30 s, report ~10 s
  RESERVE_AFTER_T1=330 RESERVE_AFTER_SYNC=295 RESERVE_AFTER_PRETRAIN=110 RESERVE_AFTER_KNN=45
  COMPILE_LIMIT=150 COMPILE_LIGHTLY_FROM=120 PRETRAIN_MARGIN=45
fi
DEADLINE=$((STARTED + BUDGET))
REPORT=("$PY" "$REPO/benchmarks/gpu_check_report.py")
RECIPE=recipes/cifar10-resnet18.toml

left() { echo $((DEADLINE - $(date +%s))); }

since() { awk -v start="$1" -v now="$(date +%s.%N)" 'BEGIN { printf "%.2f", now - start }'; }

# limit NOMINAL RESERVE: the seconds a step may take, keeping RESERVE for the steps after it
limit() {
  local available=$(($(left) - $2))
  echo $((available < $1 ? available : $1))
}

record() { "${REPORT[@]}" record --work "$WORK" --name "$@"; }

report() {
  "${REPORT[@]}" report --work "$WORK" --out "$OUT" --mode "$MODE" --budget "$BUDGET" --started "$STARTED" "$@"
}

# run_step NAME LIMIT COMMAND...: runs COMMAND under `timeout LIMIT`, its output also in
# WORK/logs/NAME.log; records the outcome and rewrites the report; returns the command's status.
run_step() {
  local name=$1 seconds=$2 rc start
  shift 2
  if ((seconds < MIN_STEP)); then
    echo "=== $name: not run, ${seconds} s left for it (budget ${BUDGET} s)"
    record "$name" --status "not run" --detail "not run: no time left in the ${BUDGET} s budget" --command-line "$*"
    report --quiet
    return 99
  fi
  echo
  echo "=== $name (limit ${seconds} s, $(left) s left): $*"
  start=$(date +%s.%N)
  timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$WORK/logs/$name.log"
  rc=${PIPESTATUS[0]}
  record "$name" --rc "$rc" --limit "$seconds" --seconds "$(since "$start")" \
    --detail "$(grep -v '^\s*$' "$WORK/logs/$name.log" | tail -n 3)" --command-line "$*"
  report --quiet
  return "$rc"
}

skip() { # skip NAME WHY
  echo "=== $1: not run: $2"
  record "$1" --status "not run" --detail "not run: $2"
}

finish() {
  trap - EXIT INT TERM
  report
  (cd "$WORK" && find . \( -path ./cifar10_jpg -o -path ./site -o -path '*/checkpoints' \) -prune -o -type f \
    \( -name '*.json' -o -name '*.jsonl' -o -name '*.log' \) -print |
    tar -czf "$OUT/raw.tar.gz" -T - 2>/dev/null)
  echo "gpu_check ($MODE) done in $(($(date +%s) - STARTED)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
  ((KEEP)) && echo "work folder kept: $WORK" || rm -rf "$WORK"
  sleep 0.5 # lets the tee into gpu_check.log write the last lines
}
trap finish EXIT
trap 'echo "gpu_check: interrupted"; exit 130' INT TERM

echo "gpu_check ($MODE): budget ${BUDGET} s, python $PY, out $OUT, work $WORK"

# ---------------------------------------------------------------- 0. setup
setup() {
  local site=/tmp/site
  ((SMOKE)) && site=$WORK/site
  if compgen -G "benchmarks/.cache/gpu_check/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      benchmarks/.cache/gpu_check/wheels/*.whl || echo "setup: installing the wheels failed"
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "setup: no wheels in benchmarks/.cache/gpu_check/wheels (run bash benchmarks/gpu_prep.sh here first)"
  fi
  if ((SMOKE)); then
    echo "setup: --smoke: pip install -e . skipped (the venv has labelfew)"
  else
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e . ||
      echo "setup: pip install -e . failed; labelfew comes from PYTHONPATH"
  fi
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" - "$WORK/env.json" <<'PYTHON' || return 2
import json, os, platform, sys
import torch
import labelfew
cuda = torch.cuda.is_available()
env = {
    "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
    "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
    "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
    "labelfew": labelfew.__file__,
}
open(sys.argv[1], "w").write(json.dumps(env) + "\n")
print("setup:", env)
PYTHON
  if ((!SMOKE)) && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "setup: $PY sees no CUDA GPU; on a CPU run with --smoke"
    return 5
  fi
  local archive=benchmarks/.cache/gpu_check/cifar10_jpg.tar.gz
  [[ -f $archive ]] || archive=../shared/datasets/cifar10_jpg/cifar10_jpg.tar.gz
  if [[ ! -f $archive ]]; then
    echo "setup: no CIFAR-10 archive (benchmarks/.cache/gpu_check/cifar10_jpg.tar.gz: run benchmarks/gpu_prep.sh)"
    return 3
  fi
  if ((SMOKE)); then # 40 training and 20 test images per class
    tar -xzf "$archive" -C "$WORK" --wildcards 'cifar10_jpg/train/*/00[0-3]?.jpg' 'cifar10_jpg/test/*/00[01]?.jpg'
  else
    tar -xzf "$archive" -C "$WORK"
  fi || return 4
  echo "setup: $(find "$WORK/cifar10_jpg/train" -type f | wc -l) training and $(find "$WORK/cifar10_jpg/test" -type f | wc -l) test images"
}
echo "=== setup"
SETUP_START=$(date +%s.%N)
setup 2>&1 | tee "$WORK/logs/setup.log"
SETUP_RC=${PIPESTATUS[0]}
# the exports in setup ran in the pipeline's subshell: repeat them here
((SMOKE)) && SITE=$WORK/site || SITE=/tmp/site
[[ -d $SITE ]] && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
if ((SETUP_RC == 2 || SETUP_RC == 5)); then # labelfew does not import, or no GPU: nothing else can run
  record setup --rc "$SETUP_RC" --detail "$(tail -n 3 "$WORK/logs/setup.log")" --command-line setup
  exit 1
fi
record setup --rc "$SETUP_RC" --seconds "$(since "$SETUP_START")" \
  --detail "$(tail -n 3 "$WORK/logs/setup.log")" --command-line "setup (wheels, pip install -e ., tar -xzf)"
HAVE_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
CIFAR=$WORK/cifar10_jpg
HAVE_DATA=0
[[ -d $CIFAR/train && -d $CIFAR/test ]] && HAVE_DATA=1
TRAIN_IMAGES=$( ((HAVE_DATA)) && find "$CIFAR/train" -type f | wc -l || echo 0)

LIGHTLY_ROWS=lightly
run_step lightly 60 "$PY" -c "import lightly; from lightly.data import LightlyDataset; from lightly.loss import NTXentLoss; from lightly.transforms import SimCLRTransform; from lightly.utils.lars import LARS; print('lightly', lightly.__version__, 'from', lightly.__file__)" ||
  LIGHTLY_ROWS=""
ROWS_R18=labelfew${LIGHTLY_ROWS:+,$LIGHTLY_ROWS},bare
ROWS_R50=labelfew${LIGHTLY_ROWS:+,$LIGHTLY_ROWS},bare,cpu-path,stream,stream-device

# ---------------------------------------------------------------- 1. throughput
if ((HAVE_DATA)); then
  R18_DATA=(--data "$CIFAR/train")
else
  R18_DATA=(--synthetic-count 8192)
  echo "step 1: no CIFAR-10 images, resnet18 rows on synthetic 32 px JPEGs"
fi
run_step t1a "$(limit 120 "$RESERVE_AFTER_T1")" "$PY" benchmarks/throughput.py "${R18[@]}" "${R18_DATA[@]}" \
  --rows "$ROWS_R18" --out "$WORK/t1a"
T1A_RC=$?
if ((T1A_RC != 0 && T1A_RC != 99)) && [[ -n $LIGHTLY_ROWS ]] && grep -qE "/lightly/|row_lightly" "$WORK/logs/t1a.log"; then
  # lightly imports but its row broke the run: record why, and measure the other rows without it
  record lightly --status "failed in throughput.py" --detail "$(grep -v '^\s*$' "$WORK/logs/t1a.log" | tail -n 2)"
  LIGHTLY_ROWS="" ROWS_R18=labelfew,bare ROWS_R50=labelfew,bare,cpu-path,stream,stream-device
  run_step t1a "$(limit 120 "$RESERVE_AFTER_T1")" "$PY" benchmarks/throughput.py "${R18[@]}" "${R18_DATA[@]}" \
    --rows "$ROWS_R18" --skip-data-only --out "$WORK/t1a"
fi
run_step t1c "$(limit 180 "$RESERVE_AFTER_T1")" "$PY" benchmarks/throughput.py "${R50[@]}" \
  --rows "$ROWS_R50" --skip-data-only --out "$WORK/t1c"

# ---------------------------------------------------------------- 2. host syncs
if ((HAVE_DATA)); then
  run_step sync "$(limit 75 "$RESERVE_AFTER_SYNC")" "$PY" benchmarks/sync_check.py --data "$CIFAR/train" \
    --recipe "$RECIPE" "${SYNC[@]}" --out "$WORK/sync.json"
else
  skip sync "no CIFAR-10 images"
fi

# ---------------------------------------------------------------- 3. time to accuracy
BATCH=$("$PY" -c "import sys, tomllib; print(tomllib.load(open(sys.argv[1], 'rb'))['pretrain']['batch_size'])" "$RECIPE")
[[ " ${TRAIN[*]} " == *" --batch-size "* ]] && BATCH=${TRAIN[-1]}
if ((HAVE_DATA)); then
  AVAILABLE=$(($(left) - RESERVE_AFTER_PRETRAIN))
  TARGET=$((AVAILABLE - PRETRAIN_MARGIN < PRETRAIN_SECONDS ? AVAILABLE - PRETRAIN_MARGIN : PRETRAIN_SECONDS))
  if ((TARGET < MIN_STEP)); then
    skip pretrain "no time left in the ${BUDGET} s budget"
  else
    read -r EPOCHS WARMUP < <("${REPORT[@]}" epochs --work "$WORK" --images "$TRAIN_IMAGES" --batch-size "$BATCH" \
      --target-seconds "$TARGET" --max-epochs "$MAX_EPOCHS")
  fi
  if ((TARGET >= MIN_STEP)) && [[ -z ${EPOCHS:-} ]]; then
    record sizing --rc 1 --detail "sizing the run failed (gpu_check_report.py epochs)"
    skip pretrain "sizing the run failed"
  elif ((TARGET >= MIN_STEP)); then
    record sizing --rc 0 --detail "$EPOCHS epochs, warmup $WARMUP, for a $TARGET s target"
    echo "step 3: $EPOCHS epochs (warmup $WARMUP) for a ${TARGET} s target; $(cat "$WORK/sizing.json")"
    run_step pretrain "$AVAILABLE" "$PY" -m labelfew pretrain "$CIFAR/train" --recipe "$RECIPE" "${TRAIN[@]}" \
      --epochs "$EPOCHS" --warmup-epochs "$WARMUP" --out "$WORK/runs/cifar10" --quiet
  fi
  if [[ -f $WORK/runs/cifar10/pretrain/backbone.safetensors ]]; then
    run_step knn "$(limit 90 "$RESERVE_AFTER_KNN")" "$PY" benchmarks/knn_check.py --from "$WORK/runs/cifar10" \
      --bank "$CIFAR/train" --test "$CIFAR/test" --knn-k 200 --knn-temperature 0.1 --out "$WORK/knn.json"
  else
    skip knn "no pretrain artifact"
  fi
else
  skip pretrain "no CIFAR-10 images"
  skip knn "no CIFAR-10 images"
fi

# ---------------------------------------------------------------- 4. --sync-bn on one GPU
if ((HAVE_DATA)); then
  if ((!HAVE_CUDA)); then # on the CPU (--smoke), --sync-bn must be refused with exit 2 and a one-line reason
    run_step syncbn "$(limit 40 5)" bash -c '"$@"; rc=$?; if ((rc == 2)); then echo "expected on the CPU: --sync-bn refused with exit 2"; exit 0; fi; echo "unexpected exit $rc (the CPU must refuse --sync-bn with exit 2)"; exit 1' _ \
      "$PY" -m labelfew pretrain "$CIFAR/test" --recipe "$RECIPE" "${SYNCBN[@]}" --sync-bn --epochs 1 \
      --warmup-epochs 0 --out "$WORK/runs/syncbn" --quiet
  else
    run_step syncbn "$(limit 60 5)" "$PY" -m labelfew pretrain "$CIFAR/test" --recipe "$RECIPE" "${SYNCBN[@]}" \
      --sync-bn --epochs 1 --warmup-epochs 0 --out "$WORK/runs/syncbn" --quiet
  fi
else
  skip syncbn "no CIFAR-10 images"
fi

# ---------------------------------------------------------------- 1b. --compile rows, if time is left
# Last but for 3c: compiling takes minutes, and the pretraining run of step 3 comes first.
if ((SKIP_COMPILE)); then
  skip t1b "--skip-compile"
else
  COMPILE_SECONDS=$(limit "$COMPILE_LIMIT" 5)
  # lightly's row compiles a second graph (two passes of N images): only when there is time for it
  if [[ -z $LIGHTLY_ROWS ]] || ((COMPILE_SECONDS < COMPILE_LIGHTLY_FROM)); then
    R18_COMPILE_ROWS=${R18_COMPILE_ROWS/,lightly/}
  fi
  run_step t1b "$COMPILE_SECONDS" "$PY" benchmarks/throughput.py "${R18[@]}" "${R18_DATA[@]}" \
    --rows "$R18_COMPILE_ROWS" --compile --skip-data-only --out "$WORK/t1b"
fi

# ---------------------------------------------------------------- 3c. full evaluate, if time is left
if [[ -f $WORK/runs/cifar10/pretrain/backbone.safetensors ]]; then
  run_step evaluate "$(limit 300 5)" "$PY" -m labelfew evaluate --test "$CIFAR/test" --from "$WORK/runs/cifar10" \
    --bank "$CIFAR/train" --knn-k 200 --knn-temperature 0.1 --quiet
else
  skip evaluate "no pretrain artifact"
fi
exit 0
