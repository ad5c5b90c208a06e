"""Every command that runs a model feeds it the pixels it was trained on: its spec's channels and window.

Small artifacts of 1 and 4 channels are made by hand (`ModelSpec` + `build_model`, saved as the stages
save them) and each command's outputs are compared with a hand-written path: the file decoded by
`labelfew.data.pixels.decode_array` with the spec's `Decoding`, scaled to [0, 1] and normalised with
the spec's mean/std (the images are 32 px squares and the models take 32 px, so the evaluation view
is the whole image), run through the model.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from medical_images import deep_pixels, digits, write_deep, write_deep_folder, write_multichannel_folder
from PIL import Image
from safetensors import safe_open
from torch import nn

from labelfew import engine
from labelfew.artifacts import load_artifact, save_tensors, write_run_json
from labelfew.config import (
    DistillConfig,
    EmbedConfig,
    EvaluateConfig,
    PredictConfig,
    SelectConfig,
    SimilarConfig,
)
from labelfew.data.images import find_images
from labelfew.data.labels import read_labels
from labelfew.data.pixels import decode_array
from labelfew.data.survey import survey_images
from labelfew.engine.init_weights import read_init
from labelfew.engine.student import build_student, student_start
from labelfew.models import build_model, load_model
from labelfew.spec import Decoding, ModelSpec
from labelfew.stages import distill, evaluate, select
from labelfew.use.embed import embed
from labelfew.use.frozen_init import init_backbone
from labelfew.use.held_out import frozen_features
from labelfew.use.inference import held_out_images, held_out_scores, run_model
from labelfew.use.predict import predict
from labelfew.use.similar import similar

WINDOW = (300.0, 3500.0)
"""A window of the 12-bit digits that is not their own (0.5%, 99.5%) percentiles."""


@pytest.fixture(autouse=True)
def _on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("labelfew.use.inference.device", lambda: torch.device("cpu"))


@pytest.fixture(scope="module")
def gray(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12-bit grayscale digits in 16-bit PNGs, two classes of 4."""
    return write_deep_folder(tmp_path_factory.mktemp("gray") / "images", per_class=4, classes=2, bits=12)


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4-channel TIFF digits, two classes of 3."""
    return write_multichannel_folder(
        tmp_path_factory.mktemp("four") / "images", channels=4, per_class=3, classes=2
    )


def _spec(channels: int, window: tuple[float, float] | None = None, **more: object) -> ModelSpec:
    mean, std = tuple(0.2 + 0.1 * c for c in range(channels)), tuple(0.3 + 0.05 * c for c in range(channels))
    return ModelSpec("test_resnet", 32, True, 96, mean, std, channels=channels, window=window, **more)  # type: ignore[arg-type]


def _save(spec: ModelSpec, path: Path, stage: str, seed: int = 0) -> nn.Module:
    """A random model of `spec` (its classifier random too, so the classes differ) saved as `stage`'s artifact."""
    import labelfew.stages  # noqa: F401  (registers the stages)

    torch.manual_seed(seed)
    model = build_model(spec)
    if spec.class_names is not None:
        nn.init.normal_(model.classifier.weight, std=2.0)  # type: ignore[union-attr]
    digest = save_tensors(path, model.state_dict(), {"stage": stage, **spec.to_metadata()})
    write_run_json(path.parent, {"stage": stage, "artifacts": {path.name: {"sha256": digest}}})
    return model.eval()


def _reference(model: nn.Module, paths: list[Path], spec: ModelSpec) -> torch.Tensor:
    """The hand-written path: decode_array with the spec's decoding, /255, normalise, model."""
    rows = []
    mean, std = torch.tensor(spec.mean)[:, None, None], torch.tensor(spec.std)[:, None, None]
    for path in paths:
        pixels = torch.from_numpy(decode_array(path, spec.decoding)).permute(2, 0, 1).float() / 255
        assert pixels.shape == (spec.channels, 32, 32)
        rows.append((pixels - mean) / std)
    with torch.no_grad():
        return model.eval()(torch.stack(rows)).float()


