"""Fine-tuning's crop + flip and the evaluation view, batched, against the per-image PIL reference."""

from __future__ import annotations

import importlib.resources
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
from labelfew.data.stream import FilesInOrder, collate_in_order
from labelfew.spec import IMAGENET_MEAN, IMAGENET_STD, eval_resize_side
from labelfew.views.evaluate import EvalView
from labelfew.views.finetune import CropFlipViews


def real_photos(tmp_path: Path) -> list[Path]:
    """scikit-learn's two sample photos (JPEG, 427 x 640), and each shrunk to a shorter side of 150."""
    folder = Path(str(importlib.resources.files("sklearn.datasets") / "images"))
    paths = sorted(folder.glob("*.jpg"))
    for path in list(paths):
        image = Image.open(path).convert("RGB")
        small = image.resize((round(image.width * 150 / image.height), 150), Image.Resampling.BICUBIC)
        small.save(tmp_path / f"{path.stem}-150.png")
        paths.append(tmp_path / f"{path.stem}-150.png")
    return paths


def torchvision_eval(image: Image.Image, image_size: int) -> torch.Tensor:
    """torchvision's functional resize (bicubic, anti-aliased) + centre crop + normalise of the
    image's uint8 tensor (the resize of a PIL image differs by at most 2/255: `load_resized`)."""
    pixels = F.pil_to_tensor(image)
    resized = F.resize(pixels, [eval_resize_side(image_size)], v2.InterpolationMode.BICUBIC, antialias=True)
    cropped = F.center_crop(resized, [image_size, image_size])
    return F.normalize(
        F.to_dtype(cropped, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD)
    )


@pytest.mark.parametrize("image_size", [224, 96, 32])
def test_eval_inputs_of_real_photos_equal_torchvision_resize_crop_normalize(
    tmp_path: Path, image_size: int
) -> None:
    """What inference feeds a model: the streaming decoder at the evaluation side, then `EvalView`.

    The decoder resizes as torchvision's ``Resize`` of a uint8 tensor does (up for the 150 px
    photos at 224 px), so the view only crops; the tolerance is float32 rounding of the same
    scale and normalisation (``x * (1/255)`` against ``x / 255``: a few ulps of values below 2.7).
    """
    paths = real_photos(tmp_path)
    files = FilesInOrder(paths, eval_resize_side(image_size))
    batch = collate_in_order([files[index] for index in range(len(files))])
    views = EvalView(image_size)(batch.images, batch.sizes)
    expected = torch.stack([torchvision_eval(Image.open(path).convert("RGB"), image_size) for path in paths])
    torch.testing.assert_close(views, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("image_size", [224, 96])
def test_eval_view_enlarges_real_photos_like_torchvision_on_float_tensors(
    tmp_path: Path, image_size: int
) -> None:
    """Photos below the evaluation side (as the training store holds small images) are resized on the device.

    Against torchvision's float tensor resize the tolerance is summation order (1e-4, as for noise
    above). Against the PIL path the mean difference stays below 0.5/255: Pillow rounds (and clips)
    each of its two passes to uint8, which alone costs 0.25/255 on average.
    """
    paths = [path for path in real_photos(tmp_path) if path.stem.endswith("-150")]
    pixels = [torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1) for path in paths]
    images, sizes = pad_images(pixels)
    views = EvalView(image_size, mean=(0, 0, 0), std=(1, 1, 1))(images, sizes)
    side, crop = [eval_resize_side(image_size)], [image_size, image_size]
    expected = torch.stack([
        F.center_crop(F.resize(image.float() / 255, side, v2.InterpolationMode.BICUBIC, antialias=True), crop)
        for image in pixels
    ]).clamp(0, 1)  # fmt: skip
    torch.testing.assert_close(views, expected, atol=1e-4, rtol=0)
    by_pil = torch.stack(
        [eval_transform(image_size, (0, 0, 0), (1, 1, 1))(Image.open(path)) for path in paths]
    )
    assert float((views - by_pil).abs().mean()) < 0.5 / 255


def test_eval_view_mixes_cropped_and_resized_images_in_one_batch() -> None:
    """The centre-crop fast path and the resize path give each image what it would get alone."""
    generator = torch.Generator().manual_seed(3)
    at_side = torch.randint(0, 256, (3, 110, 140), dtype=torch.uint8, generator=generator)
    below = torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8, generator=generator)
    view = EvalView(96)
    images, sizes = pad_images([at_side, below, at_side])
    together = view(images, sizes)
    for row, image in enumerate([at_side, below, at_side]):
        alone = view(*pad_images([image]))[0]
        torch.testing.assert_close(together[row], alone, atol=1e-6, rtol=0)
    top, left = round((110 - 96) / 2), round((140 - 96) / 2)
    plain = EvalView(96, mean=(0, 0, 0), std=(1, 1, 1))(images, sizes)[0]
    assert torch.equal(plain, at_side[:, top : top + 96, left : left + 96].float() / 255)
    assert view(images[:0], sizes[:0]).shape == (0, 3, 96, 96)


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
    """Stored at the evaluation side (as both image sources store it), the view is only a crop:
    torchvision's tensor eval transform to float rounding, the PIL one within its resize's 2/255."""
    path = photo(tmp_path, height, width)
    stored = load_resized(path, eval_resize_side(image_size))
    images, sizes = pad_images([stored, np.zeros((eval_resize_side(image_size) + 7, 300, 3), dtype=np.uint8)])
    view = EvalView(image_size, mean=(0, 0, 0), std=(1, 1, 1))(images, sizes)[0]
    plain = {"mean": (0, 0, 0), "std": (1, 1, 1)}
    expected = F.center_crop(
        F.resize(F.pil_to_tensor(Image.open(path)), [eval_resize_side(image_size)], v2.InterpolationMode.BICUBIC, antialias=True),
        [image_size, image_size],
    ).float() / 255  # fmt: skip
    torch.testing.assert_close(view, expected, atol=1e-6, rtol=0)
    pil = eval_transform(image_size, **plain)(Image.open(path))
    torch.testing.assert_close(view, pil, atol=2 / 255 + 1e-6, rtol=0)


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
