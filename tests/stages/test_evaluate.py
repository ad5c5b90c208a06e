"""kNN, linear probe and metrics against plain references."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from labelfew import probes
from labelfew.artifacts import load_artifact, save_tensors, write_run_json
from labelfew.cli import app
from labelfew.config import EvaluateConfig, FinetuneConfig, PretrainConfig
from labelfew.errors import UserError
from labelfew.fileio import sha256_file
from labelfew.models import build_backbone
from labelfew.probes import knn_k, knn_scores, linear_probe_scores
from labelfew.report import tables as report
from labelfew.report.html import render_html
from labelfew.report.tables import metrics_row
from labelfew.spec import IMAGENET_MEAN, IMAGENET_STD
from labelfew.stages import evaluate, finetune, pretrain
from labelfew.use.inference import Outputs, run_model


def knn_reference(bank, bank_labels, queries, num_classes, k, temperature):
    """A plain loop: cosine similarity, k nearest, exp(sim / T) votes."""
    scores = []
    for query in queries:
        similarities = []
        for index, item in enumerate(bank):
            cosine = float(query @ item) / (float(query.norm()) * float(item.norm()))
            similarities.append((cosine, index))
        similarities.sort(key=lambda pair: -pair[0])
        votes = [0.0] * num_classes
        for cosine, index in similarities[: min(k, len(bank))]:
            votes[int(bank_labels[index])] += math.exp(cosine / temperature)
        scores.append(votes)
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.1), (5, 0.1), (200, 0.5)])
def test_knn_matches_a_plain_loop(k: int, temperature: float) -> None:
    generator = torch.Generator().manual_seed(k)
    bank = torch.randn(30, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (30,), generator=generator)
    queries = torch.randn(7, 8, generator=generator, dtype=torch.float64)
    got = knn_scores(bank, labels, queries, num_classes=4, k=k, temperature=temperature, chunk=3)
    expected = knn_reference(bank, labels, queries, 4, k, temperature)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_knn_runs_on_the_device_of_the_features(device: str) -> None:
    generator = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(30, 8, generator=generator), torch.randint(0, 4, (30,), generator=generator)
    queries = torch.randn(7, 8, generator=generator)
    got = knn_scores(bank.to(device), labels.to(device), queries.to(device), num_classes=4, k=5, chunk=3)
    assert got.device.type == device
    expected = knn_reference(bank.double(), labels, queries.double(), 4, k=5, temperature=0.07)
    torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-4, atol=1e-4)


def test_knn_defaults_are_dinos_k_20_and_temperature_0_07() -> None:
    """k=200 (capped at the bank) let every image of a few-label bank vote; DINO uses 20 and 0.07."""
    assert (EvaluateConfig(test=Path(".")).knn_k, EvaluateConfig(test=Path(".")).knn_temperature) == (
        20,
        0.07,
    )
    generator = torch.Generator().manual_seed(1)
    bank, labels = torch.randn(60, 8, generator=generator), torch.randint(0, 3, (60,), generator=generator)
    queries = torch.randn(5, 8, generator=generator)
    expected = knn_reference(bank.double(), labels, queries.double(), 3, k=20, temperature=0.07)
    torch.testing.assert_close(knn_scores(bank, labels, queries, 3).double(), expected, rtol=1e-4, atol=1e-4)


def test_knn_is_scale_invariant_and_finds_identical_points() -> None:
    bank = torch.eye(3)
    scores = knn_scores(bank, torch.tensor([0, 1, 2]), 5 * torch.eye(3), num_classes=3, k=1)
    assert scores.argmax(dim=1).tolist() == [0, 1, 2]


def test_linear_probe_separates_separable_classes_and_chooses_c() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 5
    train_y = np.repeat(np.arange(3), 20)
    train_x = centres[train_y] + rng.normal(size=(60, 3))
    test_y = np.repeat(np.arange(3), 10)
    test_x = centres[test_y] + rng.normal(size=(30, 3))
    scores, chosen = linear_probe_scores(train_x, train_y, test_x, num_classes=3)
    assert chosen in probes.PROBE_C_GRID
    assert (scores.argmax(axis=1) == test_y).mean() > 0.9
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-6)


def test_linear_probe_chooses_the_c_that_sklearns_grid_search_picks_on_the_same_split() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, train_test_split

    rng = np.random.default_rng(4)  # overlapping classes in 8 dimensions: C matters, and 10 and 100 tie
    train_y = np.repeat(np.arange(3), 20)
    train_x = rng.normal(size=(3, 8))[train_y] + rng.normal(size=(60, 8))
    _, chosen = linear_probe_scores(train_x, train_y, train_x[:3], num_classes=3, holdout=0.2, seed=0)
    # The reference: the same features, stratified hold-out split and seed, through GridSearchCV.
    normalised = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    fit, held = train_test_split(np.arange(60), test_size=0.2, stratify=train_y, random_state=0)
    grid = GridSearchCV(LogisticRegression(max_iter=2000, random_state=0), {"C": list(probes.PROBE_C_GRID)},
                        cv=[(fit, held)], scoring="accuracy").fit(normalised, train_y)  # fmt: skip
    edges = (probes.PROBE_C_GRID[0], probes.PROBE_C_GRID[-1])
    assert grid.best_params_["C"] not in edges  # a real choice: neither the first nor the last of a tie
    assert chosen == grid.best_params_["C"]


def test_linear_probe_with_one_label_per_class_uses_default_c() -> None:
    train_x = np.array([[1.0, 0.0], [0.0, 1.0]])
    scores, chosen = linear_probe_scores(train_x, np.array([0, 1]), train_x, num_classes=3)
    assert chosen is None
    assert scores.shape == (2, 3)
    assert scores[:, 2].sum() == 0  # a class absent from the bank gets no probability
    assert scores.argmax(axis=1).tolist() == [0, 1]


def test_metrics_row_top1_top5_balanced_and_confusion() -> None:
    names = [str(index) for index in range(6)]
    labels = np.array([0, 0, 0, 1, 2, 3])
    scores = np.zeros((6, 6))
    scores[np.arange(6), [0, 0, 1, 1, 2, 5]] = 1.0  # 4 of 6 right
    scores[5, 3] = 0.5  # the last is right in the top 5
    row = metrics_row("kNN", scores, labels, names, {})
    assert row["top1"] == pytest.approx(4 / 6)
    assert row["top5"] == pytest.approx(1.0)
    # per class: 0 -> 2/3, 1 -> 1, 2 -> 1, 3 -> 0
    assert row["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 1 + 0) / 4)
    assert row["per_class_accuracy"]["0"] == pytest.approx(2 / 3)
    assert row["per_class_accuracy"]["4"] is None
    assert np.array(row["confusion_matrix"]).sum() == 6
    assert row["confusion_matrix"][0][1] == 1


def test_metrics_row_has_no_top5_below_five_classes() -> None:
    row = metrics_row("x", np.eye(2), np.array([0, 1]), ["a", "b"], {})
    assert row["top5"] is None
    assert row["top1"] == 1.0


# --- Test images inside the bank or the fine-tuning labels (DESIGN.md trap 8) ------------------


@pytest.fixture(scope="module")
def tiny_run(digits_folder: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 1-epoch pretrain on 100 digits; a 10-image bank and 20 test images, disjoint."""
    train, test = digits_folder
    work = tmp_path_factory.mktemp("tiny-run")
    for name, source, count in (("unlabeled", train, 10), ("bank", train, 1), ("test", test, 2)):
        for folder in sorted(source.iterdir()):
            (work / name / folder.name).mkdir(parents=True)
            for path in sorted(folder.iterdir())[:count]:
                shutil.copy(path, work / name / folder.name / path.name)
    pretrain.run(PretrainConfig(data=work / "unlabeled", out=work / "run", arch="test_resnet", small_stem=False,
                                epochs=1, batch_size=50, workers=0, quiet=True))  # fmt: skip
    return {"work": work, "run": work / "run", "bank": work / "bank", "test": work / "test"}


