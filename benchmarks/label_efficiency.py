"""Label efficiency on real CIFAR-10: SimCLR + few labels against the same labels from scratch.

Unpacks ../shared/datasets/cifar10_jpg once into a cache folder, pretrains on (a part of) the
training images without their labels, then for every label fraction and seed: a class-balanced
subset, fine-tuning from the pretrained backbone and from scratch, and evaluation on the 10,000
test images — kNN with the subset as bank, kNN with all training labels as bank (the standard
representation metric), a linear probe on the subset, and both fine-tuned models — and the rows
that use the unlabeled pool a second time (`--semi`): the fine-tuned SSL model distilled into
the same arch (`labelfew distill`, the recipe's `[distill]`), and FixMatch from the SSL backbone
and from scratch (`finetune --method fixmatch`, the recipe's `[benchmark.fixmatch]` finetune
settings), each with its extra training time. Writes a markdown table (mean ± std over seeds)
and JSON into benchmarks/results/.

    python benchmarks/label_efficiency.py --recipe recipes/cifar10-cpu.toml
    python benchmarks/label_efficiency.py --recipe recipes/cifar10-resnet18.toml   # one GPU

Recipe `[benchmark]` keys: unlabeled_images, fractions, seeds, finetune_epochs ({fraction: epochs}),
semi (rows of SEMI, default all), and the `[benchmark.fixmatch]` table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

from labelfew.artifacts import load_artifact
from labelfew.config import (
    DistillConfig,
    EvaluateConfig,
    FinetuneConfig,
    PretrainConfig,
    build_config,
    load_recipe,
)
from labelfew.data.labels import LabeledImages, read_labels, write_labels
from labelfew.data.subsets import balanced_subset
from labelfew.report.tables import metrics_row
from labelfew.stages import distill, finetune, pretrain
from labelfew.stages.evaluate import backbone_features, finetuned_logits, knn_scores, linear_probe_scores

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10_jpg" / "cifar10_jpg.tar.gz"
METHODS = (
    "kNN (subset bank)",
    "kNN (all train labels)",
    "linear probe",
    "fine-tuned (SSL)",
    "fine-tuned (scratch)",
)
SEMI = {
    "distill": "distilled (SSL)",
    "fixmatch": "FixMatch (SSL)",
    "fixmatch-scratch": "FixMatch (scratch)",
    "linear": "linear (frozen)",
}
"""The `--semi` rows: the unlabeled pool used a second time, after the same pretraining and labels."""


def unpack(archive: Path, cache: Path) -> Path:
    """Unpacks the CIFAR-10 JPEG archive into `cache` once; returns the `cifar10_jpg` folder."""
    root = cache / "cifar10_jpg"
    marker = cache / ".cifar10_jpg.complete"
    if marker.is_file():
        return root
    if not archive.is_file():
        raise SystemExit(f"{archive}: not found; the CIFAR-10 JPEG archive lies in ../shared/datasets")
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    marker.write_text("ok\n")
    return root


def unlabeled_pool(train: LabeledImages, count: int, cache: Path) -> Path:
    """A folder of symlinks to `count` class-balanced training images (labels not used by pretraining)."""
    folder = cache / f"unlabeled-{count}"
    marker = folder / ".complete"
    if marker.is_file():
        return folder
    per_class = count // len(train.class_names)
    chosen = balanced_subset(train, per_class=per_class, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(chosen.paths):
        link = folder / f"{index:05d}{path.suffix}"
        if not link.exists():
            link.symlink_to(path.resolve())
    marker.write_text("ok\n")
    return folder


def pool_by_class(pool: Path, train: LabeledImages) -> Path:
    """The pool's images again as `<class>/<name>` links, for the distill and FixMatch rows: they
    read the classes only to log the pseudo-labels' accuracy (`labelfew.data.labels.folder_labels`)."""
    folder = pool.parent / f"{pool.name}-by-class"
    marker = folder / ".complete"
    if marker.is_file():
        return folder
    label_of = {path.resolve(): label for path, label in zip(train.paths, train.labels, strict=True)}
    for link in sorted(pool.iterdir()):
        if link.name.startswith("."):
            continue
        target = folder / label_of[link.resolve()] / link.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(link.resolve())
    marker.write_text("ok\n")
    return folder


