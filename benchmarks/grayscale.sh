#!/usr/bin/env bash
# Grayscale images end to end (issue 26; benchmarks/RESULTS.md "Grayscale and 12-bit images"):
# hymenoptera (245 train / 153 val photos) turned into 12-bit grayscale — the luma of each photo in
# floating point scaled to 0-4095 and saved as a 16-bit PNG, as a monochrome industrial camera or an
# X-ray export writes it — against the path every image took before: the same luma in 8 bits copied
# into three RGB channels. Each arm pretrains (64 px, test_resnet, 30 epochs, batch 64, as the
# hymenoptera rows of RESULTS.md), fine-tunes with the defaults and evaluates, seeds 0-2; the
# pretraining's wall and CPU time come from /usr/bin/time.
#   bash benchmarks/grayscale.sh [WORK]                  # ~15 min on 2 idle CPU cores
#   PHASES=pretrain bash benchmarks/grayscale.sh [WORK]  # the pretrainings alone, timed (~4 min)
set -u
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
W=${1:-/tmp/grayscale}
H=$REPO/../shared/datasets/hymenoptera_data
mkdir -p "$W"
python - "$H" "$W" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
source, work = Path(sys.argv[1]), Path(sys.argv[2])
for path in sorted(source.glob("*/*/*.jpg")):
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    luma = rgb @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, Pillow's "L" before rounding
    relative = path.relative_to(source).with_suffix(".png")
    for arm, image in (
        ("gray12", Image.fromarray(np.round(luma * 4095 / 255).astype(np.uint16))),  # 16-bit PNG, values 0-4095
        ("rgb8", Image.fromarray(np.round(luma).astype(np.uint8)).convert("RGB")),  # 8 bits in 3 channels
    ):
        target = work / arm / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)
PY
t() { echo "== $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $*"; /usr/bin/time -f "wall %e s, user %U s, sys %S s" "$@"; }
# Phase 1 (PHASES=pretrain runs only this: the CPU times want idle cores): every pretraining back to
# back, timed; phase 2: fine-tune and evaluate each.
for seed in 0 1 2; do
  for arm in gray12 rgb8; do
    channels=$([ $arm = gray12 ] && echo auto || echo 3)
    t python -m labelfew pretrain $W/$arm/train --channels $channels --arch test_resnet --image-size 64 --no-small-stem --epochs 30 --batch-size 64 --seed $seed --workers 0 --out $W/runs/$arm-$seed --restart --quiet
  done
done
if [ "${PHASES:-all}" = all ]; then
  for seed in 0 1 2; do
    for arm in gray12 rgb8; do
      R=$W/runs/$arm-$seed
      t python -m labelfew finetune --labels $W/$arm/train --from $R --seed $seed --workers 0 --quiet
      t python -m labelfew evaluate --test $W/$arm/val --from $R --bank $W/$arm/train --workers 0 --quiet
    done
  done
fi
echo "== done $(date +%T)"
python - "$W" <<'PY'  # top-1 of every row, per arm and seed, and what the pretraining was fed
import json, sys
from pathlib import Path
for run in sorted((Path(sys.argv[1]) / "runs").iterdir()):
    fed = json.loads((run / "pretrain" / "run.json").read_text())
    report = run / "evaluate" / "report.json"
    rows = json.loads(report.read_text())["rows"] if report.is_file() else []
    print(f"{run.name:10s} channels {fed['input']['channels']} window {fed['input']['window']} "
          f"final loss {fed['metrics']['final_loss']:.4f} | "
          + " | ".join(f"{row['method']}: {100 * row['top1']:.1f}" for row in rows))
PY