def _evaluate(run: dict[str, Path], bank: Path, **options: Any) -> dict[str, Any]:
    config = EvaluateConfig(test=run["test"], source=run["run"], bank=bank, out=run["work"] / "evaluate",
                            workers=0, quiet=True, **options)  # fmt: skip
    return evaluate.run(config)


def test_separate_sets_pass_and_k_is_capped_by_the_smallest_class_of_the_bank(
    tiny_run: dict[str, Path],
) -> None:
    """k = 20 over a bank of 10 labels (one per class) was a vote of every bank image, won by the
    classes with more labels; capped by the smallest class, one neighbour decides."""
    result = _evaluate(tiny_run, tiny_run["bank"])
    assert result["overlap"] == []
    knn = next(row for row in result["rows"] if row["method"] == "kNN")
    assert knn["details"]["k"] == 1 and knn["details"]["k_requested"] == 20
    assert "smallest class" in knn["details"]["k_cap"]
    assert knn["details"]["seen_test_images"] == 0
    console = report.console
    with console.capture() as captured:
        report.print_report(result)
    assert "k capped from 20 to 1: the bank's smallest class, '0', has 1" in captured.get()
    assert "test images seen" not in captured.get()  # the column only comes with an overlap


def test_k_is_capped_by_the_smallest_class_against_a_plain_vote() -> None:
    bank_labels = torch.tensor([0] * 6 + [1] * 2 + [2] * 4)
    k, capped = knn_k(20, bank_labels, ["a", "b", "c"])
    assert (k, capped["k_requested"]) == (2, 20) and "'b', has 2" in capped["k_cap"]
    assert knn_k(2, bank_labels, ["a", "b", "c"]) == (2, {})
    # a query on a class-1 image: with k = 12 (the bank) the 6 class-0 images outvote it; with k = 2 it wins
    bank = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(6, 1), torch.tensor([[0.0, 1.0]]).repeat(2, 1),
                      torch.tensor([[-1.0, 0.0]]).repeat(4, 1)])  # fmt: skip
    query = torch.tensor([[0.6, 0.8]])
    assert knn_scores(bank, bank_labels, query, 3, k=k, temperature=10.0).argmax().item() == 1
    assert knn_scores(bank, bank_labels, query, 3, k=12, temperature=10.0).argmax().item() == 0


