"""FixMatch's batched RandAugment + Cutout against torchvision's functional ops, image by image.

Tolerances: the operations that only compare, scale, quantise, reduce or resample with nearest
interpolation (identity, autocontrast, brightness, equalize, posterize, solarize and the five
geometric ones) compute the same float32 operations in the same order as torchvision and must be
bit-identical. Colour, contrast and sharpness blend two images: torchvision's ``add_(..., alpha=1 - f)``
rounds ``1 - f`` in float64 and may fuse the multiply-add, and sharpness sums its 3 x 3 filter from
shifted slices instead of a convolution, so they differ by a few float32 ulps of values <= 1
(measured: at most 1.8e-7); 1e-6 allows that and nothing visible (1/255 = 3.9e-3).
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torchvision.transforms.v2 import functional as F

from labelfew.views.randaugment import (
    GEOMETRIC,
    OPERATIONS,
    RandAugmentParameters,
    RandAugmentViews,
    apply_randaugment,
    sample_randaugment,
)

GREY = [0.5, 0.5, 0.5]
EXACT = {"Identity", "AutoContrast", "Brightness", "Equalize", "Posterize", "Solarize"} | {
    OPERATIONS[index].name for index in GEOMETRIC
}
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


def torchvision_operation(name: str, image: torch.Tensor, value: float) -> torch.Tensor:
    """One operation on one (3, H, W) float image, as torchvision's RandAugment calls it."""
    if name == "Identity":
        return image
    if name in ("AutoContrast", "Equalize"):
        return F.autocontrast(image) if name == "AutoContrast" else F.equalize(image)
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        adjust = {
            "Brightness": F.adjust_brightness,
            "Color": F.adjust_saturation,
            "Contrast": F.adjust_contrast,
            "Sharpness": F.adjust_sharpness,
        }[name]
        return adjust(image, value)
    if name == "Posterize":
        return F.posterize(image, int(value))
    if name == "Solarize":
        return F.solarize(image, value)
    if name == "Rotate":
        return F.rotate(image, value, interpolation=F.InterpolationMode.NEAREST, fill=GREY[: image.shape[0]])
    shear = math.degrees(math.atan(value))
    arguments = {
        "ShearX": {"shear": [shear, 0.0], "translate": [0, 0], "center": [0, 0]},
        "ShearY": {"shear": [0.0, shear], "translate": [0, 0], "center": [0, 0]},
        "TranslateX": {"shear": [0.0, 0.0], "translate": [int(value), 0]},
        "TranslateY": {"shear": [0.0, 0.0], "translate": [0, int(value)]},
    }[name]
    return F.affine(image, angle=0.0, scale=1.0, fill=GREY[: image.shape[0]], **arguments)  # type: ignore[arg-type]


def torchvision_views(views: torch.Tensor, parameters: RandAugmentParameters) -> torch.Tensor:
    """The per-image reference: each image's operations in slot order with torchvision, then Cutout."""
    results = []
    for index, image in enumerate(views):
        for operation, value in zip(parameters.operations[index], parameters.values[index], strict=True):
            image = torchvision_operation(OPERATIONS[int(operation)].name, image, float(value))
        top, left, bottom, right = parameters.cutout[index].tolist()
        image = image.clone()
        image[:, top:bottom, left:right] = 0.5
        results.append(image)
    return torch.stack(results)


