"""Which images to label on CIFAR-10: `labelfew select` (TypiClust) against random choice.

Pretrains as `label_efficiency.py` does (or reuses its pretraining, `--pretrained RUN`) on the
unlabeled pool, then for every budget and seed chooses that many pool images three ways —
`select --strategy typical`, uniform random (what a user without labels gets) and class-balanced
random (for reference: it needs the labels it is meant to find) — and simulates the annotator by
looking up each chosen image's true label. Measures on the test images: kNN with the chosen
images as bank, a linear probe on them, the model fine-tuned on them, and how many classes the
choice covers. A second round starts from the typical choice of `--round-from` images, fine-tunes,
and adds as many more by `select --strategy mixed` or at random.

    python benchmarks/selection.py --recipe recipes/cifar10-cpu.toml
    python benchmarks/selection.py --pretrained benchmarks/.cache/runs/<run>   # the label part only
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from label_efficiency import apply_overrides, commit, device_name, top1, unlabeled_pool, unpack

from labelfew.artifacts import load_artifact
from labelfew.config import FinetuneConfig, PretrainConfig, SelectConfig, build_config, load_recipe
from labelfew.data.images import find_images
from labelfew.data.labels import LabeledImages, read_labels, write_labels
from labelfew.data.subsets import balanced_subset
from labelfew.stages import finetune, pretrain
from labelfew.stages import select as select_stage
from labelfew.stages.evaluate import backbone_features, finetuned_logits, knn_scores, linear_probe_scores

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10_jpg" / "cifar10_jpg.tar.gz"
METHODS = ("typical (select)", "random", "class-balanced random")
MEASURES = ("classes", "kNN", "linear probe", "fine-tuned")


class Experiment:
    """The pool with its hidden labels, its features, the test set, and how to fine-tune."""

    def __init__(
        self, args: argparse.Namespace, recipe: dict[str, Any], run_folder: Path, pool: Path
    ) -> None:
        cifar = unpack(ARCHIVE, args.cache)
        train, self.test = read_labels(cifar / "train"), read_labels(cifar / "test")
        if args.test_images:
            self.test = balanced_subset(self.test, per_class=args.test_images // 10, seed=0)
        truth = {path.resolve(): label for path, label in zip(train.paths, train.labels, strict=True)}
        self.pool_paths = [
            Path(os.path.normpath(path.absolute())) for path in find_images(pool, follow_links=True)
        ]
        self.pool = LabeledImages(
            tuple(self.pool_paths), tuple(truth[path.resolve()] for path in self.pool_paths), pool.absolute()
        )
        self.classes = train.class_names
        self.args, self.recipe, self.run_folder = args, recipe, run_folder
        self.artifact = load_artifact(run_folder / "pretrain" / "backbone.safetensors", "pretrain")
        self.pool_x, self.pool_y = backbone_features(self.artifact, self.pool, self.classes)
        self.test_x, self.test_y = backbone_features(self.artifact, self.test, self.classes)
        self.row = {path: index for index, path in enumerate(self.pool_paths)}

    def labelled(self, paths: list[Path]) -> LabeledImages:
        """The annotator: the true label of every chosen image."""
        return LabeledImages(
            tuple(paths), tuple(self.pool.labels[self.row[path]] for path in paths), self.pool.root
        )

    def select(self, tag: str, budget: int, seed: int, **settings: Any) -> list[Path]:
        """`labelfew select` as a user runs it; the chosen pool paths, in its order."""
        out = self.run_folder / f"select-{tag}" / "to-label.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        config = SelectConfig(folder=self.pool.root, budget=budget, out=out, seed=seed, quiet=self.args.quiet,
                              follow_links=True,  # the pool is a folder of links
                              source=settings.pop("source", self.run_folder), **settings)  # fmt: skip
        select_stage.run(config)
        with out.open(newline="", encoding="utf-8") as handle:
            return [
                Path(os.path.normpath(out.parent.absolute() / row["path"])) for row in csv.DictReader(handle)
            ]

    def finetune(self, tag: str, chosen: LabeledImages, seed: int) -> tuple[float, Path]:
        """Fine-tunes the pretrained backbone on `chosen`; (test top-1, the model file)."""
        labels_csv = self.run_folder / f"labels-{tag}.csv"
        write_labels(chosen, labels_csv)
        epochs = {"epochs": self.args.finetune_epochs} if self.args.finetune_epochs else {}
        config = build_config(FinetuneConfig, self.recipe, labels=labels_csv, source=self.run_folder, seed=seed,
                              out=self.run_folder / f"finetune-{tag}", quiet=self.args.quiet, **epochs)  # fmt: skip
        path = finetune.run(config)
        model = load_artifact(path, "finetune")
        logits, labels = finetuned_logits(model, self.test, self.classes)
        model_classes = np.array(model.spec.class_names or [])
        predicted = model_classes[logits.argmax(dim=1).numpy()]  # the model knows only the chosen classes
        return float((predicted == np.array(self.classes)[labels.numpy()]).mean()), path

    def measure(self, tag: str, chosen: LabeledImages, seed: int) -> dict[str, float]:
        rows = [self.row[path] for path in chosen.paths]
        bank_x, bank_y = self.pool_x[rows], self.pool_y[rows]
        evaluate = self.recipe.get("evaluate", {})
        knn = knn_scores(bank_x, bank_y, self.test_x, len(self.classes), k=int(evaluate.get("knn_k", 200)),
                         temperature=float(evaluate.get("knn_temperature", 0.1)))  # fmt: skip
        probe, _ = linear_probe_scores(
            bank_x.numpy(), bank_y.numpy(), self.test_x.numpy(), len(self.classes), seed=seed
        )
        tuned, _ = self.finetune(tag, chosen, seed)
        test_y = self.test_y.numpy()
        return {
            "classes": float(len(set(chosen.labels))),
            "kNN": top1("kNN", knn.numpy(), test_y, self.classes),
            "linear probe": top1("probe", probe, test_y, self.classes),
            "fine-tuned": tuned,
        }


def pretrained_run(args: argparse.Namespace, recipe: dict[str, Any], pool: Path) -> tuple[Path, float]:
    """The run folder with a pretrain/ stage (pretrained now or linked from `--pretrained`), and its minutes."""
    run_folder = args.cache / "runs" / f"selection-{args.recipe.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    if args.pretrained:
        if not (args.pretrained / "pretrain" / "backbone.safetensors").is_file():
            raise SystemExit(f"--pretrained {args.pretrained}: no pretrain/backbone.safetensors in it")
        (run_folder / "pretrain").mkdir(parents=True)
        for name in ("backbone.safetensors", "head.safetensors", "run.json"):
            (run_folder / "pretrain" / name).symlink_to((args.pretrained / "pretrain" / name).resolve())
        return run_folder, 0.0
    overrides = {"epochs": args.pretrain_epochs} if args.pretrain_epochs else {}
    pretrain.run(
        build_config(
            PretrainConfig,
            recipe,
            data=pool,
            out=run_folder,
            quiet=args.quiet,
            follow_links=True,
            **overrides,
        )
    )
    return run_folder, (time.perf_counter() - started) / 60


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    code = commit()
    recipe = apply_overrides(load_recipe(args.recipe), args.override)
    count = args.unlabeled_images or int(recipe.get("benchmark", {}).get("unlabeled_images", 10_000))
    pool = unlabeled_pool(read_labels(unpack(ARCHIVE, args.cache) / "train"), count, args.cache)
    run_folder, pretrain_minutes = pretrained_run(args, recipe, pool)
    experiment = Experiment(args, recipe, run_folder, pool)
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    for budget in args.budgets:
        cell = results.setdefault(str(budget), {m: {k: [] for k in MEASURES} for m in METHODS})
        for seed in args.seeds:
            random = np.random.default_rng(seed)
            choices = {
                "typical (select)": experiment.select(f"typical-{budget}-seed{seed}", budget, seed, strategy="typical"),
                "random": [experiment.pool_paths[i] for i in random.choice(len(experiment.pool_paths), budget, replace=False)],
                "class-balanced random": list(balanced_subset(experiment.pool, per_class=max(1, budget // 10), seed=seed).paths),
            }  # fmt: skip
            for method, paths in choices.items():
                tag = f"{method.split(' ')[0]}-{budget}-seed{seed}"
                for measure, value in experiment.measure(tag, experiment.labelled(paths), seed).items():
                    cell[method][measure].append(value)
            print(f"budget {budget} seed {seed}: " + "; ".join(
                f"{m} {cell[m]['fine-tuned'][-1]:.3f} ({cell[m]['classes'][-1]:.0f} classes)" for m in METHODS), flush=True)  # fmt: skip
    second = second_round(experiment, args) if args.round_from else {}
    return {
        "recipe": str(args.recipe.resolve().relative_to(REPO) if args.recipe.resolve().is_relative_to(REPO) else args.recipe),
        "command": "python benchmarks/selection.py " + " ".join(sys.argv[1:]),
        "device": device_name(), "date": time.strftime("%Y-%m-%d"), "commit": code, "torch": torch.__version__,
        "wall_seconds": time.perf_counter() - started, "pretrain_minutes": pretrain_minutes,
        "pretrained": str(args.pretrained) if args.pretrained else None, "run_folder": str(run_folder),
        "unlabeled_images": len(experiment.pool_paths), "test_images": len(experiment.test),
        "seeds": args.seeds, "results": results, "second_round": second,
    }  # fmt: skip


def second_round(experiment: Experiment, args: argparse.Namespace) -> dict[str, list[float]]:
    """Typical `round_from` labels → fine-tune → `round_from` more by `select --strategy mixed` or at random."""
    start = args.round_from
    found: dict[str, list[float]] = {"start (typical)": [], "+ mixed (select)": [], "+ random": []}
    for seed in args.seeds:
        base = experiment.select(f"round1-{start}-seed{seed}", start, seed, strategy="typical")
        accuracy, model = experiment.finetune(f"round1-{start}-seed{seed}", experiment.labelled(base), seed)
        found["start (typical)"].append(accuracy)
        base_csv = experiment.run_folder / f"labels-round1-{start}-seed{seed}.csv"
        added = experiment.select(
            f"round2-mixed-seed{seed}", start, seed, strategy="mixed", labels=base_csv, source=model
        )
        rest = sorted(set(experiment.pool_paths) - set(base))
        random = np.random.default_rng(seed)
        extra = [rest[i] for i in random.choice(len(rest), start, replace=False)]
        for name, paths in (("+ mixed (select)", added), ("+ random", extra)):
            tag = f"round2-{name.split(' ')[1]}-seed{seed}"
            found[name].append(experiment.finetune(tag, experiment.labelled(base + paths), seed)[0])
        print(
            f"second round seed {seed}: " + "; ".join(f"{k} {v[-1]:.3f}" for k, v in found.items()),
            flush=True,
        )
    return found


def _cell(values: list[float], percent: bool = True) -> str:
    scale = 100 if percent else 1
    mean = scale * statistics.fmean(values)
    spread = f" ± {scale * statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{mean:.1f}{spread}"


def markdown(result: dict[str, Any]) -> str:
    budgets = list(result["results"])
    lines = [
        f"### selection — {Path(result['recipe']).name} — {result['date']}",
        "",
        f"Device: {result['device']}; commit {result['commit']}; torch {result['torch']}; wall time "
        f"{result['wall_seconds'] / 60:.1f} min (pretraining "
        + (
            f"reused from {result['pretrained']}"
            if result["pretrained"]
            else f"{result['pretrain_minutes']:.1f} min"
        )
        + f"); pool of {result['unlabeled_images']} unlabeled images, {result['test_images']} test images; "
        f"top-1 % on the test set, mean ± std over seeds {result['seeds']}.",
        f"Command: `{result['command']}`",
        "",
        "| budget | choice | classes covered | kNN | linear probe | fine-tuned |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for budget in budgets:
        for method in METHODS:
            cell = result["results"][budget][method]
            lines.append(f"| {budget} | {method} | {_cell(cell['classes'], percent=False)} | "
                         + " | ".join(_cell(cell[m]) for m in MEASURES[1:]) + " |")  # fmt: skip
    lines += ["", "Typical − random, points (fine-tuned / linear probe): " + ", ".join(
        f"{b}: {_gap(result, b, 'fine-tuned'):+.1f} / {_gap(result, b, 'linear probe'):+.1f}" for b in budgets) + "."]  # fmt: skip
    if result["second_round"]:
        lines += ["", "| second round (fine-tuned) | top-1 % |", "| --- | ---: |"]
        lines += [f"| {name} | {_cell(values)} |" for name, values in result["second_round"].items()]
    return "\n".join(lines) + "\n"


def _gap(result: dict[str, Any], budget: str, measure: str) -> float:
    cell = result["results"][budget]
    return 100 * (
        statistics.fmean(cell["typical (select)"][measure]) - statistics.fmean(cell["random"][measure])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "cifar10-cpu.toml")
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--unlabeled-images", type=int, help="pool size (default: the recipe's [benchmark] value)"
    )
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 20, 50, 100, 500])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--round-from", type=int, default=100, help="second round: start labels (0: skip it)")
    parser.add_argument("--pretrain-epochs", type=int, help="override the recipe's pretraining epochs")
    parser.add_argument("--finetune-epochs", type=int, help="override the recipe's fine-tuning epochs")
    parser.add_argument("--test-images", type=int, help="evaluate on a class-balanced part of the test set")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument(
        "--pretrained", type=Path, metavar="RUN", help="reuse RUN/pretrain (a run under --cache/runs)"
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"selection-{args.recipe.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