def test_predict_feeds_a_windowed_one_channel_model_its_pixels(gray: Path, tmp_path: Path) -> None:
    spec = _spec(1, WINDOW, class_names=("0", "1"))
    model = _save(spec, tmp_path / "run" / "finetune" / "model.safetensors", "finetune")
    out = tmp_path / "predictions.csv"
    predict(
        PredictConfig(
            images=gray, out=out, source=tmp_path / "run" / "finetune", top_k=2, workers=0, quiet=True
        )
    )
    with out.open(newline="") as stream:
        rows = {
            Path(row["path"]).parent.name + "/" + Path(row["path"]).name: row
            for row in csv.DictReader(stream)
        }
    paths = find_images(gray)
    probabilities = torch.softmax(_reference(model, paths, spec), dim=1)
    for path, expected in zip(paths, probabilities, strict=True):
        row = rows[f"{path.parent.name}/{path.name}"]
        assert row["error"] == ""
        assert float(row["confidence"]) == pytest.approx(float(expected.max()), abs=2e-4)
        assert row["label"] == spec.class_names[int(expected.argmax())]  # type: ignore[index]


def test_embed_feeds_a_four_channel_backbone_its_channels(four: Path, tmp_path: Path) -> None:
    spec = _spec(4)
    model = _save(spec, tmp_path / "run" / "pretrain" / "backbone.safetensors", "pretrain")
    out = tmp_path / "embeddings.safetensors"
    embed(EmbedConfig(images=four, out=out, source=tmp_path / "run" / "pretrain", workers=0, quiet=True))
    with safe_open(str(out), framework="pt") as reader:
        embeddings, metadata = reader.get_tensor("embeddings"), reader.metadata()
    expected = nn.functional.normalize(_reference(model, find_images(four), spec), dim=1)
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=1e-4)
    assert ModelSpec.from_metadata(metadata).channels == 4  # `similar` embeds its queries the same way


def test_evaluate_runs_each_model_with_its_own_window(gray: Path, tmp_path: Path) -> None:
    """A classifier and a backbone of different windows: each one's outputs are its own reference's."""
    labeled = read_labels(gray)
    paths, classes = list(labeled.paths), ["0", "1"]
    tuned = _spec(1, WINDOW, class_names=tuple(classes))
    model = _save(tuned, tmp_path / "finetune" / "model.safetensors", "finetune")
    logits, labels = evaluate.finetuned_logits(load_artifact(tmp_path / "finetune" / "model.safetensors"), labeled,
                                               classes, workers=0)  # fmt: skip
    torch.testing.assert_close(logits, _reference(model, paths, tuned), atol=1e-5, rtol=1e-4)
    assert labels.tolist() == labeled.label_indices(classes)
    pretrained = _spec(1, (0.0, 4095.0))
    backbone = _save(pretrained, tmp_path / "pretrain" / "backbone.safetensors", "pretrain", seed=1)
    artifact = load_artifact(tmp_path / "pretrain" / "backbone.safetensors")
    features, _ = evaluate.backbone_features(artifact, labeled, classes, workers=0)
    torch.testing.assert_close(features, _reference(backbone, paths, pretrained), atol=1e-5, rtol=1e-4)


def test_fine_tunings_held_out_scores_decode_as_the_model(gray: Path, tmp_path: Path) -> None:
    """`held_out_images(..., decoding=)` (validation) and `frozen_features` (`--method linear`) with a
    windowed 1-channel model: the held-out cross-entropy and the features are the reference's."""
    labeled, classes = read_labels(gray), ["0", "1"]
    spec = _spec(1, WINDOW, class_names=tuple(classes))
    model = _save(spec, tmp_path / "finetune" / "model.safetensors", "finetune")
    accelerator = engine.make_accelerator("no", seed=0)
    images = held_out_images(labeled, classes, 32, spec.mean, spec.std, batch_size=3, workers=0,
                             accelerator=accelerator, decoding=spec.decoding)  # fmt: skip
    logits = _reference(model, list(labeled.paths), spec)
    targets = torch.tensor(labeled.label_indices(classes))
    top1, loss = held_out_scores(model, images, accelerator)
    assert top1 == pytest.approx(float((logits.argmax(dim=1) == targets).float().mean()))
    assert loss == pytest.approx(float(nn.functional.cross_entropy(logits, targets)), rel=1e-4)
    features, kept, bad = frozen_features(model, list(labeled.paths), spec, 4, 0, skip_bad=False, quiet=True)
    torch.testing.assert_close(features, logits, atol=1e-5, rtol=1e-4)
    assert (kept, bad) == (list(range(len(labeled))), [])