def sample_views(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random views plus the edge cases: a constant image, one with four levels, pure 0 and 1 pixels."""
    generator = torch.Generator().manual_seed(seed)
    views = torch.rand(count, 3, height, width, generator=generator)
    views[0] = 0.3
    views[1] = (torch.rand(3, height, width, generator=generator) * 4).floor() / 4
    views[2, :, :2] = 0.0
    views[2, :, -2:] = 1.0
    return views


def fixed_parameters(operation: int, count: int, height: int, width: int) -> RandAugmentParameters:
    """Every view gets ``operation`` with values spread over its range, and no Cutout."""
    spec = OPERATIONS[operation]
    fraction = torch.linspace(0.02, 0.98, count, dtype=torch.float64)
    if spec.unit == "bits":
        values = (spec.low + fraction * (spec.high - spec.low + 1)).floor()
    else:
        values = spec.low + fraction * (spec.high - spec.low)
    if spec.name in ("TranslateX", "TranslateY"):
        values = (values * (width if spec.name == "TranslateX" else height)).trunc()
    return RandAugmentParameters(
        operations=torch.full((count, 1), operation),
        values=values[:, None],
        cutout=torch.zeros(count, 4, dtype=torch.int64),
    )


@pytest.mark.parametrize(("height", "width"), [(32, 32), (20, 28)])
@pytest.mark.parametrize("operation", range(len(OPERATIONS)), ids=[op.name for op in OPERATIONS])
def test_each_operation_equals_torchvision_image_by_image(operation: int, height: int, width: int) -> None:
    views = sample_views(12, height, width)
    parameters = fixed_parameters(operation, 12, height, width)
    batched = apply_randaugment(views, parameters)
    reference = torchvision_views(views, parameters)
    if OPERATIONS[operation].name in EXACT:
        assert torch.equal(batched, reference)
    else:
        torch.testing.assert_close(batched, reference, rtol=0, atol=1e-6)
    if OPERATIONS[operation].name != "Identity":
        assert not torch.equal(batched[3:], views[3:])  # the operation did something


def test_a_drawn_batch_equals_torchvision_applied_image_by_image() -> None:
    views = sample_views(96, 32, 32, seed=1)
    parameters = sample_randaugment(96, 32, 32, torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        apply_randaugment(views, parameters), torchvision_views(views, parameters), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("operation", range(len(OPERATIONS)), ids=[op.name for op in OPERATIONS])
def test_each_operation_off_rgb_is_torchvisions_on_each_channel_as_a_gray_image(
    operation: int, channels: int
) -> None:
    """1 channel: torchvision's ops on a 1-channel image (PIL's mode "L": Color is the identity,
    Contrast blends with the image's mean). N channels: the same, channel by channel."""
    views = torch.cat([sample_views(12, 20, 28, seed=channel)[:, :1] for channel in range(channels)], dim=1)
    parameters = fixed_parameters(operation, 12, 20, 28)
    reference = torch.cat(
        [torchvision_views(views[:, channel : channel + 1], parameters) for channel in range(channels)], dim=1
    )
    torch.testing.assert_close(apply_randaugment(views, parameters), reference, rtol=0, atol=1e-6)


def test_a_drawn_batch_of_one_channel_equals_torchvision_image_by_image() -> None:
    views = sample_views(96, 32, 32, seed=1)[:, :1]
    parameters = sample_randaugment(96, 32, 32, torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        apply_randaugment(views, parameters), torchvision_views(views, parameters), rtol=0, atol=1e-6
    )


def test_every_image_draws_its_own_operations_uniformly() -> None:
    parameters = sample_randaugment(256, 32, 32, torch.Generator().manual_seed(0))
    for slot in range(2):
        assert len(parameters.operations[:, slot].unique()) >= 10  # not one op for the batch
    counts = torch.bincount(parameters.operations.flatten(), minlength=len(OPERATIONS))
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3  # 512 draws, 1/14 each
    assert (parameters.operations[:, 0] != parameters.operations[:, 1]).any()
    views = RandAugmentViews()(
        sample_views(4, 32, 32)[3:].expand(64, -1, -1, -1), torch.Generator().manual_seed(0)
    )
    assert len({view.numpy().tobytes() for view in views}) == 64  # 64 copies of one image, 64 views


def test_values_lie_in_each_operations_range() -> None:
    parameters = sample_randaugment(4096, 32, 40, torch.Generator().manual_seed(1))
    for index, spec in enumerate(OPERATIONS):
        values = parameters.values[parameters.operations == index]
        if spec.name == "TranslateX" or spec.name == "TranslateY":
            side = 40 if spec.name == "TranslateX" else 32
            assert torch.equal(values, values.trunc()) and values.abs().max() <= 0.3 * side
        elif spec.unit == "bits":
            assert set(values.tolist()) == {4.0, 5.0, 6.0, 7.0, 8.0}
        else:
            assert spec.low <= values.min() and values.max() <= spec.high
            if spec.high > spec.low:
                assert (
                    stats.kstest(values.numpy(), stats.uniform(spec.low, spec.high - spec.low).cdf).pvalue
                    > 1e-3
                )


def test_the_same_seed_gives_the_same_views_and_the_input_is_kept() -> None:
    views = sample_views(32, 24, 24)
    before = views.clone()
    augment = RandAugmentViews()
    first = augment(views, torch.Generator().manual_seed(5))
    assert torch.equal(first, augment(views, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, augment(views, torch.Generator().manual_seed(6)))
    assert torch.equal(views, before)
    seeded = RandAugmentViews(generator=torch.Generator().manual_seed(5))
    assert torch.equal(seeded(views), first)


def expected_cutout_areas(side: int, size: int) -> list[int]:
    """Visible area of the square for every centre pixel of a size x size image (plain Python)."""
    lengths = [min(size, centre - side // 2 + side) - max(0, centre - side // 2) for centre in range(size)]
    return [rows * columns for rows in lengths for columns in lengths]


def test_cutout_squares_have_the_official_size_and_a_uniform_centre() -> None:
    parameters = sample_randaugment(8192, 32, 32, torch.Generator().manual_seed(2))
    top, left, bottom, right = parameters.cutout.unbind(dim=1)
    areas = ((bottom - top) * (right - left)).double()
    expected = torch.tensor(expected_cutout_areas(side=16, size=32), dtype=torch.float64)
    assert set(areas.unique().tolist()) <= set(expected.unique().tolist())
    assert areas.max() == 256 and areas.min() == 64  # a 16 px square, a quarter of it at a corner
    standard_error = expected.std() / math.sqrt(len(areas))
    assert abs(areas.mean() - expected.mean()) < 4 * standard_error


def test_cutout_greys_exactly_its_square() -> None:
    views = sample_views(64, 32, 32)
    augment = RandAugmentViews(operation_count=0)
    generator = torch.Generator().manual_seed(4)
    result = augment(views, generator)
    parameters = sample_randaugment(64, 32, 32, torch.Generator().manual_seed(4), operation_count=0)
    mask = torch.zeros(64, 1, 32, 32, dtype=torch.bool)
    for index, (top, left, bottom, right) in enumerate(parameters.cutout.tolist()):
        mask[index, :, top:bottom, left:right] = True
    assert torch.equal(result, torch.where(mask, 0.5, views))
    assert torch.equal(RandAugmentViews(operation_count=0, cutout_fraction=0)(views, generator), views)


@pytest.mark.parametrize("device", DEVICES)
def test_shape_dtype_device_and_range(device: str) -> None:
    views = sample_views(48, 32, 32).to(device)
    result = RandAugmentViews()(views, torch.Generator().manual_seed(0))
    assert result.shape == views.shape and result.dtype == torch.float32 and result.device == views.device
    assert result.min() >= 0 and result.max() <= 1
    parameters = sample_randaugment(48, 32, 32, torch.Generator().manual_seed(0))
    reference = apply_randaugment(views.cpu(), parameters)
    # GPU arithmetic may round differently; a nearest-neighbour tie may pick the other pixel
    close = torch.isclose(result.cpu(), reference, rtol=0, atol=1e-5)
    assert close.float().mean() > 0.999
    doubled = RandAugmentViews()(views.double(), torch.Generator().manual_seed(0))
    assert doubled.dtype == torch.float64


@pytest.mark.parametrize(
    "views",
    [
        torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
        torch.zeros(2, 3, 8, 8, dtype=torch.float16),
        torch.zeros(3, 8, 8),
    ],
    ids=["uint8", "float16", "unbatched"],
)
def test_refuses_views_it_cannot_augment(views: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="expected float32 views"):
        RandAugmentViews()(views)
