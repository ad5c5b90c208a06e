"""FixMatch's weak view (`ShiftFlipViews`) against torchvision's functional pad(reflect) + crop + flip,
image by image: the official code's flip-and-shift at the image's own scale up to 64 px, USB's
ImageNet resize + random crop + flip above."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from labelfew.spec import eval_resize_side
from labelfew.views.config import resized_extent
from labelfew.views.finetune import ShiftFlipViews
from labelfew.views.params import sample_shift_and_flip

UNIT = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def _padded_batch(shapes: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images of `shapes` in one zero-padded batch, with their sizes."""
    generator = torch.Generator().manual_seed(seed)
    height, width = max(shape[0] for shape in shapes), max(shape[1] for shape in shapes)
    images = torch.zeros(len(shapes), 3, height, width, dtype=torch.uint8)
    for index, (rows, columns) in enumerate(shapes):
        images[index, :, :rows, :columns] = torch.randint(0, 256, (3, rows, columns), generator=generator,
                                                          dtype=torch.uint8)  # fmt: skip
    return images, torch.tensor(shapes)


def _padding(size: int) -> int:
    """The official CIFAR/STL code's reflect padding, 1/8 of the side, up to 64 px; USB's ImageNet: none."""
    return size // 8 if size <= 64 else 0


def _torchvision(image: torch.Tensor, size: int, top: int, left: int, flip: bool) -> torch.Tensor:
    """torchvision: shorter side resized to the stored side (only when it is not there), reflect padding,
    the window at (top, left) of the padded image, the flip; in [0, 1]."""
    pixels = F.to_dtype(image, torch.float32, scale=True)
    extent = resized_extent(*image.shape[-2:], eval_resize_side(size))
    if tuple(image.shape[-2:]) != extent:
        pixels = F.resize(pixels, list(extent), v2.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    padding = _padding(size)
    window = F.crop(F.pad(pixels, [padding] * 4, padding_mode="reflect"), top, left, size, size)
    return F.horizontal_flip(window) if flip else window


def _compare(size: int, shapes: list[tuple[int, int]], tolerance: float) -> None:
    images, sizes = _padded_batch(shapes)
    views = ShiftFlipViews(size, **UNIT)(images, sizes, torch.Generator().manual_seed(7))
    extents = torch.tensor([resized_extent(h, w, eval_resize_side(size)) for h, w in shapes])
    top, left, flip = sample_shift_and_flip(len(shapes), extents, size, _padding(size), 0.5,
                                            torch.Generator().manual_seed(7))  # fmt: skip
    for index, (rows, columns) in enumerate(shapes):
        expected = _torchvision(images[index, :, :rows, :columns], size, int(top[index]), int(left[index]),
                                bool(flip[index]))  # fmt: skip
        torch.testing.assert_close(views[index], expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize(
    ("size", "shapes"),
    [(32, [(32, 32), (32, 40), (40, 32), (32, 32), (32, 33), (32, 32)]), (96, [(110, 110), (137, 110), (110, 150)]),
     (224, [(256, 256), (256, 340)])],
)  # fmt: skip
def test_a_stored_image_gets_exactly_torchvision_reflect_pad_crop_and_flip(
    size: int, shapes: list[tuple[int, int]]
) -> None:
    """Images at the stored side (32 px as they are; 256 for 224) are only padded, cut and flipped:
    their pixels are copied, to the last bit of torchvision's uint8 -> float scaling."""
    _compare(size, shapes, tolerance=1e-7)


def test_an_image_not_at_the_stored_side_is_resized_to_it_first() -> None:
    """Smaller or larger images (not what the sources store) get Pillow's bicubic, torchvision's
    anti-aliased float resize, then the same window; the tolerance is float32 summation order."""
    _compare(32, [(20, 28), (48, 48), (32, 32), (40, 64)], tolerance=2e-6)
    _compare(96, [(80, 90), (96, 120), (110, 140)], tolerance=2e-6)


def test_the_shift_is_uniform_over_at_most_an_eighth_of_the_side_and_half_the_views_flip() -> None:
    """FixMatch's weak view: a translation of -4..4 px at 32 px (12.5%), never a change of scale."""
    images = torch.arange(32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(1, 1, 32, 32)
    images = images.expand(4000, 3, 32, 32).contiguous()
    extents = torch.tensor([[32, 32]] * 4000)
    top, left, flip = sample_shift_and_flip(4000, extents, 32, 4, 0.5, torch.Generator().manual_seed(0))
    for corner in (top, left):
        counts = torch.bincount(corner, minlength=9)
        assert len(counts) == 9 and int(counts.min()) > 350  # 0..8 in the padded image: shifts -4..4, uniform
    assert abs(float(flip.float().mean()) - 0.5) < 0.03
    views = ShiftFlipViews(32, **UNIT)(images[:64], None, torch.Generator().manual_seed(0))
    assert views.shape == (64, 3, 32, 32) and views.dtype == torch.float32
    scaled = views * 255
    assert (
        float((scaled - scaled.round()).abs().max()) < 1e-4
    )  # every pixel one of the image's: none resampled


def test_it_refuses_images_it_cannot_view() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ShiftFlipViews(32)(torch.zeros(2, 3, 32, 32), None, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_views_on_a_gpu_are_the_cpus() -> None:
    """The same windows from the same seed on the training device, stored and resized images mixed."""
    images, sizes = _padded_batch([(32, 32), (32, 40), (20, 28), (48, 48)])
    views = ShiftFlipViews(32)
    on_cpu = views(images, sizes, torch.Generator().manual_seed(1))
    on_gpu = views(images.cuda(), sizes.cuda(), torch.Generator().manual_seed(1))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-5)
