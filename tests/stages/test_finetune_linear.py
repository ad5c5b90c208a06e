"""`finetune --method linear` as a user runs it: the frozen backbone, the saved classifier that
predict and evaluate use, a rerun, and the combinations it refuses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import TinyRun, copy_tiny_run
from safetensors.torch import load_file
from typer.testing import CliRunner

from labelfew.artifacts import load_artifact
from labelfew.cli import app
from labelfew.config import (
    DistillConfig,
    EvaluateConfig,
    ExportConfig,
    FinetuneConfig,
    PredictConfig,
    SelectConfig,
)
from labelfew.data.labels import read_label_files, read_labels
from labelfew.engine import linear_head, lr_search
from labelfew.errors import UserError
from labelfew.models import load_model
from labelfew.registry import model_label
from labelfew.stages import distill, evaluate, finetune, select
from labelfew.use import export
from labelfew.use.predict import predict


@pytest.fixture(scope="module")
def tiny(tiny_pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return copy_tiny_run(tiny_pretrained, tmp_path_factory.mktemp("linear"))


def _linear(tiny: TinyRun, **options: object) -> Path:
    config = FinetuneConfig(labels=(tiny["labels"],), source=tiny["run"], method="linear", epochs=5, batch_size=8,
                            workers=0, quiet=True, **options)  # type: ignore[arg-type]  # fmt: skip
    return finetune.run(config)


def test_the_backbone_stays_the_pretrains_and_predict_and_evaluate_use_the_head(
    tiny: TinyRun, tmp_path: Path
) -> None:
    model = _linear(tiny)
    assert model == tiny["run"] / "finetune-linear-labels" / "model.safetensors"
    tensors = load_file(model)
    pretrained = load_file(tiny["run"] / "pretrain" / "backbone.safetensors")
    for name, tensor in pretrained.items():
        assert torch.equal(tensors[f"backbone.{name}"], tensor), name  # bit for bit
    record = json.loads((model.parent / "run.json").read_text())
    assert record["method"] == "linear" and record["config"]["method"] == "linear"
    search = record["lr_search"]
    assert [item["factor"] for item in search["candidates"]] == list(linear_head.LR_FACTORS)
    assert record["lr"] == search["chosen"] and search["folds"] >= 1
    folds = lr_search.search_folds(read_label_files((tiny["labels"],)), seed=0)  # --lr auto's folds
    assert (search["folds"], search["held_out_images"]) == (len(folds), sum(len(check) for _, check in folds))
    artifact = load_artifact(model)
    assert artifact.metadata["method"] == "linear" and model_label(artifact) == "linear (frozen)"
    from_init = {**artifact.metadata, "init": "timm:resnet18.a1_in1k", "start": "init"}  # `--init`'s name
    assert model_label(dataclasses.replace(artifact, metadata=from_init)).startswith(
        "linear (frozen, init resnet18"
    )

    out = tmp_path / "predictions.csv"
    predict(PredictConfig(images=tiny["test"], out=out, source=model.parent, top_k=1, workers=0, quiet=True))
    assert len(read_labels(out)) == 15
    result = evaluate.run(EvaluateConfig(test=tiny["test"], source=tiny["run"], out=tmp_path / "evaluate",
                                         workers=0, quiet=True))  # fmt: skip
    assert "linear (frozen)" in [row["method"] for row in result["rows"]]


def test_a_rerun_recomputes_the_same_head_and_an_explicit_lr_trains_that_one(tiny: TinyRun) -> None:
    """No checkpoints: the features and heads take seconds, a rerun (or a run stopped and rerun)
    recomputes them, bit for bit."""
    first = load_file(_linear(tiny, out=tiny["work"] / "linear-a"))
    (tiny["work"] / "linear-a" / "model.safetensors").unlink()  # as if stopped before saving
    again = load_file(_linear(tiny, out=tiny["work"] / "linear-a"))
    other = load_file(_linear(tiny, out=tiny["work"] / "linear-b", restart=True))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[key], again[key]) and torch.equal(first[key], other[key]) for key in first)
    assert not (tiny["work"] / "linear-a" / "checkpoints").exists()
    explicit = _linear(tiny, out=tiny["work"] / "linear-explicit", lr=0.05)
    record = json.loads((explicit.parent / "run.json").read_text())
    assert record["lr"] == 0.05 and record["lr_search"] is None


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--scratch"], "a frozen random backbone learns nothing"),
        (["--optimizer", "lars"], "--method linear trains its heads with SGD"),
        (["--unlabeled", "."], "only for --method fixmatch"),
        (["--early-stop", "3", "--val-fraction", "0.2"], "the heads are chosen on --lr auto's"),
    ],
)
def test_what_a_linear_head_cannot_use_exits_2_with_one_line(
    tiny: TinyRun, tmp_path: Path, flags: list[str], expected: str
) -> None:
    arguments = ["finetune", "--labels", str(tiny["labels"]), "--method", "linear", "--out", str(tmp_path / "out"),
                 "--workers", "0", "--quiet", *flags]  # fmt: skip
    result = CliRunner().invoke(app, arguments)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_select_export_and_distill_take_the_linear_model(tiny: TinyRun, tmp_path: Path) -> None:
    model = _linear(tiny, out=tiny["work"] / "finetune-linear-select")
    to_label = tmp_path / "to-label.csv"
    select.run(SelectConfig(folder=tiny["unlabeled"], budget=4, out=to_label, source=model.parent,
                            strategy="uncertain", workers=0, quiet=True))  # fmt: skip
    assert len(to_label.read_text().splitlines()) == 5
    exported = export.run(
        ExportConfig(source=model.parent, out=tmp_path / "export", format="safetensors", quiet=True)
    )
    assert (exported / "model.safetensors").is_file()
    student = distill.run(DistillConfig(unlabeled=tiny["unlabeled"], source=model.parent, out=tmp_path / "distill",
                                        epochs=1, batch_size=30, workers=0, quiet=True))  # fmt: skip
    teacher = json.loads((student.parent / "run.json").read_text())["parent"]
    assert Path(teacher["path"]).resolve() == model.resolve()


def test_a_head_on_the_frozen_first_projection_layer_and_the_validation_fraction(tiny: TinyRun) -> None:
    model = _linear(tiny, out=tiny["work"] / "linear-head-layer", from_head_layer=1, val_fraction=0.2)
    artifact = load_artifact(model)
    assert artifact.spec.from_head_layer == 1
    head = load_file(tiny["run"] / "pretrain" / "head.safetensors")
    tensors = load_file(model)
    for name, tensor in tensors.items():
        if name.startswith("head."):
            assert torch.equal(tensor, head["layers." + name.removeprefix("head.")]), name
    assert load_model(artifact).classifier.in_features == tensors["head.0.0.weight"].shape[0]
    record = json.loads((model.parent / "run.json").read_text())
    assert len(record["metrics"]["val_top1"]) == 1 and 0 <= record["metrics"]["val_top1"][0] <= 1
    assert record["labels"]["images"] == 12  # 15 labels, a fifth of each class held out


def test_balanced_draws_every_class_equally_often() -> None:
    labels = torch.tensor([0] * 90 + [1] * 10)
    generator = torch.Generator().manual_seed(0)
    drawn = torch.cat([linear_head.epoch_order(labels, 2, True, generator) for _ in range(50)])
    share = (labels[drawn] == 1).float().mean()
    assert abs(float(share) - 0.5) < 0.03
    plain = linear_head.epoch_order(labels, 2, False, generator)
    assert sorted(plain.tolist()) == list(range(100))


def test_a_labelled_image_whose_pixels_cannot_be_decoded_stops_it_unless_skip_bad(tiny: TinyRun) -> None:
    first = sorted((tiny["labels"] / "0").iterdir())[0]
    truncated = tiny["labels"] / "0" / "zz-truncated.png"
    truncated.write_bytes(first.read_bytes()[:60])  # the header reads, the pixels do not
    try:
        with pytest.raises(UserError, match=r"zz-truncated.png: cannot be decoded \(1 labelled image"):
            _linear(tiny, out=tiny["work"] / "linear-refused")
        model = _linear(tiny, out=tiny["work"] / "linear-skipped", skip_bad=True)
    finally:
        truncated.unlink()
    record = json.loads((model.parent / "run.json").read_text())
    assert record["data"]["skipped"] == 1 and str(truncated) in record["data"]["skipped_files"][0]
    assert record["labels"]["images"] == 15