def apply_overrides(recipe: dict[str, dict[str, Any]], overrides: list[str]) -> dict[str, dict[str, Any]]:
    """The recipe with ``SECTION.KEY=VALUE`` settings replaced (VALUE in TOML syntax), for sweeps."""
    changed = copy.deepcopy(recipe)
    for item in overrides:
        name, _, text = item.partition("=")
        *tables, key = name.split(".")
        if not (tables and all(tables) and key and text):
            raise SystemExit(f"--override {item}: use SECTION.KEY=VALUE, e.g. pretrain.temperature=0.2")
        try:
            value = tomllib.loads(f"value = {text}")["value"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare word such as workers: a string
        table: dict[str, Any] = changed
        for part in tables:  # benchmark.fixmatch.threshold: a nested table
            table = table.setdefault(part, {})
        table[key] = value
    return changed


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} × {torch.cuda.device_count()}"
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()  # fmt: skip
    return f"CPU ({model}), {len(os.sched_getaffinity(0))} cores"


def commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    return (
        result.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
        if result.returncode == 0
        else "unknown"
    )


def top1(method: str, scores: Any, labels: Any, class_names: list[str]) -> float:
    return float(metrics_row(method, scores, labels, class_names, {})["top1"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    code = commit()  # the code this run started with, whatever the tree holds when it ends
    recipe = apply_overrides(load_recipe(args.recipe), args.override)
    bench = {**recipe.get("benchmark", {}), **{key: value for key, value in vars(args).items()
                                                  if key in ("unlabeled_images", "fractions", "seeds") and value is not None}}  # fmt: skip
    cifar = unpack(ARCHIVE, args.cache)
    train, test = read_labels(cifar / "train"), read_labels(cifar / "test")
    if args.test_images:
        test = balanced_subset(test, per_class=args.test_images // 10, seed=0)
    classes = train.class_names
    pool = unlabeled_pool(train, int(bench.get("unlabeled_images", len(train))), args.cache)
    run_folder = args.cache / "runs" / f"{args.recipe.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = {"epochs": args.pretrain_epochs} if args.pretrain_epochs else {}
    pretrain_config = build_config(
        PretrainConfig, recipe, data=pool, out=run_folder, quiet=args.quiet, follow_links=True, **overrides
    )  # the pool is a folder of links to the training images
    pretrain_started = time.perf_counter()
    if args.pretrained:  # the label part only, on the backbone of an earlier run
        backbone = args.pretrained / "pretrain" / "backbone.safetensors"
        if not backbone.is_file():
            raise SystemExit(f"--pretrained {args.pretrained}: no pretrain/backbone.safetensors in it")
        (run_folder / "pretrain").mkdir(parents=True)
        for name in ("backbone.safetensors", "head.safetensors", "run.json"):
            (run_folder / "pretrain" / name).symlink_to((args.pretrained / "pretrain" / name).resolve())
    artifact = load_artifact(
        run_folder / "pretrain" / "backbone.safetensors"
        if args.pretrained
        else pretrain.run(pretrain_config),
        "pretrain",
    )
    pretrain_seconds = time.perf_counter() - pretrain_started
    train_x, train_y = backbone_features(artifact, train, classes)
    test_x, test_y = backbone_features(artifact, test, classes)
    knn_options = {  # the recipe's [evaluate] k and T (the CIFAR recipes: 200 and 0.1)
        "k": int(recipe.get("evaluate", {}).get("knn_k", EvaluateConfig.knn_k)),
        "temperature": float(
            recipe.get("evaluate", {}).get("knn_temperature", EvaluateConfig.knn_temperature)
        ),
    }
    knn_all = top1("kNN", knn_scores(train_x, train_y, test_x, len(classes), **knn_options).numpy(),
                   test_y.numpy(), classes)  # fmt: skip
    position = {path: index for index, path in enumerate(train.paths)}
    epochs = {str(key): value for key, value in bench.get("finetune_epochs", {}).items()}
    semi = list(args.semi if args.semi is not None else bench.get("semi", list(SEMI)))
    unknown = sorted(set(semi) - set(SEMI))
    if unknown:
        raise SystemExit(f"--semi {' '.join(unknown)}: choose from {', '.join(SEMI)}")
    results: dict[str, dict[str, list[float]]] = {}
    times: dict[str, dict[str, list[list[float]]]] = {}  # fraction -> method -> [wall s, CPU s] per seed
    for fraction in bench.get("fractions", [0.01, 0.1]):
        cell = results.setdefault(
            str(fraction), {method: [] for method in (*METHODS, *(SEMI[name] for name in semi))}
        )
        clock = times.setdefault(str(fraction), {})
        for seed in bench.get("seeds", [0]):
            subset = balanced_subset(train, fraction=fraction, seed=seed)
            labels_csv = run_folder / f"labels-{fraction}-seed{seed}.csv"
            write_labels(subset, labels_csv)
            rows = [position[path] for path in subset.paths]
            knn = knn_scores(train_x[rows], train_y[rows], test_x, len(classes), **knn_options).numpy()
            probe, _ = linear_probe_scores(
                train_x[rows].numpy(), train_y[rows].numpy(), test_x.numpy(), len(classes), seed=seed
            )
            cell["kNN (subset bank)"].append(top1("kNN", knn, test_y.numpy(), classes))
            cell["kNN (all train labels)"].append(knn_all)
            cell["linear probe"].append(top1("probe", probe, test_y.numpy(), classes))
            trained = {"fine-tuned (SSL)": "supervised", "fine-tuned (scratch)": "supervised-scratch",
                       **{SEMI[name]: name for name in semi}}  # fmt: skip
            for method, name in trained.items():
                unlabeled = pool if name.startswith("supervised") else pool_by_class(pool, train)
                wall, cpu = time.perf_counter(), time.process_time()
                artifact = train_model(
                    name, recipe, labels_csv, run_folder, unlabeled, fraction, seed, epochs, args.quiet
                )
                clock.setdefault(method, []).append([time.perf_counter() - wall, time.process_time() - cpu])
                logits, labels = finetuned_logits(load_artifact(artifact), test, classes)
                cell[method].append(top1(method, logits.numpy(), labels.numpy(), classes))
            print(
                f"fraction {fraction} seed {seed}: "
                + ", ".join(f"{m} {100 * v[-1]:.1f}" for m, v in cell.items()),
                flush=True,
            )
    return {
        "recipe": str(
            args.recipe.resolve().relative_to(REPO)
            if args.recipe.resolve().is_relative_to(REPO)
            else args.recipe
        ),
        "command": "python benchmarks/label_efficiency.py " + " ".join(sys.argv[1:]),
        "device": device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": code,
        "wall_seconds": time.perf_counter() - started,
        "pretrain_seconds": pretrain_seconds,
        "pretrained": str(args.pretrained) if args.pretrained else None,
        "pretrain_config": json.loads((run_folder / "pretrain" / "run.json").read_text())["config"],
        "finetune_settings": recipe.get("finetune", {}),
        "overrides": args.override,
        "unlabeled_images": int(bench.get("unlabeled_images", len(train))),
        "test_images": len(test),
        "results": results,
        "seconds": times,
        "semi_settings": {
            "distill": recipe.get("distill", {}),
            "fixmatch": recipe.get("benchmark", {}).get("fixmatch", {}),
        },
        "torch": torch.__version__,
    }


def train_model(name: str, recipe: dict[str, dict[str, Any]], labels_csv: Path, run_folder: Path, pool: Path,
                fraction: float, seed: int, epochs: dict[str, int], quiet: bool) -> Path:  # fmt: skip
    """Trains one model of a cell and returns its artifact: supervised fine-tuning from the SSL
    backbone or from scratch (`[finetune]`, the fraction's epochs), the SSL model distilled on the
    pool (`[distill]`), FixMatch on the labels + pool (`[benchmark.fixmatch]` as `[finetune]`), or a
    linear head on the frozen SSL backbone (`finetune --method linear`'s own defaults)."""
    teacher = run_folder / f"finetune-{fraction}-seed{seed}"
    if (
        name == "linear"
    ):  # `finetune --method linear` with its own defaults (lr grid, 60 epochs), not [finetune]'s
        return finetune.run(build_config(FinetuneConfig, {}, labels=labels_csv, source=run_folder, method="linear",
                                         seed=seed, quiet=quiet, out=run_folder / f"linear-{fraction}-seed{seed}"))  # fmt: skip
    if name == "distill":
        return distill.run(build_config(DistillConfig, recipe, unlabeled=pool, source=teacher, seed=seed, follow_links=True,
                                        out=run_folder / f"distill-{fraction}-seed{seed}", quiet=quiet))  # fmt: skip
    scratch = name.endswith("scratch")
    if name.startswith("fixmatch"):
        fixmatch = {**recipe, "finetune": dict(recipe.get("benchmark", {}).get("fixmatch", {}))}
        return finetune.run(build_config(FinetuneConfig, fixmatch, labels=labels_csv, source=run_folder, method="fixmatch",
                                         unlabeled=pool, follow_links=True, scratch=scratch, seed=seed, quiet=quiet,
                                         out=run_folder / f"{name}-{fraction}-seed{seed}"))  # fmt: skip
    out = teacher if not scratch else run_folder / f"finetune-scratch-{fraction}-seed{seed}"
    config = build_config(FinetuneConfig, recipe, labels=labels_csv, source=run_folder, scratch=scratch, seed=seed,
                          out=out, quiet=quiet, **({"epochs": epochs[str(fraction)]} if str(fraction) in epochs else {}))  # fmt: skip
    return finetune.run(config)


def _cell(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def markdown(result: dict[str, Any]) -> str:
    fractions = list(result["results"])
    seeds = len(next(iter(result["results"].values()))["fine-tuned (SSL)"])
    lines = [
        f"### {Path(result['recipe']).name} — {result['date']}",
        "",
        f"Device: {result['device']}; commit {result['commit']}; torch {result['torch']}; "
        f"wall time {result['wall_seconds'] / 60:.1f} min ("
        + (
            f"pretraining reused from {result['pretrained']}"
            if result.get("pretrained")
            else f"pretraining {result['pretrain_seconds'] / 60:.1f} min"
        )
        + "); "
        f"{result['unlabeled_images']} unlabeled images, {result['test_images']} test images, "
        f"top-1 % on the test set, mean ± std over {seeds} seed(s) of the label subset.",
        f"Command: `{result['command']}`",
        "",
        "| method | " + " | ".join(f"{100 * float(f):g}% labels" for f in fractions) + " |",
        "| --- | " + " | ".join("---:" for _ in fractions) + " |",
    ]
    methods = [
        method
        for method in next(iter(result["results"].values()))
        if method in METHODS or method in SEMI.values()
    ]
    for method in methods:
        lines.append(
            f"| {method} | " + " | ".join(_cell(result["results"][f][method]) for f in fractions) + " |"
        )
    margins = [ssl - scratch for f in fractions for ssl, scratch in
               zip(result["results"][f]["fine-tuned (SSL)"], result["results"][f]["fine-tuned (scratch)"], strict=True)]  # fmt: skip
    lines += [
        "",
        f"SSL − scratch (fine-tuned top-1), per fraction and seed: {', '.join(f'{100 * m:+.1f}' for m in margins)} points.",
    ]
    semi = [method for method in methods if method in SEMI.values()]
    if semi and result.get("seconds"):
        lines += ["", "| training time per model, min (wall / CPU, mean over seeds) | "
                  + " | ".join(f"{100 * float(f):g}% labels" for f in fractions) + " |",
                  "| --- | " + " | ".join("---:" for _ in fractions) + " |"]  # fmt: skip
        for method in ("fine-tuned (SSL)", *semi):
            cells = [result["seconds"][f][method] for f in fractions]
            lines.append(f"| {method} | " + " | ".join(
                f"{statistics.fmean(w for w, _ in c) / 60:.1f} / {statistics.fmean(u for _, u in c) / 60:.1f}" for c in cells) + " |")  # fmt: skip
        for f in fractions:
            best = [max(values) for values in zip(*(result["results"][f][m] for m in semi), strict=True)]
            gains = [b - ssl for b, ssl in zip(best, result["results"][f]["fine-tuned (SSL)"], strict=True)]
            lines.append(f"\nBest of {', '.join(semi)} − fine-tuned (SSL) at {100 * float(f):g}% labels, per seed: "
                         + ", ".join(f"{100 * g:+.1f}" for g in gains) + " points.")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "cifar10-cpu.toml")
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--unlabeled-images", type=int, help="override the recipe's [benchmark] value")
    parser.add_argument("--fractions", type=float, nargs="+", help="override the recipe's label fractions")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the recipe's subset seeds")
    parser.add_argument("--pretrain-epochs", type=int, help="override the recipe's pretraining epochs")
    parser.add_argument("--test-images", type=int, help="evaluate on a class-balanced part of the test set")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="change one recipe setting, e.g. finetune.lr=0.1 (repeatable; recorded in the command)",
    )
    parser.add_argument(
        "--pretrained",
        type=Path,
        metavar="RUN",
        help="skip pretraining: use RUN/pretrain/backbone.safetensors (a run folder under --cache/runs)",
    )
    parser.add_argument(
        "--semi",
        nargs="*",
        choices=list(SEMI),
        help="the rows that use the unlabeled pool again, and linear: `finetune --method linear` on the SSL "
        "backbone (default: the recipe's [benchmark] semi, else all); --semi alone: none",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"label_efficiency-{args.recipe.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
