"""Fine-tuning stage: the new classifier's init and optimizer groups, and the lr search."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from labelfew.artifacts import load_artifact
from labelfew.cli import app
from labelfew.config import FinetuneConfig, PretrainConfig
from labelfew.data.labels import LabeledImages, read_label_files
from labelfew.data.subsets import balanced_subset
from labelfew.engine import fine_tuning, lr_search
from labelfew.engine.checkpoint import check_fingerprint
from labelfew.engine.start import Start, finetune_start
from labelfew.errors import Interrupted, UserError
from labelfew.fileio import sha256_file
from labelfew.models import build_classifier
from labelfew.optim import (
    LARS,
    build_finetune_optimizer,
    finetune_learning_rate,
    fixmatch_learning_rate,
    fixmatch_schedule,
    warmup_cosine_fraction,
)
from labelfew.registry import model_label
from labelfew.stages import finetune, pretrain
from labelfew.use import held_out


def test_the_new_classifier_starts_at_zero() -> None:
    """SimCLR's `zero_init_logits_layer`: the first steps train the classifier, not the features."""
    torch.manual_seed(0)
    model = build_classifier("test_resnet", small_stem=True, image_size=32, num_classes=3)
    assert (
        torch.count_nonzero(model.classifier.weight) == 0 and torch.count_nonzero(model.classifier.bias) == 0
    )
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(images), torch.zeros(2, 3))
    model(images).logsumexp(dim=1).sum().backward()  # not a dead layer: the classifier gets a gradient
    assert model.classifier.bias.grad is not None and torch.count_nonzero(model.classifier.bias.grad) == 3


def test_the_classifier_is_neither_lars_adapted_nor_decayed() -> None:
    """SimCLR's `lars_optimizer.py` excludes `head_supervised` from adaptation and weight decay."""
    model = build_classifier("test_resnet", small_stem=True, image_size=32, num_classes=3)
    optimizer = build_finetune_optimizer("lars", model, model.classifier, weight_decay=1e-4, lr=0.1)
    assert isinstance(optimizer, LARS)
    group_of = {id(param): group for group in optimizer.param_groups for param in group["params"]}
    for param in model.classifier.parameters():
        assert (group_of[id(param)]["lars_adapt"], group_of[id(param)]["weight_decay"]) == (False, 0.0)
    conv = next(param for param in model.backbone.parameters() if param.ndim == 4)
    assert (group_of[id(conv)]["lars_adapt"], group_of[id(conv)]["weight_decay"]) == (True, 1e-4)


# --- --lr auto ---------------------------------------------------------------------------------


def test_the_lr_rule_follows_the_optimizer_and_the_batch() -> None:
    assert finetune_learning_rate("sgd", 64) == pytest.approx(0.0125)  # SimCLR B.5: 0.05 × B / 256
    assert finetune_learning_rate("sgd", 256) == pytest.approx(0.05)
    assert finetune_learning_rate("lars", 1024) == pytest.approx(0.16)  # SimCLRv2: 0.005 × √B
    assert finetune_learning_rate("adamw", 256) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="Unknown optimizer"):
        finetune_learning_rate("adam", 64)  # type: ignore[arg-type]


def test_auto_is_the_default_and_a_bad_lr_is_refused() -> None:
    assert FinetuneConfig(labels=Path("labels.csv")).lr == "auto"
    assert lr_search.explicit_lr("auto") is None and lr_search.explicit_lr(0.05) == 0.05
    with pytest.raises(UserError, match="--lr fast"):
        FinetuneConfig(labels=Path("labels.csv"), lr="fast")
    with pytest.raises(UserError, match="--lr 0"):
        FinetuneConfig(labels=Path("labels.csv"), lr=0.0)


def test_search_length_is_a_quarter_of_the_epochs_and_at_least_50_steps() -> None:
    assert lr_search.search_epochs(60, steps_per_epoch=48) == 15  # 3,068 photos at batch 64
    assert lr_search.search_epochs(60, steps_per_epoch=3) == 17  # 245 photos: 51 steps
    assert lr_search.search_epochs(2, steps_per_epoch=10) == 2  # never longer than the run


