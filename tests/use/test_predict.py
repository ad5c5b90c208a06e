"""predict, embed and similar on small real images (scikit-learn's digits), as functions and CLI commands."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CopyPerClass
from reference.pil_views import eval_transform
from safetensors import safe_open
from typer.testing import CliRunner

from labelfew.artifacts import load_artifact
from labelfew.cli import app
from labelfew.config import EmbedConfig, FinetuneConfig, PredictConfig, PretrainConfig, SimilarConfig
from labelfew.data.images import load_rgb
from labelfew.data.labels import read_labels, write_labels
from labelfew.data.subsets import balanced_subset
from labelfew.models import features_model, load_model
from labelfew.stages import finetune, pretrain
from labelfew.use.embed import embed
from labelfew.use.predict import predict
from labelfew.use.similar import similar

runner = CliRunner()


@pytest.fixture(autouse=True)
def _on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The references below run on the CPU; on a GPU, cuDNN's TF32 convolutions differ by ~1e-3."""
    monkeypatch.setattr("labelfew.use.inference.device", lambda: torch.device("cpu"))


@pytest.fixture(scope="module")
def run(
    digits_folder: tuple[Path, Path], copy_per_class: CopyPerClass, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A tiny real run: pretrain (2 steps), fine-tune on 5 labels per class, and a scratch baseline."""
    train, test = digits_folder
    work = tmp_path_factory.mktemp("predict")
    pool = copy_per_class(train, work / "pool", per_class=20)
    images = copy_per_class(test, work / "images", per_class=6)
    labels = work / "labels.csv"
    write_labels(balanced_subset(read_labels(pool), per_class=5, seed=0), labels)
    folder = work / "runs" / "digits"
    common = {"arch": "test_resnet", "epochs": 1, "batch_size": 100, "workers": 0, "quiet": True}
    pretrain.run(PretrainConfig(data=pool, out=folder, **common))  # type: ignore[arg-type]
    tuned = finetune.run(
        FinetuneConfig(labels=labels, source=folder, epochs=2, batch_size=25, workers=0, quiet=True)
    )
    finetune.run(
        FinetuneConfig(
            labels=labels, source=folder, scratch=True, epochs=1, batch_size=25, workers=0, quiet=True
        )
    )
    return {"work": work, "run": folder, "images": images, "finetune": tuned, "pretrain": folder / "pretrain"}


def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def test_predict_matches_the_model_image_by_image(run: dict[str, Path]) -> None:
    out = run["work"] / "out" / "predictions.csv"
    predict(PredictConfig(images=run["images"], out=out, source=run["run"], top_k=3, quiet=True))
    rows = rows_of(out)
    assert len(rows) == 60
    assert list(rows[0]) == [
        "path",
        "label",
        "confidence",
        "label_2",
        "confidence_2",
        "label_3",
        "confidence_3",
        "error",
    ]
    artifact = load_artifact(run["finetune"])  # the SSL finetune, not the newer scratch baseline
    model = load_model(artifact).eval()
    transform = eval_transform(32, artifact.json_field("mean"), artifact.json_field("std"))
    class_names = artifact.json_field("class_names")
    for row in rows[::7]:
        path = out.parent / row["path"]  # relative to the CSV's folder, as in a label CSV
        with torch.no_grad():
            probabilities = torch.softmax(model(transform(load_rgb(path))[None]), dim=1)[0]
        top = probabilities.topk(3)
        assert [row["label"], row["label_2"], row["label_3"]] == [class_names[int(i)] for i in top.indices]
        confidences = [float(row[key]) for key in ("confidence", "confidence_2", "confidence_3")]
        assert confidences == pytest.approx(top.values.tolist(), abs=1e-4)
        assert row["error"] == ""


def test_predictions_csv_reads_as_a_label_csv(run: dict[str, Path]) -> None:
    out = run["work"] / "as-labels.csv"
    predict(PredictConfig(images=run["images"], out=out, source=run["finetune"], top_k=1, quiet=True))
    labelled = read_labels(out)
    assert len(labelled) == 60
    assert set(labelled.paths) == {path.absolute() for path in run["images"].rglob("*.png")}


def test_predict_lists_undecodable_files_and_goes_on(run: dict[str, Path], tmp_path: Path) -> None:
    images = shutil.copytree(run["images"] / "3", tmp_path / "images")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    (images / "empty.jpg").write_bytes(b"")
    out = tmp_path / "predictions.csv"
    result = runner.invoke(app, ["predict", str(images), "--out", str(out), "--from", str(run["run"])])
    assert result.exit_code == 0, result.output
    assert "2 file(s) could not be decoded" in result.output
    rows = {row["path"]: row for row in rows_of(out)}
    assert len(rows) == 8
    bad = ("images/broken.png", "images/empty.jpg")
    for name in bad:
        assert rows[name]["label"] == "" and rows[name]["confidence"] == "" and rows[name]["error"] != ""
    good = [row for name, row in rows.items() if name not in bad]
    assert len(good) == 6 and all(row["label"] in list("0123456789") and row["error"] == "" for row in good)


def test_predict_uses_the_latest_run_without_from(
    run: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(run["work"])
    result = runner.invoke(app, ["predict", str(run["images"]), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert "finetune-labels/model.safetensors" in result.output.replace("\n", "")
    assert len(rows_of(run["work"] / "predictions.csv")) == 60


def test_embed_writes_normalised_backbone_features(run: dict[str, Path]) -> None:
    out = run["work"] / "index" / "embeddings.safetensors"
    embed(EmbedConfig(images=run["images"], out=out, source=run["run"], quiet=True))
    index = rows_of(out.with_suffix(".csv"))
    with safe_open(str(out), "pt") as reader:
        embeddings = reader.get_tensor("embeddings")
        metadata = reader.metadata()
    artifact = load_artifact(run["pretrain"] / "backbone.safetensors")
    assert metadata["source"] == str(artifact.path.resolve()) and metadata["source_stage"] == "pretrain"
    assert embeddings.shape == (60, int(artifact.metadata["num_features"]))
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(60), atol=1e-5)
    assert [int(row["row"]) for row in index] == list(range(60))
    backbone = features_model(load_model(artifact)).eval()
    transform = eval_transform(32, artifact.json_field("mean"), artifact.json_field("std"))
    for number in (0, 31, 59):
        with torch.no_grad():
            features = backbone(transform(load_rgb(out.parent / index[number]["path"]))[None])[0]
        assert torch.allclose(embeddings[number], features / features.norm(), atol=1e-5)


def test_embed_from_a_finetune_uses_its_backbone(run: dict[str, Path]) -> None:
    from_pretrain, from_finetune = run["work"] / "a.safetensors", run["work"] / "b.safetensors"
    embed(EmbedConfig(images=run["images"], out=from_pretrain, source=run["pretrain"], quiet=True))
    embed(EmbedConfig(images=run["images"], out=from_finetune, source=run["finetune"], quiet=True))
    first, second = load_artifact(from_pretrain, "embeddings"), load_artifact(from_finetune, "embeddings")
    assert second.metadata["source_stage"] == "finetune"
    assert first.tensors["embeddings"].shape == second.tensors["embeddings"].shape
    assert not torch.allclose(first.tensors["embeddings"], second.tensors["embeddings"], atol=1e-3)


def test_similar_finds_a_copy_first_and_never_returns_the_query(run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "embeddings.safetensors"
    embed(EmbedConfig(images=run["images"], out=out, source=run["run"], quiet=True))
    original = sorted((run["images"] / "7").iterdir())[2]
    query = shutil.copy(original, tmp_path / "query.png")
    found = similar(SimilarConfig(query=Path(query), index=out, top_k=5))
    assert len(found) == 5 and [n.rank for n in found] == [1, 2, 3, 4, 5]
    assert found[0].path.resolve() == original.resolve() and found[0].similarity == pytest.approx(
        1.0, abs=1e-5
    )
    assert [n.similarity for n in found] == sorted((n.similarity for n in found), reverse=True)
    itself = similar(SimilarConfig(query=original, index=out, top_k=60))
    assert len(itself) == 59 and original.resolve() not in {n.path.resolve() for n in itself}


def test_similar_prints_a_table(run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "embeddings.safetensors"
    assert (
        runner.invoke(
            app, ["embed", str(run["images"]), "--out", str(out), "--from", str(run["run"])]
        ).exit_code
        == 0
    )
    query = sorted((run["images"] / "2").iterdir())[0]
    result = runner.invoke(app, ["similar", str(query), "--index", str(out), "-k", "3"])
    assert result.exit_code == 0, result.output
    assert "rank" in result.output and "similarity" in result.output
    assert sum(".png" in line for line in result.output.splitlines()) >= 3


def one_line_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_bad_input_gives_one_line_and_exit_code_2(
    run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./runs here
    images, index = str(run["images"]), tmp_path / "e.safetensors"
    assert "no finetune or distill artifact" in one_line_error(["predict", images])
    assert "no such file or folder" in one_line_error(["predict", images, "--from", str(tmp_path / "nope")])
    assert "fine-tuned model" in one_line_error(
        ["predict", images, "--from", str(run["pretrain"] / "backbone.safetensors")]
    )
    assert "no such folder" in one_line_error(["predict", str(tmp_path / "nope"), "--from", str(run["run"])])
    assert "--top-k 0" in one_line_error(["predict", images, "--from", str(run["run"]), "--top-k", "0"])
    assert "*.safetensors" in one_line_error(["embed", images, "--from", str(run["run"]), "--out", "e.npy"])
    assert "labelfew embed" in one_line_error(["similar", images, "--index", str(index)])
    embed(EmbedConfig(images=run["images"], out=index, source=run["run"], quiet=True))
    assert "no such image" in one_line_error(["similar", str(tmp_path / "q.png"), "--index", str(index)])
    (tmp_path / "q.png").write_bytes(b"not an image")
    assert "not a readable image" in one_line_error(
        ["similar", str(tmp_path / "q.png"), "--index", str(index)]
    )
    index.with_suffix(".csv").unlink()
    assert "index CSV" in one_line_error(["similar", str(tmp_path / "q.png"), "--index", str(index)])
