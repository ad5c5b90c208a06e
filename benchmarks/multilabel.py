"""Multi-label on real images: 2×2 mosaics of CIFAR-10 photos labelled with the classes they hold,
fine-tuned multi-label (sigmoid per class) against the one-vs-rest linear probe, by test mAP.

Each mosaic is four 32 px photos drawn at random (seeded) from one split, resized to 32 px again
(so a model of the recipe's image size sees it), labelled with the set of their classes (1 to 4 of
10). The train mosaics are made from CIFAR-10's train split, the test mosaics from its test split.

    python benchmarks/multilabel.py --from runs/cifar-cpu        # a pretrain run of the CPU recipe
    python benchmarks/multilabel.py --from RUN --train 500 --test 2000 --epochs 30 --seed 0

`--images FOLDER` reads another class-per-folder tree with `train/` and `test/` (the smoke test).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from label_efficiency import ARCHIVE, commit, device_name, unpack

from labelfew.config import EvaluateConfig, FinetuneConfig
from labelfew.data.labels import read_labels
from labelfew.stages import evaluate, finetune

CACHE = Path(__file__).resolve().parent / ".cache"


def write_mosaics(source: Path, out: Path, count: int, seed: int, side: int = 32) -> Path:
    """`count` mosaics of four images of the class tree `source`, and their `path,labels` CSV."""
    labeled = read_labels(source)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = ["path,labels"]
    half = side // 2
    for index in range(count):
        picks = rng.choice(len(labeled), size=4, replace=False)
        mosaic = Image.new("RGB", (side, side))
        for cell, pick in enumerate(picks):
            tile = (
                Image.open(labeled.paths[pick]).convert("RGB").resize((half, half), Image.Resampling.BICUBIC)
            )
            mosaic.paste(tile, (half * (cell % 2), half * (cell // 2)))
        name = f"mosaic-{index:05d}.png"
        mosaic.save(out / name)
        rows.append(f"{name},{'|'.join(sorted({labeled.labels[pick] for pick in picks}))}")
    (out / "labels.csv").write_text("\n".join(rows) + "\n")
    return out / "labels.csv"


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", type=Path, required=True, help="pretrain run (CPU recipe)")
    parser.add_argument(
        "--images", type=Path, default=None, help="class trees train/ and test/ (default CIFAR-10)"
    )
    parser.add_argument("--train", type=int, default=500, help="train mosaics (the labels)")
    parser.add_argument("--test", type=int, default=2000, help="test mosaics")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=CACHE / "multilabel")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    started, code = time.perf_counter(), commit()
    images = args.images or unpack(ARCHIVE, CACHE)
    work = args.work / f"seed{args.seed}-{args.train}"
    train = write_mosaics(images / "train", work / "train", args.train, seed=args.seed)
    test = write_mosaics(images / "test", work / "test", args.test, seed=10_000 + args.seed)
    out = work / "finetune"
    finetune.run(FinetuneConfig(labels=(train,), source=args.source, epochs=args.epochs, seed=args.seed,
                                out=out, restart=True, quiet=True))  # fmt: skip
    report = evaluate.run(
        EvaluateConfig(test=test, source=out, out=work / "evaluate", seed=args.seed, quiet=True)
    )
    result = {row["method"]: row["mAP"] for row in report["rows"]}
    line = {"train_mosaics": args.train, "test_mosaics": args.test, "seed": args.seed, "mAP": result,
            "macro_f1": {row["method"]: row["macro_f1"] for row in report["rows"]},
            "command": "python benchmarks/multilabel.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": device_name(), "date": time.strftime("%Y-%m-%d"), "commit": code,
            "finetune_seconds": json.loads((out / "run.json").read_text())["wall_seconds"],
            "wall_seconds": time.perf_counter() - started}  # fmt: skip
    print(json.dumps(line))
    if args.images is None:  # a CIFAR-10 run: its record
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"multilabel-{time.strftime('%Y%m%d-%H%M%S')}-seed{args.seed}.json"
        (args.out / name).write_text(json.dumps(line, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
