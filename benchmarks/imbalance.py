"""Imbalanced labels and the best epoch (issue 25): `--class-weights auto` against none, and the
best held-out epoch (`model.safetensors`) against the last (`model-last.safetensors`).

CIFAR-10 labels made long-tailed 1:10 — class c (in class-name order) keeps round(N · 10^(−c/9))
seeded images of its training images (N = `--largest`, 500 → 500 … 50) — fine-tuned from a
pretraining (`--pretrained RUN`, e.g. the CPU recipe's) with the recipe's `[finetune]` settings and
`--val-fraction 0.1` (so both the best and the last epoch are saved), with and without class
weights; scored on the 10,000 test images, where every class has 1,000 images, so top-1 is the
balanced accuracy. `--hymenoptera RUN` adds the best-against-last rows on the 153 hymenoptera val
photos, from RUN's pretraining (e.g. `benchmarks/init_ladder.sh`'s `hymenoptera/ssl`), with the
fine-tuning defaults and `--val-fraction 0.2`.

    python benchmarks/imbalance.py --pretrained benchmarks/.cache/runs/<run> [--hymenoptera RUN]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from label_efficiency import apply_overrides, commit, device_name, unpack
from sklearn.metrics import balanced_accuracy_score

from labelfew.artifacts import load_artifact
from labelfew.config import FinetuneConfig, build_config, load_recipe
from labelfew.data.labels import LabeledImages, read_labels, write_labels
from labelfew.stages import finetune
from labelfew.stages.evaluate import finetuned_logits

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10_jpg" / "cifar10_jpg.tar.gz"
HYMENOPTERA = REPO.parent / "shared" / "datasets" / "hymenoptera_data"


def long_tailed(train: LabeledImages, largest: int, ratio: float, seed: int) -> LabeledImages:
    """Class c of C keeps round(largest · ratio^(−c/(C−1))) of its images, chosen by `seed`."""
    names = train.class_names
    rng = random.Random(seed)
    chosen: list[tuple[Path, str]] = []
    for c, name in enumerate(names):
        paths = sorted(path for path, label in zip(train.paths, train.labels, strict=True) if label == name)
        keep = round(largest * ratio ** (-c / (len(names) - 1)))
        chosen += [(path, name) for path in rng.sample(paths, keep)]
    return LabeledImages(tuple(p for p, _ in chosen), tuple(n for _, n in chosen), train.root)


def scores(model: Path, test: LabeledImages, classes: list[str]) -> dict[str, float]:
    logits, labels = finetuned_logits(load_artifact(model), test, classes)
    predicted = logits.argmax(dim=1).numpy()
    return {"top1": float(np.mean(predicted == labels.numpy())),
            "balanced": float(balanced_accuracy_score(labels.numpy(), predicted))}  # fmt: skip


def best_and_last(out: Path, test: LabeledImages, classes: list[str]) -> dict[str, Any]:
    run = json.loads((out / "run.json").read_text())
    return {"best": scores(out / "model.safetensors", test, classes),
            "last": scores(out / "model-last.safetensors", test, classes),
            "best_epoch": run["best"]["epoch"], "epochs": run["best"]["epochs_trained"],
            "seconds": run["wall_seconds"]}  # fmt: skip


def cifar(args: argparse.Namespace, recipe: dict[str, Any], work: Path) -> dict[str, Any]:
    data = unpack(ARCHIVE, args.cache)
    train, test = read_labels(data / "train"), read_labels(data / "test")
    classes = train.class_names
    rows: dict[str, list[dict[str, Any]]] = {"none": [], "auto": []}
    for seed in args.seeds:
        labels = long_tailed(train, args.largest, args.ratio, seed)
        csv = work / f"labels-lt{args.ratio:g}-seed{seed}.csv"
        write_labels(labels, csv)
        for weights in rows:
            out = work / f"finetune-{weights}-seed{seed}"
            finetune.run(build_config(FinetuneConfig, recipe, labels=csv, source=args.pretrained, seed=seed, out=out,
                                      val_fraction=0.1, class_weights=weights, quiet=args.quiet))  # fmt: skip
            rows[weights].append(best_and_last(out, test, classes))
            print(f"cifar seed {seed} class weights {weights}: {rows[weights][-1]}", flush=True)
    return {"labels": len(labels), "counts": labels.counts(), "rows": rows}


def hymenoptera(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    train, val = read_labels(HYMENOPTERA / "train"), read_labels(HYMENOPTERA / "val")
    rows = []
    for seed in args.seeds:
        out = work / f"hymenoptera-seed{seed}"
        finetune.run(build_config(FinetuneConfig, {}, labels=HYMENOPTERA / "train", source=args.hymenoptera,
                                  seed=seed, out=out, val_fraction=0.2, workers=0, quiet=args.quiet))  # fmt: skip
        rows.append(best_and_last(out, val, train.class_names))
        print(f"hymenoptera seed {seed}: {rows[-1]}", flush=True)
    return {"rows": rows}


def _mean(values: list[float]) -> str:
    spread = f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{100 * statistics.fmean(values):.1f}{spread}"


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Device: {result['device']}; commit {result['commit']}; {result['date']}; "
             f"{result['wall_seconds'] / 60:.1f} min. Command: `{result['command']}`", "",
             "| labels | class weights | best epoch (balanced acc. %) | last epoch | best epoch chosen (of) |",
             "| --- | --- | ---: | ---: | --- |"]  # fmt: skip
    for weights, rows in result["cifar"]["rows"].items():
        lines.append(f"| CIFAR-10 1:{result['ratio']:g} ({result['cifar']['labels']}) | {weights} | "
                     f"{_mean([r['best']['balanced'] for r in rows])} | {_mean([r['last']['balanced'] for r in rows])} | "
                     + ", ".join(f"{r['best_epoch']} ({r['epochs']})" for r in rows) + " |")  # fmt: skip
    if result.get("hymenoptera"):
        rows = result["hymenoptera"]["rows"]
        lines.append(f"| hymenoptera val (balanced acc.) | none | {_mean([r['best']['balanced'] for r in rows])} | "
                     f"{_mean([r['last']['balanced'] for r in rows])} | "
                     + ", ".join(f"{r['best_epoch']} ({r['epochs']})" for r in rows) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", type=Path, required=True, help="a run folder with a pretrain stage")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "cifar10-cpu.toml")
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--largest", type=int, default=500, help="labels of the largest class")
    parser.add_argument("--ratio", type=float, default=10.0, help="largest / smallest class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hymenoptera", type=Path, help="a run folder with a pretrain stage on hymenoptera")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    started, code = time.perf_counter(), commit()
    recipe = apply_overrides(load_recipe(args.recipe), args.override)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = args.cache / "runs" / f"imbalance-{stamp}"
    result: dict[str, Any] = {"command": "python benchmarks/imbalance.py " + " ".join(sys.argv[1:]),
                              "device": device_name(), "date": time.strftime("%Y-%m-%d"), "commit": code,
                              "ratio": args.ratio, "cifar": cifar(args, recipe, work)}  # fmt: skip
    if args.hymenoptera:
        result["hymenoptera"] = hymenoptera(args, work)
    result["wall_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"imbalance-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"imbalance-{stamp}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
