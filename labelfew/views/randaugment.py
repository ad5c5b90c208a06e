"""FixMatch's strong view: RandAugment with per-image operations and magnitudes, then Cutout, batched.

FixMatch (Sohn et al. 2020, https://arxiv.org/abs/2001.07685, section 2.3 and appendix table 12)
trains on a strong view of every unlabeled image: ``N = 2`` operations, each drawn uniformly from
the 14 of `OPERATIONS` **for every image**, each with a magnitude drawn uniformly from its range
(the paper's "RandAugment with random magnitude"), then Cutout. A batch in which every image gets
the same operation is a much weaker augmentation (DESIGN.md trap 10).

`sample_randaugment` draws every image's parameters on the host from one generator;
`apply_randaugment` applies them on the batch's device. For each of the ``N`` slots the images are
sorted by the operation they drew, so that each operation runs once on a contiguous slice (the
five geometric operations share one ``grid_sample``); the order is then restored and Cutout masks
every image in one ``masked_fill``. The pixel operations are in `labelfew.views.randaugment_ops`.

Input and output: float views in ``[0, 1]`` of shape (batch, C, H, W), C = 1, 3 or N (what Color and
Contrast do off RGB: `labelfew.views.randaugment_ops`), not normalised (the weak
view itself, `labelfew.views.finetune.ShiftFlipViews`), on any device. Each operation computes what
``torchvision.transforms.v2.functional`` computes on one float image (``tests/views/test_randaugment.py``
compares them image by image); geometric operations use nearest interpolation, as PIL's
``transform`` does in the reference code, and fill what leaves the image with grey 0.5, as Cutout.

Where the sources differ (the official code is google-research/fixmatch ``libml/augment.py``, "RA"):

- Ranges are the paper's table 12. The official code maps a level ``m`` in 1..9 to the factor
  ``0.1 + 0.18 m`` for brightness, colour, contrast and sharpness (table: ``[0.05, 0.95]``, which
  only ever darkens, desaturates, flattens or blurs), to 4..1 posterize bits (table: 4..8) and to
  integer rotations and translations; a different range is one edit of `OPERATIONS`.
- Every drawn operation is applied. The official RA policy applies each with probability 0.5 (and
  kekmodel/FixMatch-pytorch copies that); the authors describe RA as applied every time
  (google-research/fixmatch issue 65), and Identity is in the list.
- Fill: the official code works on images in ``[-1, 1]`` and fills Cutout and the pixels that
  rotations, shears and translations bring in with 0, i.e. grey 0.5 here; kekmodel fills those with
  black and Cutout with grey 127.
- Cutout: a square of side ``0.5 x min(H, W)`` (16 px at 32 px, as the official code), centred on a
  uniformly drawn pixel and clipped at the border, so a corner centre leaves a quarter of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from labelfew.views.ops import one_thread_on_cpu, to_device
from labelfew.views.randaugment_ops import (
    affine,
    autocontrast,
    brightness,
    contrast,
    equalize,
    posterize,
    saturation,
    sharpness,
    solarize,
)


@dataclass(frozen=True)
class Operation:
    """One RandAugment operation and the range its value is drawn from, uniformly.

    Attributes:
        name: The operation, as in the paper's table.
        low: Smallest value (the torchvision argument, in the units ``unit`` names).
        high: Largest value.
        unit: What the value is: a blend ``factor``, posterize ``bits`` (whole numbers), a
            solarize ``threshold`` in [0, 1], ``degrees`` of rotation, a ``shear`` factor, or a
            ``fraction`` of the image width (x) or height (y) to translate by, truncated to pixels.
    """

    name: str
    low: float = 0.0
    high: float = 0.0
    unit: str = ""


OPERATIONS = (
    Operation("Identity"),
    Operation("AutoContrast"),
    Operation("Brightness", 0.05, 0.95, "factor"),
    Operation("Color", 0.05, 0.95, "factor"),
    Operation("Contrast", 0.05, 0.95, "factor"),
    Operation("Equalize"),
    Operation("Posterize", 4, 8, "bits"),
    Operation("Sharpness", 0.05, 0.95, "factor"),
    Operation("Solarize", 0.0, 1.0, "threshold"),
    Operation("Rotate", -30.0, 30.0, "degrees"),
    Operation("ShearX", -0.3, 0.3, "shear"),
    Operation("ShearY", -0.3, 0.3, "shear"),
    Operation("TranslateX", -0.3, 0.3, "fraction"),
    Operation("TranslateY", -0.3, 0.3, "fraction"),
)
"""FixMatch's RandAugment operations (paper table 12), the geometric ones last and together."""
(
    IDENTITY,
    AUTOCONTRAST,
    BRIGHTNESS,
    COLOR,
    CONTRAST,
    EQUALIZE,
    POSTERIZE,
    SHARPNESS,
    SOLARIZE,
    ROTATE,
    SHEAR_X,
    SHEAR_Y,
    TRANSLATE_X,
    TRANSLATE_Y,
) = range(len(OPERATIONS))
GEOMETRIC = range(ROTATE, TRANSLATE_Y + 1)
"""Operations that move pixels: applied together as one batched affine resampling."""
OPERATION_COUNT = 2
"""Operations per image (FixMatch's N = 2)."""
CUTOUT_FRACTION = 0.5
"""Cutout's side as a fraction of the shorter image side (the official code: 16 px at 32 px)."""
FILL = 0.5
"""Grey of Cutout and of the pixels geometric operations bring in (the official code's 0 in [-1, 1])."""


