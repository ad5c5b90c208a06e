#!/usr/bin/env bash
# `pretrain --init`'s defaults (issue 24; benchmarks/RESULTS.md "Starting from pretrained weights"):
# continued SimCLR pretraining from the ladder's generic CIFAR-10 weights (benchmarks/init_ladder.sh
# writes them to WORK/cifar-export) on hymenoptera and on scikit-learn's digits, at 5 and 15 epochs,
# with the random-init lr and warmup or a gentler start (a quarter of the lr; no warmup), three
# seeds each, every model fine-tuned with the defaults and evaluated as the ladder does.
#   bash benchmarks/init_defaults.sh [WORK]    # after init_ladder.sh WORK; ~20 min on 2 idle cores
set -u
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
L=${1:-/tmp/ladder}
H=$REPO/../shared/datasets/hymenoptera_data
D=$L/digits
[ -f "$L/cifar-export/model.safetensors" ] || { echo "$L/cifar-export: run benchmarks/init_ladder.sh $L first" >&2; exit 2; }

t() { echo "== $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $*"; /usr/bin/time -f "wall %e s, user %U s, sys %S s" "$@"; }
# variant: NAME EPOCHS EXTRA-PRETRAIN-FLAGS (base lr: the sqrt rule's 0.075, a quarter of it 0.01875)
VARIANTS=("e5 5" "e5-lr0.25 5 --base-lr 0.01875" "e5-warmup0 5 --warmup-epochs 0" "e15-lr0.25 15 --base-lr 0.01875")
run() {  # run DOMAIN TRAIN LABELS TEST SIZE SEED
  local domain=$1 train=$2 labels=$3 test=$4 size=$5 seed=$6
  for variant in "${VARIANTS[@]}"; do
    set -- $variant
    local name=$1 epochs=$2; shift 2
    local R=$L/defaults/$domain/$name-seed$seed
    t python -m labelfew pretrain "$train" --init "$L/cifar-export" --image-size "$size" --epochs "$epochs" --batch-size 64 --seed "$seed" "$@" --out "$R" --quiet
    t python -m labelfew finetune --labels "$labels" --from "$R" --seed "$seed" --workers 0 --out "$R/finetune" --quiet
    t python -m labelfew evaluate --test "$test" --from "$R" --bank "$labels" --workers 0 --quiet
  done
}
if [ ! -d "$D/train" ]; then
  python - "$D" <<'PY'
import sys
from pathlib import Path
from labelfew.demo import write_digits
write_digits(Path(sys.argv[1]))
PY
fi
for seed in 0 1 2; do
  t python -m labelfew subset "$D/train" --per-class 10 --seed "$seed" --out "$D/labels-10-seed$seed.csv"
  run digits "$D/train" "$D/labels-10-seed$seed.csv" "$D/test" 32 "$seed"
  run hymenoptera "$H/train" "$H/train" "$H/val" 64 "$seed"
done
echo "== done $(date +%T)"
python - "$L/defaults" <<'PY'  # fine-tuned top-1 / balanced accuracy per variant, mean over seeds
import json, statistics, sys
from pathlib import Path
root = Path(sys.argv[1])
for domain in ("hymenoptera", "digits"):
    print(f"## {domain}")
    runs = sorted((root / domain).glob("*-seed*"))
    for name in sorted({run.name.rsplit("-seed", 1)[0] for run in runs}):
        top1, balanced = [], []
        for run in sorted((root / domain).glob(f"{name}-seed*")):
            rows = json.loads((run / "evaluate" / "report.json").read_text())["rows"]
            row = next(row for row in rows if row["method"].startswith("fine-tuned"))
            top1.append(100 * row["top1"]), balanced.append(100 * row["balanced_accuracy"])
        print(f"{name:16s} top-1 {' / '.join(f'{v:.1f}' for v in top1)} -> {statistics.mean(top1):.1f}"
              f" | balanced {statistics.mean(balanced):.1f}")
PY
