"""The one inference loop: real photos through the streaming decoder and `EvalView`, as the PIL path did."""

from __future__ import annotations

import importlib.resources
import shutil
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageOps
from reference.pil_views import eval_transform
from torch import nn

from labelfew import engine
from labelfew.data.labels import LabeledImages
from labelfew.spec import ModelSpec
from labelfew.use import inference


@pytest.fixture(autouse=True)
def _on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("labelfew.use.inference.device", lambda: torch.device("cpu"))


def photos(tmp_path: Path) -> list[Path]:
    """scikit-learn's two sample photos (427 x 640 JPEG), a 120 x 90 copy of one, and a broken file."""
    folder = Path(str(importlib.resources.files("sklearn.datasets") / "images"))
    paths = [Path(shutil.copy(path, tmp_path)) for path in sorted(folder.glob("*.jpg"))]
    Image.open(paths[0]).convert("RGB").resize((120, 90), Image.Resampling.BICUBIC).save(
        tmp_path / "small.png"
    )
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff" + bytes(100))
    return [paths[0], tmp_path / "broken.jpg", paths[1], tmp_path / "small.png"]


@pytest.mark.parametrize(("image_size", "batch_size"), [(224, 2), (32, 3)])
def test_run_model_sees_the_pil_eval_transform_of_each_photo(
    tmp_path: Path, image_size: int, batch_size: int
) -> None:
    """An identity model returns its inputs: torchvision's eval transform of each photo's uint8 tensor
    (float32 rounding only), within 2/255 (before normalisation) of the old PIL path's."""
    paths = photos(tmp_path)
    spec = ModelSpec("test_resnet", image_size, small_stem=False, num_features=8, mean=(0.4, 0.5, 0.6),
                     std=(0.2, 0.3, 0.25))  # fmt: skip
    outputs = inference.run_model(nn.Flatten(), paths, spec, batch_size=batch_size, workers=0)
    assert outputs.kept == [0, 2, 3] and list(outputs.errors) == [1]
    assert outputs.errors[1] == f"cannot identify image file {str(paths[1])!r}"
    for on_tensor, tolerance in ((True, 2e-6), (False, 2 / 255 / min(spec.std) + 1e-5)):
        transform = eval_transform(image_size, spec.mean, spec.std, on_tensor=on_tensor)
        expected = torch.stack(
            [transform(Image.open(paths[index]).convert("RGB")).flatten() for index in outputs.kept]
        )
        torch.testing.assert_close(outputs.values, expected, atol=tolerance, rtol=0)


def test_held_out_accuracy_counts_each_image_once(tmp_path: Path) -> None:
    """A 'classifier' that says class 0 when the centre is red-ish: accuracy over held-out photos."""
    paths = [path for path in photos(tmp_path) if path.name != "broken.jpg"]
    labeled = LabeledImages(tuple(paths), ("a", "b", "a"), tmp_path)
    accelerator = engine.make_accelerator("no", seed=0)

    class RedOrNot(nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            red = images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))
            return torch.stack([red, -red], dim=1)

    images = inference.held_out_images(labeled, ["a", "b"], 32, None, None, batch_size=2, workers=0,
                                       accelerator=accelerator)  # fmt: skip
    transform = eval_transform(32)
    inputs = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
    expected = (RedOrNot()(inputs).argmax(dim=1) == torch.tensor([0, 1, 0])).float().mean()
    top1, loss = inference.held_out_scores(RedOrNot(), images, accelerator)
    assert top1 == pytest.approx(float(expected)) and loss > 0
    assert inference.accuracy(RedOrNot(), images, accelerator) == top1


def test_run_model_sees_a_sideways_photo_upright(tmp_path: Path) -> None:
    """EXIF Orientation 8: the model gets the eval transform of PIL's exif_transpose of the photo."""
    source = photos(tmp_path)[0]
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.open(source).save(tmp_path / "sideways.jpg", quality=95, exif=exif)
    spec = ModelSpec("test_resnet", 32, small_stem=False, num_features=8)
    outputs = inference.run_model(nn.Flatten(), [tmp_path / "sideways.jpg"], spec, batch_size=1, workers=0)
    transform = eval_transform(32, spec.mean, spec.std, on_tensor=True)
    with Image.open(tmp_path / "sideways.jpg") as stored:
        expected = transform(ImageOps.exif_transpose(stored).convert("RGB")).flatten()
    torch.testing.assert_close(outputs.values[0], expected, atol=2e-6, rtol=0)


def test_top1_and_balanced_accuracy_match_sklearn_over_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fine-tuning's `val_top1` and `val_score`: counts over every batch, then sklearn's formulas."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    from labelfew.use import inference

    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 12 + [1] * 3 + [3] * 5)  # class 2 absent: left out of the mean, as sklearn
    logits = torch.randn(len(labels), 4, generator=generator)
    logits[torch.arange(len(labels)), labels] += torch.rand(len(labels), generator=generator) * 2
    batches = [
        (types.SimpleNamespace(labels=labels[i : i + 6]), logits[i : i + 6]) for i in range(0, len(labels), 6)
    ]

    class Accelerator:
        device = torch.device("cpu")

        def gather_for_metrics(self, values: Any) -> Any:
            return values

    monkeypatch.setattr(inference, "model_outputs", lambda model, images: iter(batches))
    top1, balanced = inference.top1_and_balanced(nn.Identity(), None, Accelerator(), 4)  # type: ignore[arg-type]
    predictions = logits.argmax(dim=1).numpy()
    assert top1 == pytest.approx(accuracy_score(labels.numpy(), predictions))
    assert balanced == pytest.approx(balanced_accuracy_score(labels.numpy(), predictions))
    assert abs(top1 - balanced) > 0.01  # the imbalance shows