@pytest.fixture(scope="module")
def rgb_init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An RGB labelfew backbone with equal per-channel mean and std (so its 1-channel sum is exact)."""
    spec = ModelSpec("test_resnet", 32, True, 96, (0.4,) * 3, (0.3,) * 3)
    path = tmp_path_factory.mktemp("init") / "rgb" / "pretrain" / "backbone.safetensors"
    _save(spec, path, "pretrain", seed=3)
    return path


def test_an_rgb_init_is_summed_into_the_gray_datas_one_channel(gray: Path, rgb_init: Path) -> None:
    """`--init` on 12-bit gray images: surveyed as 1 channel with the percentile window, and its features
    are the RGB model's on the same gray pixels copied to three channels."""
    paths = find_images(gray)
    own = init_backbone(read_init(str(rgb_init)), paths)
    survey = survey_images(paths)
    assert (own.spec.channels, own.spec.window) == (1, survey.window) and survey.window is not None
    features = run_model(own.model, paths, own.spec, workers=0).values
    rgb = load_model(load_artifact(rgb_init))
    three = ModelSpec("test_resnet", 32, True, 96, (0.4,) * 3, (0.3,) * 3, channels=3, window=survey.window)
    torch.testing.assert_close(features, _reference(rgb, paths, three), atol=1e-4, rtol=1e-4)
    given = init_backbone(read_init(str(rgb_init)), paths, decoding=Decoding(3, WINDOW))
    assert (given.spec.channels, given.spec.window) == (3, WINDOW)  # a run's decoding wins over the survey


def test_similar_embeds_the_query_as_the_init_index_was(rgb_init: Path, tmp_path: Path) -> None:
    """`embed --init` on 12-bit gray files of different brightness records the survey's window (not any
    one file's own); `similar` decodes its query with it, so a copy of an indexed file finds that file
    at similarity 1."""
    folder = tmp_path / "images"
    for index, (image, _) in enumerate(digits(3, classes=2)):
        write_deep(folder / f"{index}.png", deep_pixels(image * (0.3 + 0.12 * index), seed=index))
    out = tmp_path / "index.safetensors"
    embed(EmbedConfig(images=folder, out=out, init=str(rgb_init), workers=0, quiet=True))
    recorded = ModelSpec.from_metadata(load_artifact(out).metadata)
    assert (recorded.channels, recorded.window) == (1, survey_images(find_images(folder)).window)
    original = folder / "1.png"
    query = Path(shutil.copy(original, tmp_path / "query.png"))
    best = similar(SimilarConfig(query=query, index=out, top_k=1))[0]
    assert best.path.resolve() == original.resolve() and best.similarity == pytest.approx(1.0, abs=1e-5)


def test_evaluate_init_sees_the_images_as_the_runs_backbone(
    gray: Path, rgb_init: Path, tmp_path: Path
) -> None:
    """`evaluate --init` beside a 1-channel windowed run: the init is summed to 1 channel and decodes with
    the run's window (every row sees the same pixels), and its kNN row is scored."""
    _save(_spec(1, WINDOW), tmp_path / "run" / "pretrain" / "backbone.safetensors", "pretrain")
    result = evaluate.run(EvaluateConfig(test=gray, bank=gray, source=tmp_path / "run", init=str(rgb_init),
                                         allow_overlap=True, knn_k=3, workers=0, quiet=True))  # fmt: skip
    assert (result["models"]["init"]["channels"], result["models"]["init"]["window"]) == (1, WINDOW)
    methods = [row["method"] for row in result["rows"]]
    assert any(method.startswith("kNN (init") for method in methods), methods