@dataclass(frozen=True)
class RandAugmentParameters:
    """The random parameters of a batch of strong views, one row per image, on the CPU.

    Attributes:
        operations: Index into `OPERATIONS` per image and slot, applied in slot order.
            Shape: (views, slots), int64.
        values: The value of each drawn operation, in its `Operation.unit` (translations already
            in whole pixels). Shape: (views, slots), float64.
        cutout: ``(top, left, bottom, right)`` of each Cutout square, clipped to the image, ends
            exclusive. Shape: (views, 4), int64.
    """

    operations: Tensor
    values: Tensor
    cutout: Tensor

    def __len__(self) -> int:
        return int(self.operations.shape[0])


def sample_randaugment(
    view_count: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    operation_count: int = OPERATION_COUNT,
    cutout_fraction: float = CUTOUT_FRACTION,
) -> RandAugmentParameters:
    """Draws every view's operations, values and Cutout square, independently per view.

    Args:
        view_count: Number of views.
        height: View height in pixels.
        width: View width in pixels.
        generator: A CPU generator for reproducible draws; None uses torch's global one.
        operation_count: Operations per view.
        cutout_fraction: Cutout's side as a fraction of ``min(height, width)``.
    """
    operations = torch.randint(len(OPERATIONS), (view_count, operation_count), generator=generator)
    uniform = torch.rand(view_count, operation_count, generator=generator, dtype=torch.float64)
    low = torch.tensor([operation.low for operation in OPERATIONS], dtype=torch.float64)[operations]
    high = torch.tensor([operation.high for operation in OPERATIONS], dtype=torch.float64)[operations]
    whole = torch.tensor([operation.unit == "bits" for operation in OPERATIONS])[operations]
    values = torch.where(whole, (low + uniform * (high - low + 1)).floor(), low + uniform * (high - low))
    values = torch.where(operations == TRANSLATE_X, (values * width).trunc(), values)
    values = torch.where(operations == TRANSLATE_Y, (values * height).trunc(), values)
    side = int(cutout_fraction * min(height, width))
    centre_y = torch.randint(height, (view_count,), generator=generator)
    centre_x = torch.randint(width, (view_count,), generator=generator)
    top, left = centre_y - side // 2, centre_x - side // 2
    cutout = torch.stack(
        [top.clamp(min=0), left.clamp(min=0), (top + side).clamp(max=height), (left + side).clamp(max=width)],
        dim=1,
    )
    return RandAugmentParameters(operations=operations, values=values, cutout=cutout)


