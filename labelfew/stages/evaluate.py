"""Evaluation: kNN and a linear probe on frozen backbone features, and fine-tuned model accuracy.

kNN and the probe (`labelfew.probes`) use the backbone's pooled features, never the projection
head's output (trap 6 in DESIGN.md). Every row's name says where the model's weights started:
`kNN` on a pretrain run's backbone (`kNN (init + SSL)` when that pretraining started from `--init`
weights), `kNN (init NAME)` on `evaluate --init`'s own features, `kNN (random init)`, and each
classifier by its stage's label (`fine-tuned (init NAME)`, `fine-tuned (scratch)`, ...).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from labelfew import engine, registry
from labelfew.artifacts import Artifact, load_artifact
from labelfew.config import EvaluateConfig, to_json
from labelfew.data import multilabel as multilabel_data
from labelfew.data.class_weights import imbalance
from labelfew.data.labels import LabeledImages, read_labels
from labelfew.data.overlap import BANK, HASH_CACHE, Leaks, guard
from labelfew.engine.init_weights import Init, read_init
from labelfew.engine.loggers import check_loggers, open_loggers
from labelfew.engine.start import FrozenBackbone
from labelfew.errors import UserError
from labelfew.fileio import atomic_write_json
from labelfew.models import load_model
from labelfew.multilabel import DEFAULT_THRESHOLD, frozen_rows, metrics, multi_hot
from labelfew.probes import knn_k, knn_scores, linear_probe_scores
from labelfew.registry import model_label, stage_info
from labelfew.report import plots
from labelfew.report import tables as report
from labelfew.spec import ModelSpec
from labelfew.use.frozen_init import data_decoding, init_backbone
from labelfew.use.inference import backbone_features, finetuned_logits, labelled_outputs, random_model

__all__ = ["backbone_features", "finetuned_logits", "knn_scores", "linear_probe_scores", "run"]
"""`knn_scores` and `linear_probe_scores` live in `labelfew.probes`, `backbone_features` and
`finetuned_logits` in `labelfew.use.inference`; the benchmarks import them from here."""


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


def find_models(source: Path | None, init: Init | None = None) -> Models:
    """Resolves --from into the backbone (pretrain) and every classifier (fine-tuned) model of the run.

    A single fine-tuned model (its file or stage folder) comes with the pretrain artifact it
    started from (run.json's parent), while that still exists. `--init` without `--from` is
    evaluated alone (not beside whichever run is newest), its report in `runs/init-<NAME>/evaluate`.

    Raises:
        UserError: nothing to evaluate.
    """
    if init is not None and source is None:
        name = re.sub(r"[^\w.-]", "_", init.name)
        return Models(None, [], registry.RUNS_ROOT / f"init-{name}", [])
    models, run_folder, unusable = registry.find_models(source)
    backbones = [model for model in models if stage_info(model.stage).kind == "backbone"]
    classifiers = [model for model in models if stage_info(model.stage).kind == "classifier"]
    pretrain = backbones[0] if backbones else None
    single = source is not None and (Path(source).is_file() or any(Path(source).glob("*.safetensors")))
    if single and classifiers:
        parent = (classifiers[0].run_info().get("parent") or {}).get("path")
        pretrain = load_artifact(Path(parent), "pretrain") if parent and Path(parent).is_file() else None
    return Models(pretrain, classifiers, run_folder, unusable)


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
    """Evaluates every model of the run (and `--init`'s features) on the test set; prints the table
    and writes report.json.

    Every check that can refuse (the init, classes, the bank, test labels, the leakage guard) runs
    before the first model does; a bad `--init` before any image is opened.
    """
    started = time.perf_counter()
    check_loggers(config.logger)
    if config.plots:
        plots.require_matplotlib()
    init = read_init(config.init, arch=config.arch, prefix=config.init_prefix) if config.init else None
    models = find_models(config.source, init)
    for line in models.unusable if not config.quiet else []:
        engine.console.print(f"[yellow]left out[/]: {line}")
    if init is not None and not config.quiet:
        engine.console.print(init.summary())
    class_names = _class_names(models)
    scores_features = models.pretrain is not None or init is not None
    bank = read_labels(_bank_source(config, models), config.label_delimiter) if scores_features else None
    test = read_labels(config.test, config.label_delimiter)
    kinds = {str(config.test): test.multi_label, **({"the bank": bank.multi_label} if bank is not None else {}),
             **{str(artifact.path): artifact.spec.multi_label for artifact in models.finetunes}}  # fmt: skip
    multilabel_data.require_one_kind(kinds, config.plots)
    class_names = class_names or (bank.class_names if bank is not None else None)
    if class_names is None:
        raise UserError("nothing to evaluate: no pretrain or finetune artifact found")
    test.label_indices(class_names)  # a test class the models do not know: refused now, not after the bank
    own = _own(init, models, bank, test, config.seed) if init is not None else None
    out = config.out or models.run_folder / "evaluate"
    leaks = check_overlap(test, bank, models, config.allow_overlap, config.quiet, out / HASH_CACHE)
    skipped: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    for frozen in _frozen(models, own, config):
        rows += _frozen_rows(frozen, bank, test, class_names, config, skipped, leaks)
    for artifact in models.finetunes:
        rows.append(_finetune_row(artifact, test, class_names, config, skipped, leaks))
    result = {
        "test": {"path": str(config.test.resolve()), "images": len(test) - len(skipped), "listed": len(test),
                 "skipped": len(skipped), "skipped_files": [f"{path}: {why}" for path, why in skipped.items()],
                 "class_counts": test.counts(), "imbalance": imbalance(test.counts())},
        "overlap": [item.to_json() for item in leaks.overlaps],
        "left_out": models.unusable,
        "class_names": class_names,
        "multi_label": test.multi_label,
        "rows": rows,
        "config": to_json(config),
        "models": {
            "pretrain": str(models.pretrain.path) if models.pretrain else None,
            "finetunes": [str(a.path) for a in models.finetunes],
            "init": {**own.init.record(), "image_size": own.spec.image_size, "channels": own.spec.channels,
                     "window": own.spec.window} if own is not None else None,
        },
        "device": str(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "wall_seconds": time.perf_counter() - started,
    }  # fmt: skip
    _write(config, out, result, models, test)
    return result


def _own(
    init: Init, models: Models, bank: LabeledImages | None, test: LabeledImages, seed: int
) -> FrozenBackbone:
    """`--init`'s backbone as the run's models see images: at their input side (when the init records
    none) and their decoding; without a run, the bank's (surveyed with `seed`; never the test set's)."""
    known = [models.pretrain] if models.pretrain is not None else models.finetunes
    spec = known[0].spec if known else None
    decoding = spec.decoding if spec else data_decoding(bank.paths if bank is not None else test.paths, seed)
    return init_backbone(init, test.paths, spec.image_size if spec else None, decoding)


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
        for key in ("top1", "top5", "balanced_accuracy", "mAP", "macro_f1", "micro_f1"):
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


@dataclass(frozen=True)
class Frozen:
    """A backbone whose frozen features kNN (and the linear probe) score, and how its rows are named.

    Attributes:
        start: the rows' name after the method: "" (pretrain), " (init + SSL)", " (init NAME)", " (random init)".
        build: makes the backbone when its rows are computed (one model in memory at a time).
        seen: its key in `labelfew.data.overlap.Leaks.seen`.
    """

    start: str
    build: Callable[[], nn.Module]
    spec: ModelSpec
    seen: str
    probe: bool = True
    details: dict[str, Any] = field(default_factory=dict)


def _frozen(models: Models, own: FrozenBackbone | None, config: EvaluateConfig) -> list[Frozen]:
    """The backbones to score: the run's pretrain backbone, `--init`'s, then the random-init baseline."""
    found: list[Frozen] = []
    if (pretrain := models.pretrain) is not None:
        start = " (init + SSL)" if pretrain.spec.init else ""
        found.append(Frozen(start, lambda: load_model(pretrain), pretrain.spec, str(pretrain.path)))
    if own is not None:
        details = {"init": own.init.record()}
        found.append(Frozen(f" (init {own.init.name})", lambda: own.model, own.spec, BANK, details=details))
    base = found[0].spec if found else None
    if config.random_baseline and base is not None:
        found.append(
            Frozen(" (random init)", lambda: random_model(base, config.seed), base, BANK, probe=False)
        )
    return found


def _frozen_rows(
    frozen: Frozen,
    bank: LabeledImages | None,
    test: LabeledImages,
    class_names: list[str],
    config: EvaluateConfig,
    skipped: dict[str, str],
    leaks: Leaks,
) -> list[dict[str, Any]]:
    """kNN (and the linear probe) rows of one backbone."""
    assert bank is not None  # read whenever there is a backbone to score
    backbone = frozen.build()
    bank_x, bank_y = labelled_outputs(
        backbone, frozen.spec, bank, class_names, config.batch_size, config.workers
    )
    test_x, test_y = labelled_outputs(
        backbone, frozen.spec, test, class_names, config.batch_size, config.workers, skipped
    )
    if test.multi_label:
        return frozen_rows(frozen.start, bank_x, bank_y, test_x, test_y, class_names,
                           dict(knn_k=config.knn_k, knn_temperature=config.knn_temperature,
                                probe_holdout=config.probe_holdout, seed=config.seed),
                                {"bank_images": len(bank_x), "seen_test_images": leaks.seen[frozen.seen],
                                 **frozen.details}, probe=frozen.probe)  # fmt: skip
    k, capped = knn_k(config.knn_k, bank_y, class_names)
    knn = knn_scores(bank_x, bank_y, test_x, len(class_names), k=k, temperature=config.knn_temperature)
    seen = leaks.seen[frozen.seen]
    details = {"k": k, "temperature": config.knn_temperature, "bank_images": len(bank_x), **capped,
               "seen_test_images": seen, **frozen.details}  # fmt: skip
    rows = [report.metrics_row(f"kNN{frozen.start}", knn.numpy(), test_y.numpy(), class_names, details)]
    if not frozen.probe:
        return rows
    probe, c = linear_probe_scores(
        bank_x.numpy(),
        bank_y.numpy(),
        test_x.numpy(),
        len(class_names),
        holdout=config.probe_holdout,
        seed=config.seed,
    )
    chosen = c if c is not None else "1.0 (too few labels to choose)"
    details = {"C": chosen, "bank_images": len(bank_x), "seen_test_images": seen, **frozen.details}
    rows.append(
        report.metrics_row(f"linear probe{frozen.start}", probe, test_y.numpy(), class_names, details)
    )
    return rows


def _finetune_row(
    artifact: Artifact,
    test: LabeledImages,
    class_names: list[str],
    config: EvaluateConfig,
    skipped: dict[str, str],
    leaks: Leaks,
) -> dict[str, Any]:
    logits, labels = labelled_outputs(
        load_model(artifact), artifact.spec, test, class_names, config.batch_size, config.workers, skipped
    )
    name = model_label(artifact)
    info = artifact.run_info().get("labels", {})
    details = {"labels": info.get("path"), "labelled_images": info.get("images"), "artifact": str(artifact.path),
               "seen_test_images": leaks.seen[str(artifact.path)]}  # fmt: skip
    if artifact.spec.multi_label:
        threshold = artifact.spec.threshold if artifact.spec.threshold is not None else DEFAULT_THRESHOLD
        return {"method": name, **metrics(torch.sigmoid(logits).numpy(), multi_hot(labels, len(class_names)).numpy(),
                                          threshold, class_names), "details": details}  # fmt: skip
    return report.metrics_row(
        name, torch.softmax(logits, dim=1).numpy(), labels.numpy(), class_names, details
    )