def test_a_test_image_in_the_pretraining_folder_is_refused_or_counted(
    tiny_run: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard looked at the bank and the labels only; pretrain's folder (run.json) was never read."""
    test_image = sorted(tiny_run["test"].rglob("*.png"))[0]
    copy = tiny_run["work"] / "unlabeled" / "0" / "re-encoded.jpg"
    with Image.open(test_image) as image:
        image.convert("RGB").resize((48, 48)).save(copy, quality=60)
    try:
        with pytest.raises(
            UserError, match=r"1 test image\(s\) are also in the pretraining folder .*unlabeled"
        ):
            _evaluate(tiny_run, tiny_run["bank"])
        result = _evaluate(tiny_run, tiny_run["bank"], allow_overlap=True)
    finally:
        copy.unlink()
    assert [item["images"] for item in result["overlap"]] == [1]
    assert {row["method"]: row["details"]["seen_test_images"] for row in result["rows"]} == {
        "kNN": 1, "linear probe": 1,
    }  # fmt: skip
    assert (tiny_run["work"] / "evaluate" / "image_hashes.npz").is_file()
    monkeypatch.setattr(report, "console", Console(width=200))
    with report.console.capture() as captured:
        report.print_report(result)
    assert "test images seen" in captured.get()


def test_undecodable_test_images_are_counted_and_named(tiny_run: dict[str, Path]) -> None:
    test = tiny_run["work"] / "test-with-a-bad-file"
    shutil.copytree(tiny_run["test"], test)
    listed = len(list(test.rglob("*.png")))
    (test / "0" / "broken.png").write_bytes(b"not a png")
    config = EvaluateConfig(test=test, source=tiny_run["run"], bank=tiny_run["bank"], out=tiny_run["work"] / "evaluate",
                            workers=0, quiet=True)  # fmt: skip
    result = evaluate.run(config)
    assert (result["test"]["images"], result["test"]["listed"], result["test"]["skipped"]) == (
        listed,
        listed + 1,
        1,
    )
    assert "broken.png" in result["test"]["skipped_files"][0]
    assert sum(sum(row) for row in result["rows"][0]["confusion_matrix"]) == listed
    with report.console.capture() as captured:
        report.print_report(result)
    assert (
        f"{listed} test images" in captured.get()
        and "1 of" in captured.get()
        and "broken.png" in captured.get()
    )


def test_several_label_sets_without_bank_are_refused_before_any_work(
    tiny_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"] / "pretrain", run / "pretrain")
    spec = dataclasses.replace(load_artifact(run / "pretrain" / "backbone.safetensors").spec,
                               class_names=tuple(str(digit) for digit in range(10)))  # fmt: skip
    for name, labels in (("ft-a", tiny_run["bank"]), ("ft-b", tiny_run["test"])):
        digest = save_tensors(run / name / "model.safetensors", {"w": torch.ones(1)},
                              {"stage": "finetune", **spec.to_metadata()})  # fmt: skip
        write_run_json(run / name, {"stage": "finetune", "labels": {"path": str(labels)},
                                    "artifacts": {"model.safetensors": {"sha256": digest}}})  # fmt: skip
    monkeypatch.setattr(evaluate, "guard", lambda *args, **kwargs: pytest.fail("hashing started"))
    monkeypatch.setattr(
        "labelfew.use.inference.run_model", lambda *args, **kwargs: pytest.fail("a model ran")
    )
    with pytest.raises(UserError, match=r"fine-tuned on 2 label sets .*pass --bank"):
        evaluate.run(EvaluateConfig(test=tiny_run["test"], source=run, workers=0, quiet=True))


def test_test_images_in_the_bank_are_refused_by_path_and_by_content(tiny_run: dict[str, Path]) -> None:
    bank = tiny_run["work"] / "bank-with-test"
    shutil.copytree(tiny_run["bank"], bank)
    test_images = sorted(tiny_run["test"].rglob("*.png"))
    shutil.copy(test_images[0], bank / test_images[0].parent.name / "renamed-copy.png")  # same bytes
    with pytest.raises(
        UserError, match=r"1 test image\(s\) are also in the kNN bank, e\.g\. .*--allow-overlap"
    ):
        _evaluate(tiny_run, bank)
    labels = bank / "with-paths.csv"
    rows = [
        f"{path},{path.parent.name}" for path in [*sorted(tiny_run["bank"].rglob("*.png")), *test_images[:3]]
    ]
    labels.write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(UserError, match=r"3 test image\(s\) are also in the kNN bank"):
        _evaluate(tiny_run, labels)
    result = _evaluate(tiny_run, labels, allow_overlap=True)
    assert result["overlap"] == [{"with": "the kNN bank", "images": 3, "example": str(test_images[0])}]
    assert (
        json.loads((tiny_run["work"] / "evaluate" / "report.json").read_text())["overlap"][0]["images"] == 3
    )


def test_test_images_among_a_models_fine_tuning_labels_are_refused(tiny_run: dict[str, Path]) -> None:
    labels = tiny_run["work"] / "leaky-labels"
    shutil.copytree(tiny_run["bank"], labels)
    leaked = sorted(tiny_run["test"].rglob("*.png"))[:2]
    for path in leaked:
        shutil.copy(path, labels / path.parent.name / f"leak-{path.name}")
    out = tiny_run["work"] / "run" / "finetune-leaky"
    finetune.run(FinetuneConfig(labels=labels, source=tiny_run["run"], out=out, epochs=1, lr=0.01,
                                workers=0, quiet=True))  # fmt: skip
    assert len(json.loads((out / "run.json").read_text())["labels"]["content_sha256"]) == 12
    shutil.rmtree(labels)  # the run.json's hashes are enough
    with pytest.raises(
        UserError, match=r"2 test image\(s\) are also in the fine-tuning labels of .*finetune-leaky"
    ):
        _evaluate(tiny_run, tiny_run["bank"])
    shutil.rmtree(out)


# --- evaluate --init: the features of weights that already exist, named by their start -----------


def _weights_file(folder: Path) -> Path:
    """A bare test_resnet state dict (no architecture recorded), as another tool would save it."""
    torch.manual_seed(3)
    path = folder / "weights.safetensors"
    save_file(build_backbone("test_resnet", small_stem=False).state_dict(), str(path))
    return path


def _reference_features(weights: Path, paths: list[Path]) -> torch.Tensor:
    """The plain reference: build the backbone, load the file, the eval view by hand (32 px digits:
    no resize, no crop; ImageNet's mean/std, as the file records none).

    Shape: -> (len(paths), num_features)
    """
    backbone = build_backbone("test_resnet", small_stem=False)
    backbone.load_state_dict(load_file(str(weights)))
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    images = []
    for path in paths:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.shape == (32, 32, 3)
        images.append((torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255 - mean) / std)
    with torch.no_grad():
        return backbone.eval()(torch.stack(images))


def test_init_alone_scores_its_own_features_as_a_plain_backbone_would(
    tiny_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("labelfew.use.inference.device", lambda: torch.device("cpu"))  # the reference's
    weights = _weights_file(tmp_path)
    ran: list[tuple[list[Path], Outputs]] = []

    def recording(model: torch.nn.Module, paths: list[Path], spec: Any, *args: Any, **kwargs: Any) -> Outputs:
        assert (spec.arch, spec.image_size, spec.init) == ("test_resnet", 32, str(weights))
        outputs = run_model(model, paths, spec, *args, **kwargs)
        ran.append((paths, outputs))
        return outputs

    monkeypatch.setattr("labelfew.use.inference.run_model", recording)
    result = evaluate.run(EvaluateConfig(test=tiny_run["test"], init=str(weights), arch="test_resnet",
                                         bank=tiny_run["bank"], out=tmp_path / "evaluate", workers=0, quiet=True))  # fmt: skip
    names = ["kNN (init weights.safetensors)", "linear probe (init weights.safetensors)"]
    assert [row["method"] for row in result["rows"]] == names
    written = json.loads((tmp_path / "evaluate" / "report.json").read_text())
    assert [row["method"] for row in written["rows"]] == names
    assert written["models"]["init"]["sha256"] == sha256_file(weights)
    assert written["models"]["init"]["image_size"] == 32 and written["models"]["pretrain"] is None
    assert written["rows"][0]["details"]["init"]["source"] == str(weights)
    (bank_paths, bank), (test_paths, test) = ran  # the bank, then the test images
    features = [_reference_features(weights, paths) for paths in (bank_paths, test_paths)]
    torch.testing.assert_close(bank.values, features[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(test.values, features[1], rtol=1e-4, atol=1e-4)
    classes = result["class_names"]
    bank_labels = torch.tensor([classes.index(path.parent.name) for path in bank_paths])
    test_labels = np.array([classes.index(path.parent.name) for path in test_paths])
    knn = knn_scores(features[0], bank_labels, features[1], len(classes), k=1, temperature=0.07)
    assert (
        result["rows"][0]["confusion_matrix"]
        == metrics_row("", knn.numpy(), test_labels, classes, {})["confusion_matrix"]
    )


def test_every_row_names_its_start_in_the_table_the_json_and_the_page(
    tiny_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pretrain run that started from --init weights is `init + SSL`; --init beside it is `init NAME`."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"] / "pretrain", run / "pretrain")
    artifact = load_artifact(run / "pretrain" / "backbone.safetensors")
    spec = dataclasses.replace(artifact.spec, init="timm:test_resnet.r160_in1k", init_sha256="ab" * 32)
    metadata = {**artifact.metadata, **spec.to_metadata()}
    digest = save_tensors(run / "pretrain" / "backbone.safetensors", artifact.tensors, metadata)
    record = json.loads((run / "pretrain" / "run.json").read_text())
    record["artifacts"]["backbone.safetensors"]["sha256"] = digest
    (run / "pretrain" / "run.json").write_text(json.dumps(record))
    weights = _weights_file(tmp_path)
    result = evaluate.run(EvaluateConfig(test=tiny_run["test"], source=run, init=str(weights), arch="test_resnet",
                                         bank=tiny_run["bank"], workers=0, quiet=True))  # fmt: skip
    names = ["kNN (init + SSL)", "linear probe (init + SSL)", "kNN (init weights.safetensors)",
             "linear probe (init weights.safetensors)"]  # fmt: skip
    assert [row["method"] for row in result["rows"]] == names
    assert [
        row["method"] for row in json.loads((run / "evaluate" / "report.json").read_text())["rows"]
    ] == names
    monkeypatch.setattr(report, "console", Console(width=250))
    with report.console.capture() as captured:
        report.print_report(result)
    table = captured.get()
    assert "init + SSL" in table and "init weights.safetensors" in table
    assert f"init sha256 {sha256_file(weights)[:12]}" in table
    page = render_html(result, run / "evaluate", [], [])
    assert all(name in page for name in names)


def test_a_bad_init_exits_2_before_any_image_is_opened(
    tiny_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not weights at all")
    monkeypatch.setattr(evaluate, "guard", lambda *args, **kwargs: pytest.fail("hashing started"))
    monkeypatch.setattr(
        "labelfew.use.inference.run_model", lambda *args, **kwargs: pytest.fail("a model ran")
    )
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: pytest.fail("an image was opened"))
    runner = CliRunner()
    args = ["evaluate", "--test", str(tiny_run["test"]), "--bank", str(tiny_run["bank"]), "--init", str(bad)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--init" in result.output and "not a readable safetensors file" in result.output
    assert "Traceback" not in result.output
    bare = _weights_file(tmp_path)
    result = runner.invoke(app, [*args[:-1], str(bare)])
    assert result.exit_code == 2 and "pass --arch" in result.output
    result = runner.invoke(app, ["evaluate", "--test", str(tiny_run["test"]), "--arch", "test_resnet"])
    assert result.exit_code == 2 and "only with --init" in result.output


def test_balanced_accuracy_is_sklearns_on_an_imbalanced_set() -> None:
    from sklearn.metrics import balanced_accuracy_score

    generator = np.random.default_rng(0)
    labels = np.array([0] * 40 + [1] * 7 + [2] * 3)
    scores = generator.random((len(labels), 3))
    scores[np.arange(len(labels)), labels] += generator.random(len(labels)) * 0.8
    row = metrics_row("x", scores, labels, ["a", "b", "c"], {})
    assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, scores.argmax(axis=1)))
    assert abs(row["balanced_accuracy"] - row["top1"]) > 0.01


def test_an_imbalanced_test_set_is_recorded_and_every_row_has_sklearns_balanced_accuracy(
    tiny_run: dict[str, Path],
) -> None:
    from sklearn.metrics import balanced_accuracy_score

    test = tiny_run["work"] / "test-skewed"  # class 0: 2 images, the others 1 (2×: from 1.5× on)
    for index, folder in enumerate(sorted(tiny_run["test"].iterdir())):
        (test / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[: 2 if index == 0 else 1]:
            shutil.copy(path, test / folder.name / path.name)
    result = _evaluate({**tiny_run, "test": test}, tiny_run["bank"])
    skew = result["test"]["imbalance"]
    assert (skew["largest"], skew["smallest_images"], skew["ratio"], skew["headline"]) == (
        "0",
        1,
        2.0,
        "balanced_accuracy",
    )
    assert result["test"]["class_counts"]["0"] == 2
    for row in result["rows"]:  # kNN and the linear probe here; a fine-tuned model's row is made the same way
        matrix = np.array(row["confusion_matrix"])
        truth = np.repeat(np.arange(len(matrix)), matrix.sum(axis=1))
        predicted = np.concatenate([np.repeat(np.arange(len(matrix)), line) for line in matrix])
        assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, predicted))
