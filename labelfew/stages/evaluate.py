"""Evaluation: kNN and a linear probe on frozen backbone features, and fine-tuned model accuracy.

kNN and the probe use the backbone's pooled features, never the projection head's output
(trap 6 in DESIGN.md: the head is for the loss; SimCLR arXiv 2002.05709 section 4.2).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from torch import nn

from labelfew import artifacts, engine
from labelfew.artifacts import Artifact, load_artifact, model_label, stage_info
from labelfew.config import EvaluateConfig, to_json
from labelfew.data.labels import LabeledImages, read_labels
from labelfew.data.overlap import BANK, HASH_CACHE, Leaks, guard
from labelfew.engine.loggers import check_loggers, open_loggers
from labelfew.errors import UserError
from labelfew.fileio import atomic_write_json
from labelfew.models import build_model, load_model
from labelfew.report import plots
from labelfew.report import tables as report
from labelfew.use.inference import run_model

PROBE_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN class scores (Wu et al. 2018, arXiv 1805.01978; DINO's eval_knn).

    Cosine similarity of each query to the bank; the k nearest vote for their class with
    weight exp(similarity / temperature). k is capped by the bank size. DINO (arXiv 2104.14294)
    uses T = 0.07 and reports k = 20 as best; k = 200 with T = 0.1 is the CIFAR protocol of
    Wu et al., which a few-label bank cannot serve (every image then votes, and the classes with
    more labels win). The scores are on the device of `bank` and `queries`.

    Shape: bank (B, D), bank_labels (B,), queries (Q, D) -> scores (Q, num_classes)
    """
    bank = nn.functional.normalize(bank.float(), dim=1)
    queries = nn.functional.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk):
        similarity = queries[start : start + chunk] @ bank.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(similarity.shape[0], num_classes, device=similarity.device)
        votes.scatter_add_(1, bank_labels.to(similarity.device)[top_index], weights)
        scores.append(votes)
    return torch.cat(scores)


def linear_probe_scores(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    num_classes: int,
    holdout: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, float | None]:
    """Logistic regression on L2-normalised frozen features; returns (scores, chosen C).

    C is chosen from PROBE_C_GRID on a stratified held-out part of the training features, then
    the probe is refit on all of them. With fewer than two examples of a class no split is
    possible and C = 1 is used (the second value is then None).

    Shape: train (N, D), train_labels (N,), test (Q, D) -> scores (Q, num_classes)
    """
    train = train / np.linalg.norm(train, axis=1, keepdims=True).clip(1e-12)
    test = test / np.linalg.norm(test, axis=1, keepdims=True).clip(1e-12)
    counts = np.bincount(train_labels, minlength=num_classes)
    present = counts > 0
    chosen: float | None = None
    if (counts[present] >= 2).all() and holdout > 0 and len(np.unique(train_labels)) > 1:
        fit_x, val_x, fit_y, val_y = train_test_split(
            train,
            train_labels,
            test_size=max(holdout, present.sum() / len(train_labels)),
            stratify=train_labels,
            random_state=seed,
        )
        best = -1.0
        for c in PROBE_C_GRID:
            score = _fit(fit_x, fit_y, c, seed).score(val_x, val_y)
            if score > best:
                best, chosen = score, c
    probe = _fit(train, train_labels, chosen or 1.0, seed)
    scores = np.zeros((test.shape[0], num_classes))
    scores[:, probe.classes_] = probe.predict_proba(test)
    return scores, chosen


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x, y)


@dataclass(frozen=True)
class Models:
    """What one evaluation covers: a pretrain backbone and/or fine-tuned models.

    Attributes:
        unusable: one line per folder of the run that looks like a stage but gives no model.
    """

    pretrain: Artifact | None
    finetunes: list[Artifact]
    run_folder: Path
    unusable: list[str]


