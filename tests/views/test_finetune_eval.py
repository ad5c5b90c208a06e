"""Fine-tuning's crop + flip and the evaluation view, batched, against the per-image PIL reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference.pil_views import eval_transform
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from labelfew.data.batches import pad_images
from labelfew.data.images import load_resized
from labelfew.spec import IMAGENET_MEAN, IMAGENET_STD, eval_resize_side
from labelfew.views.evaluate import EvalView
from labelfew.views.finetune import CropFlipViews


def photo(tmp_path: Path, height: int, width: int, seed: int = 0) -> Path:
    """A smooth random photo (a bicubic upsampling of noise) saved as PNG."""
    small = np.random.default_rng(seed).integers(
        0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8
    )
    path = tmp_path / f"{height}x{width}-{seed}.png"
    Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC).save(path)
    return path


@pytest.mark.parametrize("image_size", [32, 96])
def test_crop_flip_views_shape_randomness_and_seed(image_size: int) -> None:
    images, sizes = pad_images([torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8)] * 4)
    views = CropFlipViews(image_size)
    first = views(images, sizes, torch.Generator().manual_seed(0))
    again = views(images, sizes, torch.Generator().manual_seed(0))
    other = views(images, sizes, torch.Generator().manual_seed(1))
    assert first.shape == (4, 3, image_size, image_size) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])  # per image, not one crop for the batch
    assert views.min_scale == (0.25 if image_size <= 64 else 0.08)


def test_crop_flip_of_a_full_crop_is_the_image_or_its_mirror() -> None:
    images, sizes = pad_images([torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)] * 64)
    views = CropFlipViews(16, mean=(0, 0, 0), std=(1, 1, 1), min_scale=1.0)(images, sizes, torch.Generator())
    plain = images[0].float() / 255
    mirrored = [torch.allclose(view, plain.flip(-1), atol=1e-5) for view in views]
    assert all(m or torch.allclose(view, plain, atol=1e-5) for m, view in zip(mirrored, views, strict=True))
    assert 16 < sum(mirrored) < 48


@pytest.mark.parametrize(
    ("image_size", "height", "width"),
    [(224, 375, 500), (224, 500, 333), (96, 200, 150), (32, 48, 40), (32, 32, 32)],
)
def test_eval_view_of_a_stored_image_equals_the_pil_eval_transform(
    tmp_path: Path, image_size: int, height: int, width: int
) -> None:
    """Stored at the evaluation side (as both image sources store it), the view is only a crop."""
    path = photo(tmp_path, height, width)
    stored = load_resized(path, eval_resize_side(image_size))
    images, sizes = pad_images([stored, np.zeros((eval_resize_side(image_size) + 7, 300, 3), dtype=np.uint8)])
    view = EvalView(image_size)(images, sizes)[0]
    expected = eval_transform(image_size)(Image.open(path))
    torch.testing.assert_close(view, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("image_size", "height", "width"), [(224, 180, 240), (32, 20, 28), (96, 300, 400)])
def test_eval_view_resizes_like_torchvision_when_the_image_is_not_at_the_eval_side(
    image_size: int, height: int, width: int
) -> None:
    image = torch.randint(
        0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    images, sizes = pad_images([image])
    view = EvalView(image_size, mean=(0, 0, 0), std=(1, 1, 1))(images, sizes)[0]
    resized = F.resize(
        image.float() / 255, [eval_resize_side(image_size)], v2.InterpolationMode.BICUBIC, antialias=True
    )
    expected = F.center_crop(resized.clamp(0, 1), [image_size, image_size])
    torch.testing.assert_close(view, expected, atol=1e-4, rtol=0)


def test_eval_view_normalises_with_the_given_statistics() -> None:
    images, sizes = pad_images([torch.full((3, 32, 32), 255, dtype=torch.uint8)])
    view = EvalView(32)(images, sizes)[0]
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(view[:, 5, 5], expected)
