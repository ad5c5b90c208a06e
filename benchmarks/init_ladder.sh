#!/usr/bin/env bash
# Which start to use when (issue 24; benchmarks/RESULTS.md "Starting from pretrained weights"):
# generic weights from a labelfew pretraining on all 50,000 CIFAR-10 training images (the CPU
# recipe's settings, 10 epochs), exported with `labelfew export`; then on hymenoptera (245 train /
# 153 val photos, 64 px) and on scikit-learn's digits (10 labels per class, 450 test digits):
# SSL from random init, the transfer baseline (finetune --init), the init + continued SSL at
# 5/15/30 epochs, and scratch, each fine-tuned with the defaults and evaluated.
#   bash benchmarks/init_ladder.sh [WORK]        # ~23 min on 2 idle CPU cores
# CIFAR-10 is unpacked by benchmarks/label_efficiency.py or overlap_fpr.py into benchmarks/.cache.
set -u
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
L=${1:-/tmp/ladder}
mkdir -p "$L"
CIFAR=$REPO/benchmarks/.cache/cifar10_jpg
H=$REPO/../shared/datasets/hymenoptera_data
t() { echo "== $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $*"; /usr/bin/time -f "wall %e s, user %U s, sys %S s" "$@"; }
lf() { python -m labelfew "$@"; }
# generic weights: the CPU recipe's pretraining on all 50,000 CIFAR-10 training images (10 epochs = its 50 on 10,000)
t python -m labelfew pretrain $CIFAR/train --recipe $REPO/recipes/cifar10-cpu.toml --epochs 10 --out $L/cifar --quiet
t python -m labelfew export --from $L/cifar --format safetensors --out $L/cifar-export --quiet
ladder() {  # ladder NAME TRAIN_FOLDER LABELS TEST SIZE EPOCHS...
  local name=$1 train=$2 labels=$3 test=$4 size=$5; shift 5
  local R=$L/$name
  t python -m labelfew pretrain $train --arch test_resnet --image-size $size --no-small-stem --epochs 30 --batch-size 64 --out $R/ssl --quiet
  t python -m labelfew finetune --labels $labels --from $R/ssl --workers 0 --out $R/ssl/finetune --quiet
  t python -m labelfew finetune --labels $labels --init $L/cifar-export --image-size $size --workers 0 --out $R/transfer/finetune --quiet
  for e in "$@"; do
    t python -m labelfew pretrain $train --init $L/cifar-export --image-size $size --epochs $e --batch-size 64 --out $R/init-ssl-$e --quiet
    t python -m labelfew finetune --labels $labels --from $R/init-ssl-$e --workers 0 --out $R/init-ssl-$e/finetune --quiet
  done
  t python -m labelfew finetune --labels $labels --scratch --arch test_resnet --image-size $size --workers 0 --out $R/scratch/finetune --quiet
  for run in ssl transfer scratch $(printf "init-ssl-%s " "$@"); do
    t python -m labelfew evaluate --test $test --from $R/$run --bank $labels --workers 0 --quiet --init $L/cifar-export
  done
}
ladder hymenoptera $H/train $H/train $H/val 64 5 15 30
python - "$L/digits" <<'PY'
from pathlib import Path
from labelfew.demo import write_digits
import sys
write_digits(Path(sys.argv[1]))
PY
D=$L/digits
t python -m labelfew subset $D/train --per-class 10 --seed 0 --out $D/labels-10.csv
ladder digits $D/train $D/labels-10.csv $D/test 32 5 15 30
echo "== done $(date +%T)"
python - "$L" <<'PY'  # top-1 / balanced accuracy of every row of every run
import json, sys
from pathlib import Path
for domain in ("hymenoptera", "digits"):
    print(f"## {domain}")
    for run in ("ssl", "transfer", "init-ssl-5", "init-ssl-15", "init-ssl-30", "scratch"):
        report = json.loads((Path(sys.argv[1]) / domain / run / "evaluate" / "report.json").read_text())
        print(f"{run:12s} | " + " | ".join(
            f"{row['method']}: {100 * row['top1']:.1f}/{100 * row['balanced_accuracy']:.1f}" for row in report["rows"]))
PY