def test_the_held_out_fifth_is_stratified_and_classes_with_few_labels_keep_theirs(tmp_path: Path) -> None:
    paths = tuple(tmp_path / f"{index}.png" for index in range(1260))
    labels = ("a",) * 600 + ("b",) * 655 + ("c",) * 2 + ("d",) * 3
    labeled = LabeledImages(paths, labels, tmp_path)
    folds = lr_search.search_folds(labeled, seed=0)
    assert len(folds) == 1  # a fifth of 1,260 holds 251 >= HELD_OUT_TARGET: one fold
    fit, check = folds[0]
    assert check.counts() == {"a": 120, "b": 131, "d": 1} and fit.counts() == {
        "a": 480,
        "b": 524,
        "c": 2,
        "d": 2,
    }
    assert not set(fit.paths) & set(check.paths)
    assert check == balanced_subset(
        labeled, fraction=0.2, seed=2, allow_empty=True
    )  # seeded as the 1% subsets
    assert lr_search.search_folds(labeled, seed=0) == folds


def test_a_small_fifth_is_held_out_in_turn_until_every_label_has_been_once(tmp_path: Path) -> None:
    paths = tuple(tmp_path / f"{index}.png" for index in range(245))
    labels = ("ants",) * 124 + ("bees",) * 119 + ("rare",) * 2  # hymenoptera's train counts, and a rare class
    folds = lr_search.search_folds(LabeledImages(paths, labels, tmp_path), seed=0)
    assert len(folds) == 5  # 49 held out per fifth < 250: all five fifths
    held = [path for _, check in folds for path in check.paths]
    assert sorted(held) == sorted(paths[:243])  # each label once, the rare class never
    for fit, check in folds:
        assert set(fit.paths) == set(paths) - set(check.paths)
        assert abs(check.counts()["ants"] - 124 / 5) < 1 and abs(check.counts()["bees"] - 119 / 5) < 1
    many = tuple(tmp_path / f"{index}.png" for index in range(600))
    three = lr_search.search_folds(
        LabeledImages(many, ("x",) * 600, tmp_path), seed=0
    )  # fifth 120: 3 of them
    assert len(three) == 3 and all(len(check) == 120 for _, check in three)


def test_fifths_left_empty_by_small_classes_are_skipped(tmp_path: Path) -> None:
    paths = tuple(tmp_path / f"{index}.png" for index in range(9))
    folds = lr_search.search_folds(
        LabeledImages(paths, ("a",) * 3 + ("b",) * 3 + ("c",) * 3, tmp_path), seed=0
    )
    assert len(folds) == 3 and all(len(check) == 3 for _, check in folds)  # 3 a class: fifths 1, 3 and 5
    alone = lr_search.search_folds(LabeledImages(paths[:4], ("a", "a", "b", "b"), tmp_path), seed=0)
    assert len(alone) == 1 and len(alone[0][1]) == 0 and len(alone[0][0]) == 4  # nothing to hold out