def test_the_label_page_shows_twelve_bit_images_as_gray_through_the_window(
    gray: Path, rgb_init: Path
) -> None:
    out = gray.parent / "picks" / "to-label.csv"
    select.run(SelectConfig(folder=gray, budget=3, out=out, init=str(rgb_init), workers=0, quiet=True))
    thumbnails = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', out.with_suffix(".html").read_text())
    assert len(thumbnails) == 3
    for data in thumbnails:
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        pixels = np.asarray(image)
        assert image.mode == "L"
        assert int(pixels.max()) - int(pixels.min()) >= 200  # today's /65535 scale spans 16 levels
    record = json.loads(out.with_suffix(".json").read_text())["init"]  # the survey's decoding, recorded
    assert (record["channels"], record["window"]) == (1, list(survey_images(find_images(gray)).window or ()))


def test_the_four_channel_page_says_it_shows_the_first_three(four: Path, tmp_path: Path) -> None:
    _save(_spec(4), tmp_path / "run" / "pretrain" / "backbone.safetensors", "pretrain")
    out = tmp_path / "to-label.csv"
    select.run(SelectConfig(folder=four, budget=2, out=out, source=tmp_path / "run", workers=0, quiet=True))
    text = out.with_suffix(".html").read_text()
    assert "4 channels; pictures show the first three" in text
    image = Image.open(io.BytesIO(base64.b64decode(re.findall(r"base64,([^\"]+)\"", text)[0])))
    assert image.mode == "RGB"


def test_the_student_takes_the_teachers_channels_and_window(gray: Path, tmp_path: Path) -> None:
    spec = _spec(1, WINDOW, class_names=("0", "1"))
    _save(spec, tmp_path / "run" / "finetune" / "model.safetensors", "finetune")
    config = DistillConfig(unlabeled=gray, source=tmp_path / "run", arch="resnet10t", epochs=1, batch_size=4,
                           workers=0, quiet=True)  # fmt: skip
    student = load_artifact(distill.run(config))
    assert (student.spec.channels, student.spec.window, student.spec.mean) == (1, WINDOW, spec.mean)
    model = load_model(student)
    first = next(module for module in model.modules() if isinstance(module, nn.Conv2d))
    assert first.in_channels == 1
    logits = run_model(model, find_images(gray), student.spec, workers=0).values
    torch.testing.assert_close(
        logits, _reference(model, find_images(gray), student.spec), atol=1e-5, rtol=1e-4
    )


def test_an_init_student_of_a_one_channel_teacher_sums_the_rgb_conv(rgb_init: Path, tmp_path: Path) -> None:
    """`distill --init` RGB weights for a 1-channel teacher: the student's first conv is the RGB one summed
    over the colour axis (timm's rule), its other weights the init's as they are."""
    teacher = _spec(1, WINDOW, class_names=("0", "1"))
    teacher = dataclasses.replace(teacher, mean=(0.4,), std=(0.3,))  # the init's mean/std, averaged
    config = DistillConfig(unlabeled=tmp_path, init=str(rgb_init), workers=0, quiet=True)
    student = build_student(student_start(config, load_artifact(_teacher(teacher, tmp_path))), teacher)
    rgb = load_artifact(rgb_init).tensors
    key = next(name for name, value in rgb.items() if value.ndim == 4)  # the stem's first conv
    state = student.backbone.state_dict()
    torch.testing.assert_close(state[key], rgb[key].sum(dim=1, keepdim=True))
    other = next(name for name, value in rgb.items() if value.ndim == 4 and name != key)
    torch.testing.assert_close(state[other], rgb[other])


def _teacher(spec: ModelSpec, folder: Path) -> Path:
    path = folder / "run" / "finetune" / "model.safetensors"
    _save(spec, path, "finetune")
    return path