class RandAugmentViews:
    """FixMatch's strong augmentation of a batch of float views: RandAugment (N = 2) and Cutout.

    ``strong = RandAugmentViews()(weak_views_in_0_1, generator)``, then normalise.

    Args:
        operation_count: Operations per image (FixMatch's N = 2).
        cutout_fraction: Cutout's side as a fraction of the shorter side (0.5); 0 turns it off.
        fill: Grey value of Cutout and of the pixels that geometric operations bring in.
        generator: CPU generator the parameters are drawn from when a call passes none.
    """

    def __init__(
        self,
        operation_count: int = OPERATION_COUNT,
        cutout_fraction: float = CUTOUT_FRACTION,
        fill: float = FILL,
        generator: torch.Generator | None = None,
    ) -> None:
        if operation_count < 0 or not 0 <= cutout_fraction <= 1 or not 0 <= fill <= 1:
            raise ValueError(
                f"RandAugment needs operation_count >= 0 and cutout_fraction, fill in [0, 1], got "
                f"{operation_count}, {cutout_fraction}, {fill}."
            )
        self.operation_count = operation_count
        self.cutout_fraction = cutout_fraction
        self.fill = fill
        self.generator = generator

    def __call__(self, views: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Shape: (batch, C, H, W) float in [0, 1] -> the same shape, dtype and device, in [0, 1].

        Args:
            views: The views to augment (not modified).
            generator: Drawn from instead of the one given at construction.
        """
        check_views(views)
        source = generator if generator is not None else self.generator
        parameters = sample_randaugment(
            views.shape[0], views.shape[2], views.shape[3], source, self.operation_count, self.cutout_fraction
        )
        return apply_randaugment(views, parameters, self.fill)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(operation_count={self.operation_count}, "
            f"cutout_fraction={self.cutout_fraction}, fill={self.fill})"
        )


def check_views(views: Tensor) -> None:
    """Raises ValueError unless ``views`` is a float32 or float64 (batch, C, H, W) tensor, C >= 1.

    Half precision is refused: equalize bins to 256 levels and the affine grid needs the precision.
    """
    if views.dtype not in (torch.float32, torch.float64) or views.ndim != 4 or views.shape[1] < 1:
        raise ValueError(
            f"expected float32 views in [0, 1] of shape (batch_size, channels, H, W), got {views.dtype} {tuple(views.shape)}"
        )


def apply_randaugment(views: Tensor, parameters: RandAugmentParameters, fill: float = FILL) -> Tensor:
    """Applies each view's operations in slot order, then its Cutout; returns a new tensor.

    Args:
        views: Float views in [0, 1] on the device to work on. Shape: (views, C, H, W).
        parameters: One row per view, from `sample_randaugment` for this height and width.
        fill: Grey of Cutout and of the pixels geometric operations bring in.

    Returns:
        Shape and dtype of ``views``, in [0, 1], in the order of ``parameters``.
    """
    check_views(views)
    if len(parameters) != views.shape[0]:
        raise ValueError(f"{len(parameters)} parameter rows for {views.shape[0]} views.")
    height, width = views.shape[2], views.shape[3]
    plan = _plan(parameters, height, width, views.dtype, views.device)
    with torch.no_grad(), one_thread_on_cpu(views.device):
        for gather, values, theta, starts in plan.slots:
            views = views[gather]  # the first gather copies: the caller's views are never written
            _apply_slot(views, values, theta, starts, fill)
        views = views[plan.restore] if plan.slots else views.clone()
        top, left, bottom, right = plan.cutout.view(-1, 4, 1, 1).unbind(dim=1)
        rows = torch.arange(height, device=views.device).view(1, -1, 1)
        columns = torch.arange(width, device=views.device).view(1, 1, -1)
        inside = (rows >= top) & (rows < bottom) & (columns >= left) & (columns < right)
        return views.masked_fill_(inside.unsqueeze(1), fill)


@dataclass(frozen=True)
class _Plan:
    """Per slot: the gather into operation order, values, affine matrices and each operation's first row."""

    slots: tuple[tuple[Tensor, Tensor, Tensor, tuple[int, ...]], ...]
    restore: Tensor  # (views,): views[restore] is in the original order
    cutout: Tensor  # (views, 4) top, left, bottom, right


def _plan(
    parameters: RandAugmentParameters, height: int, width: int, dtype: torch.dtype, device: torch.device
) -> _Plan:
    """Sorts each slot by operation on the host and moves everything to ``device`` in one copy."""
    view_count, slot_count = parameters.operations.shape
    current = torch.arange(view_count)  # current[row] = the view held in that row
    columns, starts = [], []
    for slot in range(slot_count):
        operations = parameters.operations[:, slot]
        order = torch.argsort(operations, stable=True)
        counts = torch.bincount(operations, minlength=len(OPERATIONS))
        starts.append((0, *torch.cumsum(counts, 0).tolist()))
        position = torch.argsort(current)  # position[view] = its row now
        theta = affine_matrices(operations[order], parameters.values[order, slot], height, width)
        columns += [position[order].double()[:, None], parameters.values[order, slot, None], theta]
        current = order
    flat = torch.cat([*columns, torch.argsort(current).double()[:, None], parameters.cutout.double()], dim=1)
    flat = to_device(flat.to(dtype), device)  # indices stay exact in float32 below 2**24 views
    slots = []
    for slot in range(slot_count):
        block = flat[:, 8 * slot : 8 * slot + 8]
        slots.append((block[:, 0].long(), block[:, 1], block[:, 2:].reshape(-1, 2, 3), starts[slot]))
    return _Plan(slots=tuple(slots), restore=flat[:, 8 * slot_count].long(), cutout=flat[:, -4:].long())


def _apply_slot(views: Tensor, values: Tensor, theta: Tensor, starts: tuple[int, ...], fill: float) -> None:
    """In place: operation ``k`` on rows ``[starts[k], starts[k + 1])`` (one slot, sorted by operation)."""
    elementwise = {
        AUTOCONTRAST: lambda part, value: autocontrast(part),
        BRIGHTNESS: brightness,
        COLOR: saturation,
        CONTRAST: contrast,
        EQUALIZE: lambda part, value: equalize(part),
        POSTERIZE: posterize,
        SHARPNESS: sharpness,
        SOLARIZE: solarize,
    }
    for operation, function in elementwise.items():
        start, end = starts[operation], starts[operation + 1]
        if end > start:
            views[start:end] = function(views[start:end], values[start:end])
    start, end = starts[GEOMETRIC.start], starts[GEOMETRIC.stop]
    if end > start:
        views[start:end] = affine(views[start:end], theta[start:end], fill)


def affine_matrices(operations: Tensor, values: Tensor, height: int, width: int) -> Tensor:
    """torchvision's inverse affine matrix (``_get_inverse_affine_matrix``) of each geometric view.

    Rotate is ``F.rotate(view, degrees)``; ShearX/Y is ``F.affine`` with shear ``atan(value)`` about
    the top-left corner (``center=[0, 0]``, torchvision's RandAugment: PIL's ``(1, v, 0, 0, 1, 0)``);
    TranslateX/Y is ``F.affine`` with ``translate`` in whole pixels. Other views get the identity.

    Args:
        operations: Shape: (n,), int64.
        values: Shape: (n,), float64, in the operations' units (translations in pixels).

    Returns:
        Output-pixel -> input-pixel matrices with the image centre as origin. Shape: (n, 6), float64.
    """
    zero = torch.zeros_like(values)
    rotation = torch.deg2rad(torch.where(operations == ROTATE, -values, zero))
    shear_x = torch.atan(torch.where(operations == SHEAR_X, values, zero))
    shear_y = torch.atan(torch.where(operations == SHEAR_Y, values, zero))
    shearing = (operations == SHEAR_X) | (operations == SHEAR_Y)
    centre_x = torch.where(shearing, -0.5 * width, zero)
    centre_y = torch.where(shearing, -0.5 * height, zero)
    translate_x = torch.where(operations == TRANSLATE_X, values, zero)
    translate_y = torch.where(operations == TRANSLATE_Y, values, zero)
    a = torch.cos(rotation - shear_y) / torch.cos(shear_y)
    b = -(a * torch.tan(shear_x) + torch.sin(rotation))
    c = torch.sin(rotation - shear_y) / torch.cos(shear_y)
    d = torch.cos(rotation) - c * torch.tan(shear_x)
    moved_x, moved_y = centre_x + translate_x, centre_y + translate_y
    offset_x = centre_x - d * moved_x + b * moved_y
    offset_y = centre_y + c * moved_x - a * moved_y
    return torch.stack([d, -b, offset_x, -c, a, offset_y], dim=1)