def _rates(scheduler_of: Any, steps: int = 100) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = scheduler_of(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_is_linear_over_the_first_steps_then_cosine() -> None:
    rates = _rates(lambda optimizer: warmup_cosine_fraction(optimizer, 100, warmup_fraction=0.05))
    assert rates[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert rates[5] == pytest.approx(0.1) and rates[-1] < 0.001


def test_fixmatch_decays_as_the_papers_cosine_of_7_pi_k_over_16_k() -> None:
    rates = _rates(lambda optimizer: fixmatch_schedule(optimizer, 100, warmup_fraction=0.0))
    assert rates == pytest.approx([0.1 * math.cos(7 * math.pi * k / (16 * 100)) for k in range(100)])


def test_the_methods_defaults_follow_their_papers(tmp_path: Path) -> None:
    """SimCLR fine-tuning: no weight decay, 5% warmup; FixMatch: 5e-4, none, lr 0.03 per 64; given wins."""
    supervised = FinetuneConfig(labels=tmp_path)
    fixmatch = FinetuneConfig(labels=tmp_path, method="fixmatch", unlabeled=tmp_path)
    assert (supervised.decay, supervised.warmup) == (0.0, 0.05)
    assert (fixmatch.decay, fixmatch.warmup) == (5e-4, 0.0)
    given = FinetuneConfig(
        labels=tmp_path, method="fixmatch", unlabeled=tmp_path, weight_decay=0, warmup_fraction=0.1
    )
    assert (given.decay, given.warmup) == (0.0, 0.1)
    assert fixmatch_learning_rate("sgd", 64) == pytest.approx(0.03)
    assert fixmatch_learning_rate("sgd", 448) == pytest.approx(0.21)
    assert fixmatch_learning_rate("lars", 256) == finetune_learning_rate("lars", 256)


@pytest.fixture(scope="module")
def tiny_pretrain(
    digits_folder: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A 1-epoch pretrain on 60 digits, and 10 labels of each of 3 classes."""
    work = tmp_path_factory.mktemp("lr-auto")
    for name, count, classes in (("unlabeled", 6, 10), ("labels", 10, 3)):
        for folder in sorted(digits_folder[0].iterdir())[:classes]:
            (work / name / folder.name).mkdir(parents=True)
            for path in sorted(folder.iterdir())[:count]:
                shutil.copy(path, work / name / folder.name / path.name)
    pretrain.run(PretrainConfig(data=work / "unlabeled", out=work / "run", arch="test_resnet", small_stem=False,
                                epochs=1, batch_size=30, workers=0, quiet=True))  # fmt: skip
    return {"run": work / "run", "labels": work / "labels", "work": work}


def _finetune(tiny: dict[str, Path], out: str, **options: Any) -> dict[str, Any]:
    options = {"epochs": 2, **options}
    config = FinetuneConfig(labels=tiny["labels"], source=tiny["run"], out=tiny["work"] / out, batch_size=8,
                            workers=0, quiet=True, **options)  # fmt: skip
    finetune.run(config)
    return json.loads((tiny["work"] / out / "run.json").read_text())


def test_auto_picks_the_best_held_out_lr_and_a_rerun_reuses_the_choice(
    tiny_pretrain: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # 30 labels, fifths of 6; 2 epochs of 3 steps: a budget of 6 steps, so one epoch (3 steps) a
    # candidate (never less), on the first fold only. ×4 and ×8 tie on top-1: the lower held-out loss wins.
    scores = iter([(0.5, 0.9), (0.5, 0.8), (1.0, 0.6), (1.0, 0.5)])
    monkeypatch.setattr(finetune, "held_out_scores", lambda *args: next(scores))
    record = _finetune(tiny_pretrain, "auto")
    search = record["lr_search"]
    rule = 0.05 * 8 / 256
    factors = [item["lr"] / rule for item in search["candidates"]]
    assert factors == pytest.approx([1, 2, 4, 8])
    assert (search["fit_images"], search["held_out_images"], search["folds"]) == (24, 6, 1)
    assert search["candidates"][0]["steps"] == 3 and (search["budget_steps"], search["steps"]) == (6, 12)
    assert record["lr"] == search["chosen"] == pytest.approx(8 * rule) == record["config"]["lr"]
    assert record["labels"]["images"] == 30  # then trained on all the labels
    # A rerun (after a kill, or to rebuild) reads lr_search.json instead of searching again.
    monkeypatch.setattr(finetune, "search_lr", lambda *args: pytest.fail("searched again"))
    (tiny_pretrain["work"] / "auto" / "model.safetensors").unlink()
    shutil.rmtree(tiny_pretrain["work"] / "auto" / "checkpoints")  # tests/test_resume.py covers resuming
    assert _finetune(tiny_pretrain, "auto")["lr"] == pytest.approx(8 * rule)


def test_a_search_stopped_by_ctrl_c_continues_where_it_stopped(
    tiny_pretrain: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    scored: list[int] = []
    stop_at = [3]  # Ctrl-C at the third candidate's end, once

    def scores(*args: Any) -> tuple[float, float]:
        scored.append(len(scored))
        if len(scored) in stop_at:
            stop_at.clear()  # what the trainer raises on SIGINT when it has no checkpoints:
            raise Interrupted("stopped by SIGINT; no checkpoint was written (checkpoints are off)", 130)
        return 0.5, 1.0

    monkeypatch.setattr(finetune, "held_out_scores", scores)
    with pytest.raises(Interrupted, match=r"finished candidates are in lr_search\.json: rerun"):
        _finetune(tiny_pretrain, "stopped")
    scored.clear()
    search = _finetune(tiny_pretrain, "stopped")["lr_search"]
    assert len(scored) == 2  # the third and fourth candidates; the first two were read back
    assert len(search["candidates"]) == 4 and search["steps"] == 12


def test_an_explicit_lr_skips_the_search(
    tiny_pretrain: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(finetune, "search_lr", lambda *args: pytest.fail("searched"))
    record = _finetune(tiny_pretrain, "explicit", lr=0.03)
    assert record["lr"] == 0.03 and record["lr_search"] is None
    assert not (tiny_pretrain["work"] / "explicit" / "lr_search.json").exists()


def test_with_too_few_labels_to_hold_out_the_rule_is_used_and_said(tiny_pretrain: dict[str, Path]) -> None:
    labels = tiny_pretrain["work"] / "two-each"
    for folder in sorted(tiny_pretrain["labels"].iterdir()):
        (labels / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[:2]:
            shutil.copy(path, labels / folder.name / path.name)
    record = _finetune({**tiny_pretrain, "labels": labels}, "two-each")
    assert record["lr_search"]["candidates"] == [] and record["lr"] == pytest.approx(0.05 * 6 / 256)
    assert "not searched" in record["lr_search"]["note"]


# --- --init: fine-tuning weights that already exist (issue 24) ---------------------------------


def _init_file(folder: Path, seed: int = 5) -> Path:
    """A timm test_resnet's whole state dict (its classifier `fc.*` too), seeded, as a bare
    safetensors file that names its architecture the way timm's exports do."""
    torch.manual_seed(seed)
    state = timm.create_model("test_resnet", num_classes=7).state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(folder / "weights.safetensors"),
              metadata={"architecture": "test_resnet"})  # fmt: skip
    return folder / "weights.safetensors"


def _export_folder(folder: Path) -> Path:
    """The init file in a folder as `labelfew export` writes one, whose config gives a mean and std."""
    _init_file(folder).rename(folder / "model.safetensors")
    config = {
        "architecture": "test_resnet",
        "pretrained_cfg": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]},
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def init_run(
    tiny_pretrain: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, torch.Tensor]]:
    """`finetune --init EXPORT_FOLDER` with no pretrain run and no --out (run in a fresh folder), and
    the backbone's tensors as the first step saw them."""
    work = tmp_path_factory.mktemp("init-run")
    init = _export_folder(work / "my-export")
    seen: dict[str, torch.Tensor] = {}
    original = fine_tuning.classification_step

    def spy(*args: Any) -> Any:
        inner = original(*args)

        def step(model: torch.nn.Module, batch: Any) -> Any:
            if not seen:  # before the first step changes anything
                backbone = getattr(model, "module", model).backbone
                seen.update({key: value.clone() for key, value in backbone.state_dict().items()})
            return inner(model, batch)

        return step

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fine_tuning, "classification_step", spy)
        patch.chdir(work)
        finetune.run(FinetuneConfig(labels=tiny_pretrain["labels"], init=str(init), epochs=1, batch_size=8,
                                    lr=0.01, workers=0, quiet=True))  # fmt: skip
    (artifact,) = (work / "runs").glob("*/finetune-labels/model.safetensors")
    return artifact, seen