def find_models(source: Path | None) -> Models:
    """Resolves --from into the backbone (pretrain) and every classifier (fine-tuned) model of the run.

    A single fine-tuned model (its file or stage folder) comes with the pretrain artifact it
    started from (run.json's parent), while that still exists.

    Raises:
        UserError: nothing to evaluate.
    """
    models, run_folder, unusable = artifacts.find_models(source)
    backbones = [model for model in models if stage_info(model.stage).kind == "backbone"]
    classifiers = [model for model in models if stage_info(model.stage).kind == "classifier"]
    pretrain = backbones[0] if backbones else None
    single = source is not None and (Path(source).is_file() or any(Path(source).glob("*.safetensors")))
    if single and classifiers:
        parent = (classifiers[0].run_info().get("parent") or {}).get("path")
        pretrain = load_artifact(Path(parent), "pretrain") if parent and Path(parent).is_file() else None
    return Models(pretrain, classifiers, run_folder, unusable)


def _outputs(
    model: nn.Module, artifact: Artifact, labeled: LabeledImages, class_names: list[str], batch_size: int,
    workers: int | None, skipped: dict[str, str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The model's outputs on the decodable labelled images, and their class indices.

    Each undecodable image is added to `skipped` (its path -> why), so that the report counts and names it.
    """
    labels = torch.tensor(labeled.label_indices(class_names), dtype=torch.long)
    outputs = run_model(model, list(labeled.paths), artifact.spec, batch_size, workers)
    if skipped is not None:
        skipped.update({str(labeled.paths[index]): reason for index, reason in outputs.errors.items()})
    return outputs.values, labels[outputs.kept]


def _backbone(artifact: Artifact, random_init: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(artifact.spec) if random_init else load_model(artifact)


def backbone_features(
    artifact: Artifact,
    labeled: LabeledImages,
    class_names: list[str],
    batch_size: int = 256,
    workers: int | None = None,
    random_init: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen backbone features of labelled images (eval transform) and their class indices.

    Shape: -> features (N, num_features), labels (N,)
    """
    model = _backbone(artifact, random_init, seed)
    return _outputs(model, artifact, labeled, class_names, batch_size, workers)


def finetuned_logits(
    artifact: Artifact,
    labeled: LabeledImages,
    class_names: list[str],
    batch_size: int = 256,
    workers: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a fine-tuned model on labelled images, and their class indices.

    Shape: -> logits (N, num_classes), labels (N,)
    """
    return _outputs(load_model(artifact), artifact, labeled, class_names, batch_size, workers)


def _bank_source(config: EvaluateConfig, models: Models) -> Path:
    """--bank, or the one label set the run's models were fine-tuned on.

    Raises:
        UserError: no label set, or several (which one is the bank is the user's choice); before
            any image is read.
    """
    if config.bank is not None:
        return config.bank
    found: dict[Path, None] = {}
    for artifact in sorted(models.finetunes, key=lambda a: a.spec.scratch):
        labels = (artifact.run_info().get("labels") or {}).get("path")
        if labels and Path(labels).exists():
            found[Path(labels).resolve()] = None
    if len(found) > 1:
        shown = ", ".join(str(path) for path in list(found)[:4])
        raise UserError(
            f"{models.run_folder}: its models were fine-tuned on {len(found)} label sets ({shown}); "
            "pass --bank with the one for kNN and the linear probe (e.g. all your labels)"
        )
    if found:
        return next(iter(found))
    raise UserError(
        "no labelled images for kNN and the linear probe: pass --bank labels.csv (e.g. your fine-tuning labels)"
    )


def _class_names(models: Models) -> list[str] | None:
    """The fine-tuned models' classes (None without any).

    Raises:
        UserError: two models with different classes.
    """
    if not models.finetunes:
        return None
    class_names = list(models.finetunes[0].spec.class_names or ())
    for artifact in models.finetunes[1:]:
        if list(artifact.spec.class_names or ()) != class_names:
            raise UserError(
                f"{artifact.path}: its classes differ from {models.finetunes[0].path}; evaluate them separately (--from)"
            )
    return class_names


def run(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluates every model of the run on the test set; prints the table and writes report.json.

    Every check that can refuse (classes, the bank, test labels, the leakage guard) runs before the
    first model does.
    """
    started = time.perf_counter()
    check_loggers(config.logger)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.plots:
        plots.require_matplotlib()
    models = find_models(config.source)
    for line in models.unusable if not config.quiet else []:
        engine.console.print(f"[yellow]left out[/]: {line}")
    class_names = _class_names(models)
    bank = read_labels(_bank_source(config, models)) if models.pretrain is not None else None
    test = read_labels(config.test)
    class_names = class_names or (bank.class_names if bank is not None else None)
    if class_names is None:
        raise UserError("nothing to evaluate: no pretrain or finetune artifact found")
    test.label_indices(class_names)  # a test class the models do not know: refused now, not after the bank
    out = config.out or models.run_folder / "evaluate"
    leaks = check_overlap(test, bank, models, config.allow_overlap, config.quiet, out / HASH_CACHE)
    skipped: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    if models.pretrain is not None and bank is not None:
        rows += _frozen_rows(models.pretrain, bank, test, class_names, config, skipped, leaks)
    for artifact in models.finetunes:
        rows.append(_finetune_row(artifact, test, class_names, config, skipped, leaks))
    result = {
        "test": {"path": str(config.test.resolve()), "images": len(test) - len(skipped), "listed": len(test),
                 "skipped": len(skipped), "skipped_files": [f"{path}: {why}" for path, why in skipped.items()]},
        "overlap": [item.to_json() for item in leaks.overlaps],
        "left_out": models.unusable,
        "class_names": class_names,
        "rows": rows,
        "config": to_json(config),
        "models": {
            "pretrain": str(models.pretrain.path) if models.pretrain else None,
            "finetunes": [str(a.path) for a in models.finetunes],
        },
        "device": str(device),
        "wall_seconds": time.perf_counter() - started,
    }  # fmt: skip
    _write(config, out, result, models, test)
    return result


def _write(
    config: EvaluateConfig, out: Path, result: dict[str, Any], models: Models, test: LabeledImages
) -> None:
    """report.json, the loggers' metrics, the terminal table and (--plots) the figures and report.html."""
    atomic_write_json(out / "report.json", result)
    _log_metrics(config, out, result)
    if not config.quiet:
        report.print_report(result, out / "report.json")
    if config.plots:
        plots.write_report(
            result,
            out,
            pretrain=models.pretrain,
            finetunes=models.finetunes,
            run_folder=models.run_folder,
            test=test,
            batch_size=config.batch_size,
            workers=config.workers,
            quiet=config.quiet,
        )


def _log_metrics(config: EvaluateConfig, out: Path, result: dict[str, Any]) -> None:
    """Every row's accuracies as metrics (`<method>/top1` ...), the config as params, to the chosen loggers."""
    scalars: dict[str, float] = {}
    for row in result["rows"]:
        name = re.sub(r"[^\w\-. /]", "", row["method"]).strip()  # MLflow's allowed characters
        while f"{name}/top1" in scalars:  # two models with one label: keep both
            name += " 2"
        for key in ("top1", "top5", "balanced_accuracy"):
            if isinstance(row.get(key), int | float):
                scalars[f"{name}/{key}"] = float(row[key])
    loggers = open_loggers(config.logger, out, to_json(config))
    loggers.log_scalars(0, scalars)
    loggers.close()


def check_overlap(
    test: LabeledImages,
    bank: LabeledImages | None,
    models: Models,
    allow: bool,
    quiet: bool,
    cache_file: Path,
) -> Leaks:
    """Test images that any model of the run saw (`labelfew.data.overlap.guard`), printed one line each.

    Raises:
        UserError: any overlap, unless `allow`.
    """
    finetunes = [artifact.path for artifact in models.finetunes]
    backbone = models.pretrain.path if models.pretrain is not None else None
    say = None if quiet else engine.console.print
    leaks = guard(list(test.paths), bank.paths if bank else None, backbone, finetunes, allow, cache_file, say)
    lines = [*leaks.unchecked, *(f"--allow-overlap: {item.message()}" for item in leaks.overlaps)]
    for line in lines if not quiet else []:
        engine.console.print(f"[yellow]{line}[/]")
    return leaks


def _knn_k(requested: int, bank_labels: torch.Tensor, class_names: list[str]) -> tuple[int, dict[str, Any]]:
    """k capped by the smallest class in the bank, and what report.json says about it.

    With more neighbours than the smallest class has images, a query of that class is outvoted by
    the others whatever its features: a bank of 20-30 labels with k = 20 is a majority vote.
    """
    counts = torch.bincount(bank_labels, minlength=len(class_names))
    present = counts[counts > 0]
    smallest = int(present.min()) if len(present) else 1
    if requested <= smallest:
        return requested, {}
    name = class_names[int(torch.where(counts == smallest)[0][0])]
    return smallest, {
        "k_requested": requested,
        "k_cap": f"the bank's smallest class, {name!r}, has {smallest}",
    }


def _frozen_rows(
    pretrain: Artifact,
    bank: LabeledImages,
    test: LabeledImages,
    class_names: list[str],
    config: EvaluateConfig,
    skipped: dict[str, str],
    leaks: Leaks,
) -> list[dict[str, Any]]:
    variants = [("", False)] + ([(" (random init)", True)] if config.random_baseline else [])
    rows = []
    for suffix, random_init in variants:
        backbone = _backbone(pretrain, random_init, config.seed)
        bank_x, bank_y = _outputs(backbone, pretrain, bank, class_names, config.batch_size, config.workers)
        test_x, test_y = _outputs(
            backbone, pretrain, test, class_names, config.batch_size, config.workers, skipped
        )
        k, capped = _knn_k(config.knn_k, bank_y, class_names)
        knn = knn_scores(bank_x, bank_y, test_x, len(class_names), k=k, temperature=config.knn_temperature)
        seen = leaks.seen[BANK if random_init else str(pretrain.path)]
        details = {"k": k, "temperature": config.knn_temperature, "bank_images": len(bank_x), **capped,
                   "seen_test_images": seen}  # fmt: skip
        rows.append(report.metrics_row(f"kNN{suffix}", knn.numpy(), test_y.numpy(), class_names, details))
        if random_init:
            continue
        probe, c = linear_probe_scores(
            bank_x.numpy(),
            bank_y.numpy(),
            test_x.numpy(),
            len(class_names),
            holdout=config.probe_holdout,
            seed=config.seed,
        )
        chosen = c if c is not None else "1.0 (too few labels to choose)"
        details = {"C": chosen, "bank_images": len(bank_x), "seen_test_images": seen}
        rows.append(report.metrics_row("linear probe", probe, test_y.numpy(), class_names, details))
    return rows


def _finetune_row(
    artifact: Artifact,
    test: LabeledImages,
    class_names: list[str],
    config: EvaluateConfig,
    skipped: dict[str, str],
    leaks: Leaks,
) -> dict[str, Any]:
    logits, labels = _outputs(
        load_model(artifact), artifact, test, class_names, config.batch_size, config.workers, skipped
    )
    name = model_label(artifact)
    info = artifact.run_info().get("labels", {})
    details = {"labels": info.get("path"), "labelled_images": info.get("images"), "artifact": str(artifact.path),
               "seen_test_images": leaks.seen[str(artifact.path)]}  # fmt: skip
    return report.metrics_row(
        name, torch.softmax(logits, dim=1).numpy(), labels.numpy(), class_names, details
    )