def test_init_fine_tunes_exactly_its_tensors_with_its_normalisation_and_records_them(
    init_run: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, seen = init_run
    init_file = path.parents[3] / "my-export" / "model.safetensors"
    stored = load_file(str(init_file))
    assert seen and set(seen) == {key for key in stored if not key.startswith("fc.")}
    for key, value in seen.items():
        assert torch.equal(value, stored[key]), key  # strict: every backbone tensor, bit for bit
    assert path.parents[1].name.startswith("labels-init-my-export-")  # a run of its own, named after both
    artifact = load_artifact(path, "finetune")
    spec = artifact.spec
    assert (spec.mean, spec.std, spec.small_stem) == (
        (0.5, 0.4, 0.3),
        (0.2, 0.25, 0.3),
        False,
    )  # 32 px, but its stem
    digest = sha256_file(init_file)
    assert (spec.init, spec.init_sha256, spec.scratch) == (str(path.parents[3] / "my-export"), digest, False)
    record = json.loads((path.parent / "run.json").read_text())
    assert record["init"]["sha256"] == digest and record["init"]["tensors_skipped"] == 2  # fc.weight, fc.bias
    assert record["parent"] is None
    assert model_label(artifact) == "fine-tuned (init my-export)"


def test_the_model_names_say_where_fine_tuning_started(
    init_run: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    artifact = load_artifact(init_run[0], "finetune")

    def named(*drop: str, **metadata: str) -> str:
        kept = {key: value for key, value in artifact.metadata.items() if key not in drop}
        return model_label(dataclasses.replace(artifact, metadata={**kept, **metadata}))

    assert named(method="fixmatch") == "fine-tuned (fixmatch, init my-export)"
    assert named("start") == "fine-tuned (init + SSL)"  # from a pretrain that started from the init
    assert named("start", method="fixmatch") == "fine-tuned (fixmatch, init + SSL)"
    assert named("start", "init") == "fine-tuned"  # self-supervised from random init
    assert named("start", "init", scratch="true") == "fine-tuned (scratch)"


def test_a_pretrain_started_from_an_init_passes_its_lineage_on(
    tiny_pretrain: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_pretrain["run"] / "pretrain", run / "pretrain")
    backbone = run / "pretrain" / "backbone.safetensors"
    with safe_open(str(backbone), framework="pt") as reader:
        metadata = {
            **(reader.metadata() or {}),
            "init": "timm:test_resnet.r160_in1k",
            "init_sha256": "ab" * 32,
        }
    save_file(load_file(str(backbone)), str(backbone), metadata=metadata)
    record = json.loads((run / "pretrain" / "run.json").read_text())
    record.setdefault("artifacts", {})["backbone.safetensors"] = {"sha256": sha256_file(backbone)}
    (run / "pretrain" / "run.json").write_text(json.dumps(record))
    out = finetune.run(FinetuneConfig(labels=tiny_pretrain["labels"], source=run, epochs=1, batch_size=8, lr=0.01,
                                      workers=0, quiet=True))  # fmt: skip
    spec = load_artifact(out, "finetune").spec
    assert (spec.init, spec.init_sha256) == ("timm:test_resnet.r160_in1k", "ab" * 32)
    assert model_label(load_artifact(out, "finetune")) == "fine-tuned (init + SSL)"


def _one_line(result: Any) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    return lines[0]


def test_bad_inits_exit_2_with_one_line_before_any_image_is_opened(
    tiny_pretrain: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = _init_file(tmp_path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    opened: list[object] = []
    original = Image.open
    monkeypatch.setattr(
        Image, "open", lambda *args, **kwargs: opened.append(args) or original(*args, **kwargs)
    )
    labels = ["finetune", "--labels", str(tiny_pretrain["labels"]), "--workers", "0", "--quiet"]
    runner = CliRunner()
    cases = {
        ("--init", str(truncated)): "not a readable safetensors file",
        ("--init", str(good), "--arch", "resnet18"): "weights of test_resnet, but --arch resnet18",
        ("--init", str(good), "--from", str(tiny_pretrain["run"])): "not with --from",
        ("--init", str(good), "--scratch"): "not with --scratch",
        ("--init-prefix", "backbone."): "only with --init",
    }
    for flags, expected in cases.items():
        line = _one_line(runner.invoke(app, [*labels, *flags, "--out", str(tmp_path / "out")]))
        assert expected in line, line
    assert opened == [], "an image was opened before the bad --init was refused"


def test_restart_deletes_only_a_run_of_the_same_labels(tiny_pretrain: dict[str, Path]) -> None:
    """Issue 22: finetune's `--restart` was unchecked; the label files are the run's data."""
    out = tiny_pretrain["work"] / "restart"
    first = FinetuneConfig(labels=tiny_pretrain["labels"], source=tiny_pretrain["run"], out=out, epochs=1,
                           batch_size=8, lr=0.01, workers=0, quiet=True)  # fmt: skip
    finetune.run(first)
    other = tiny_pretrain["work"] / "other-labels"
    shutil.copytree(tiny_pretrain["labels"], other)
    with pytest.raises(UserError, match=r"holds a run made from .*labels, not .*other-labels"):
        finetune.run(dataclasses.replace(first, labels=(other,), restart=True))
    assert (out / "model.safetensors").is_file()  # left alone
    finetune.run(dataclasses.replace(first, restart=True))  # the same labels: started over


def test_a_refused_resume_names_the_labels_that_changed(
    tiny_pretrain: dict[str, Path], tmp_path: Path
) -> None:
    labeled = read_label_files((tiny_pretrain["labels"],))
    config = FinetuneConfig(labels=tiny_pretrain["labels"], source=tiny_pretrain["run"])
    start = finetune_start(tiny_pretrain["run"], False, None, None, [])
    saved = fine_tuning.fingerprint(config, start, labeled)
    fewer = LabeledImages(labeled.paths[1:], labeled.labels[1:], labeled.root)
    gone = f"{labeled.relative_key(labeled.paths[0])} ({labeled.labels[0]})"
    assert gone in saved["_labels_sha256"]
    with pytest.raises(UserError, match=rf"labels_sha256 .*1 file\(s\) vanished: {re.escape(gone)}"):
        check_fingerprint(
            tmp_path / "checkpoints" / "step-1", saved, fine_tuning.fingerprint(config, start, fewer)
        )


def test_scratch_without_a_pretrain_gets_a_run_of_its_own_per_label_file(tmp_path: Path) -> None:
    """Two `labels.csv` in different folders no longer share `runs/labels/` (issue 22's review)."""
    config = FinetuneConfig(labels=tmp_path / "a" / "labels.csv", scratch=True)
    start = Start(None, "resnet18", 32, True, (0.5,) * 3, (0.5,) * 3)
    first = finetune.default_out(config, start)
    second = finetune.default_out(dataclasses.replace(config, labels=(tmp_path / "b" / "labels.csv",)), start)
    assert first != second and first.name == second.name == "finetune-scratch-labels"
    assert first.parent.name.startswith("labels-") and first.parent.parent == Path("runs")


# --- the best epoch, --early-stop, --class-weights (issue 25) ------------------------------------


def _scripted_validation(
    monkeypatch: pytest.MonkeyPatch, scores: list[float]
) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """Replaces the per-epoch validation by `scores` (balanced accuracy, one per epoch), recording
    each with the validated model's weights at that epoch's end."""
    seen: list[tuple[float, dict[str, torch.Tensor]]] = []

    def validate(model: torch.nn.Module, *args: Any) -> tuple[float, float]:
        score = scores[len(seen)]
        seen.append(
            (
                score,
                {key: value.clone() for key, value in getattr(model, "module", model).state_dict().items()},
            )
        )
        return 0.5, score

    monkeypatch.setattr(held_out, "top1_and_balanced", validate)
    return seen


def _same(saved: Path, expected: dict[str, torch.Tensor]) -> bool:
    tensors = load_file(str(saved))
    return tensors.keys() == expected.keys() and all(
        torch.equal(tensors[key], expected[key]) for key in tensors
    )


def test_the_best_epoch_by_the_real_val_curve_is_the_model_and_the_last_is_beside_it(
    tiny_pretrain: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A high lr on 24 labels (6 held out): the recorded held-out balanced accuracy peaks before
    the end (0.33, 0.33, 0.33, 0.33, 0.5, 0.33 on the CPU, float32 channels-last pretraining), its
    first argmax found by hand."""
    from labelfew.use import inference

    seen: list[tuple[float, dict[str, torch.Tensor]]] = []

    def validate(model: torch.nn.Module, *args: Any) -> tuple[float, float]:
        top1, score = inference.top1_and_balanced(model, *args)
        seen.append((score, {key: value.clone() for key, value in model.state_dict().items()}))
        return top1, score

    monkeypatch.setattr(held_out, "top1_and_balanced", validate)
    record = _finetune(tiny_pretrain, "best-real", epochs=6, lr=0.3, val_fraction=0.2)
    curve = [score for score, _ in seen]
    best = max(range(len(curve)), key=lambda index: (curve[index], -index))  # the first of equal scores
    assert best < len(curve) - 1 and curve[best] > curve[-1]  # else the test would not tell best from last
    assert record["metrics"]["val_score"] == pytest.approx(curve)
    assert record["best"]["epoch"] == best + 1 and record["best"]["score"] == pytest.approx(curve[best])
    folder = tiny_pretrain["work"] / "best-real"
    assert _same(folder / "model.safetensors", seen[best][1])
    assert _same(folder / "model-last.safetensors", seen[-1][1])
    assert set(record["artifacts"]) == {"model.safetensors", "model-last.safetensors"}
    last = load_artifact(folder / "model-last.safetensors", "finetune")  # its sha256 is checked
    assert model_label(last) == "fine-tuned (last epoch)" and last.metadata["epoch"] == "6"


def test_early_stop_ends_after_n_validations_without_improvement(
    tiny_pretrain: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the peak at epoch 2, then 2 validations without a better score: stops after epoch 4 of 8
    seen = _scripted_validation(monkeypatch, [0.5, 0.8, 0.8, 0.7, 0.9, 0.9, 0.9, 0.9])
    record = _finetune(tiny_pretrain, "early", epochs=8, lr=0.01, val_fraction=0.2, early_stop=2)
    assert (
        len(seen) == 4
        and len(record["epoch_losses"] if "epoch_losses" in record else record["metrics"]["epoch_losses"])
        == 4
    )
    assert record["best"] == {"metric": "val_score", "epoch": 2, "score": 0.8, "epochs_trained": 4, "epochs": 8,
                              "early_stop": 2, "stopped_early": True}  # fmt: skip
    folder = tiny_pretrain["work"] / "early"
    assert _same(folder / "model.safetensors", seen[1][1]) and _same(
        folder / "model-last.safetensors", seen[3][1]
    )


def test_without_a_held_out_split_the_last_epoch_is_the_model(tiny_pretrain: dict[str, Path]) -> None:
    record = _finetune(tiny_pretrain, "no-val", lr=0.01)
    assert record["best"] is None and set(record["artifacts"]) == {"model.safetensors"}
    with pytest.raises(UserError, match="--early-stop 3: needs --val-fraction"):
        FinetuneConfig(labels=tiny_pretrain["labels"], early_stop=3)


def test_class_weights_reach_the_loss_and_are_recorded_and_fingerprinted(
    tiny_pretrain: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sklearn.utils.class_weight import compute_class_weight

    labels = tiny_pretrain["work"] / "skewed"  # 10, 5 and 2 labels
    for folder, count in zip(sorted(tiny_pretrain["labels"].iterdir()), (10, 5, 2), strict=True):
        (labels / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[:count]:
            shutil.copy(path, labels / folder.name / path.name)
    used: list[torch.Tensor | None] = []
    original = fine_tuning.classification_loss

    def spy(
        logits: torch.Tensor, targets: torch.Tensor, smoothing: float, weights: torch.Tensor | None
    ) -> Any:
        used.append(weights)
        return original(logits, targets, smoothing, weights)

    monkeypatch.setattr(fine_tuning, "classification_loss", spy)
    record = _finetune({**tiny_pretrain, "labels": labels}, "weighted", lr=0.01, class_weights="auto")
    names = sorted(path.name for path in labels.iterdir())
    expected = compute_class_weight("balanced", classes=np.array(names),
                                    y=np.array([name for name, count in zip(names, (10, 5, 2), strict=True) for _ in range(count)]))  # fmt: skip
    assert list(record["class_weights"].values()) == pytest.approx(expected.tolist())
    assert used and all(
        weights is not None and torch.allclose(weights.double(), torch.tensor(expected)) for weights in used
    )
    saved = json.loads(
        next((tiny_pretrain["work"] / "weighted" / "checkpoints").glob("*/fingerprint.json")).read_text()
    )
    assert saved["class_weights"] == pytest.approx(expected.tolist())
    assert record["config"]["class_weights"] == "auto"


def test_a_class_10_times_larger_than_another_is_warned_about_once(tiny_pretrain: dict[str, Path]) -> None:
    from labelfew import engine

    labels = tiny_pretrain["work"] / "ten-to-one"  # 10, 10 and 1 labels
    for folder, count in zip(sorted(tiny_pretrain["labels"].iterdir()), (10, 10, 1), strict=True):
        (labels / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[:count]:
            shutil.copy(path, labels / folder.name / path.name)
    names = sorted(path.name for path in labels.iterdir())
    shown = {}
    for name, options in (
        ("plain", {}),
        ("weighted", {"class_weights": "auto"}),
        ("balanced", {"balanced": True}),
    ):
        with engine.console.capture() as captured:
            _finetune({**tiny_pretrain, "labels": labels}, f"ten-to-one-{name}", epochs=1, lr=0.01, **options)
        shown[name] = [line for line in captured.get().splitlines() if "imbalanced" in line]
    assert shown["plain"] == [f"warning: {labels}: imbalanced classes: '{names[0]}' has 10 images, '{names[2]}' 1 "
                              "(10×); consider --class-weights auto or --balanced"]  # fmt: skip
    assert shown["weighted"] == shown["balanced"] == []  # already evened
