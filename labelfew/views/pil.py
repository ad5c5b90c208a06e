"""SimCLR views and the fine-tuning / evaluation transforms, on PIL images (CPU, per image).

One SimCLR view (Chen et al. 2020, https://arxiv.org/abs/2002.05709, appendix A) is, in order:

1. random resized crop to ``S x S``: area fraction uniform in ``[min_scale, 1]``, aspect ratio
   log-uniform in ``[3/4, 4/3]``, resampled with **bicubic** interpolation (as the official
   SimCLR code, ``data_util.crop_and_resize``);
2. horizontal flip with probability ``flip_prob`` (0.5);
3. colour jitter ``(brightness, contrast, saturation, hue) = (0.8s, 0.8s, 0.8s, 0.2s)`` in a random
   order, applied with probability ``color_jitter_prob`` (0.8);
4. grayscale with probability ``grayscale_prob`` (0.2);
5. Gaussian blur with probability ``blur_prob`` (0.5), sigma uniform in ``[0.1, 2.0]``, kernel
   ~10% of the image side; off by default at 32 px or less (the paper drops it for CIFAR-10);
6. conversion to a float32 tensor in ``[0, 1]`` and per-channel normalisation.

The view is built from an explicit list of `ViewStep` (name, probability, transform) so that
each random operation's application can be observed and tested; `simclr_view` only composes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from labelfew.errors import UserError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet RGB in [0, 1]; what timm / torchvision backbones expect."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet RGB in [0, 1]."""

INTERPOLATION = v2.InterpolationMode.BICUBIC
"""Resampling for every resize here: bicubic, as the official SimCLR code."""
EVAL_CROP_FRACTION = 0.875
"""Evaluation keeps the central 87.5% (SimCLR's ``CROP_PROPORTION``): 256 -> 224."""
CROP_RATIO = (3 / 4, 4 / 3)
"""Aspect-ratio range of random resized crops (paper appendix A)."""
BLUR_AUTO_MAX_SIZE = 32
"""Images of this side or less get no blur unless forced (paper appendix B.9, CIFAR-10)."""
MIN_IMAGE_SIZE = 8
"""Smallest output side accepted (a 3 x 3 blur kernel still fits)."""
MAX_COLOR_STRENGTH = 2.5
"""Hue jitter is ``0.2 * strength`` and torchvision allows at most 0.5."""

RGBTriple = tuple[float, float, float]
Transform = Callable[[Any], Any]


def resolve_mean_std(
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> tuple[RGBTriple, RGBTriple]:
    """Checks normalisation statistics, defaulting to ImageNet's.

    Args:
        mean: Three per-channel means in [0, 1] units, or None for `IMAGENET_MEAN`.
        std: Three positive per-channel standard deviations, or None for `IMAGENET_STD`.

    Returns:
        ``(mean, std)`` as tuples of three floats (hashable, JSON-friendly).

    Raises:
        UserError: A value does not have three entries or a standard deviation is not positive.
    """
    resolved_mean = _three_floats(IMAGENET_MEAN if mean is None else mean, name="mean")
    resolved_std = _three_floats(IMAGENET_STD if std is None else std, name="std")
    if any(not value > 0 for value in resolved_std):
        raise UserError(f"Normalisation std {resolved_std} has a value <= 0; use positive values.")
    return resolved_mean, resolved_std


def _three_floats(values: Sequence[float], name: str) -> RGBTriple:
    if isinstance(values, str) or len(values) != 3:
        raise UserError(f"Normalisation {name} {values!r} must have one value per RGB channel (3).")
    try:
        first, second, third = (float(value) for value in values)
    except (TypeError, ValueError) as error:
        raise UserError(f"Normalisation {name} {values!r} must hold three numbers.") from error
    if not all(math.isfinite(value) for value in (first, second, third)):
        raise UserError(f"Normalisation {name} {values!r} must hold finite numbers.")
    return first, second, third


@dataclass(frozen=True)
class ViewConfig:
    """Parameters of one SimCLR view; the defaults are the paper's ImageNet settings.

    Attributes:
        image_size: Side ``S`` of the square output view, in pixels (at least 8).
        min_scale: Smallest crop area as a fraction of the image (0.08 in the paper).
        color_strength: Colour distortion strength ``s``: jitter is ``(0.8s, 0.8s, 0.8s, 0.2s)``.
            The paper uses 1.0 for ImageNet and 0.5 for CIFAR-10 (appendix B.9); at most 2.5.
        color_jitter_prob: Probability of applying the colour jitter (0.8).
        grayscale_prob: Probability of converting the view to grayscale (0.2).
        blur_prob: Probability of the Gaussian blur when blur is enabled (0.5).
        blur_sigma: Range ``(low, high)`` of the blur's standard deviation, sampled uniformly.
        flip_prob: Probability of a horizontal flip (0.5).
        blur: True forces the blur on, False off; None (default) turns it off for images of
            32 px or less, as the paper does for CIFAR-10, and on otherwise.
        mean: Per-channel normalisation mean (ImageNet's by default, what pretrained backbones
            and timm expect).
        std: Per-channel normalisation standard deviation.

    Lists given for ``blur_sigma``, ``mean`` or ``std`` (from TOML or JSON) become tuples.

    Raises:
        UserError: A value is outside its valid range.
    """

    image_size: int
    min_scale: float = 0.08
    color_strength: float = 1.0
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_prob: float = 0.5
    blur: bool | None = None
    mean: RGBTriple = IMAGENET_MEAN
    std: RGBTriple = IMAGENET_STD

    def __post_init__(self) -> None:
        mean, std = resolve_mean_std(self.mean, self.std)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "blur_sigma", tuple(float(value) for value in self.blur_sigma))
        self._validate()

    def _validate(self) -> None:
        _check_image_size(self.image_size)
        _check_min_scale(self.min_scale)
        if not 0 <= self.color_strength <= MAX_COLOR_STRENGTH:
            raise UserError(
                f"Colour strength {self.color_strength} must be in [0, {MAX_COLOR_STRENGTH}]; "
                "use 1.0 for ImageNet-like images or 0.5 for CIFAR-like ones."
            )
        probabilities = {
            "color_jitter_prob": self.color_jitter_prob,
            "grayscale_prob": self.grayscale_prob,
            "blur_prob": self.blur_prob,
            "flip_prob": self.flip_prob,
        }
        for name, probability in probabilities.items():
            if not 0 <= probability <= 1:
                raise UserError(f"Augmentation {name} {probability} must be in [0, 1].")
        if len(self.blur_sigma) != 2 or not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise UserError(
                f"Blur sigma range {self.blur_sigma} must be (low, high) with 0 < low <= high; "
                "the paper uses (0.1, 2.0)."
            )

    @property
    def blur_enabled(self) -> bool:
        """Whether views get the Gaussian blur (``blur`` if set, else ``image_size > 32``)."""
        if self.blur is not None:
            return self.blur
        return self.image_size > BLUR_AUTO_MAX_SIZE

    @property
    def blur_kernel_size(self) -> int:
        """Odd blur kernel side, about 10% of ``image_size`` (within one pixel), at least 3.

        Follows the official SimCLR code: radius ``(S // 10) // 2``, side ``2 * radius + 1``
        (23 at 224 px, 9 at 96 px, 3 at 32 px).
        """
        return max(3, 2 * ((self.image_size // 10) // 2) + 1)


class ViewStep(NamedTuple):
    """One operation of a view: ``transform`` is applied with probability ``probability``.

    ``transform`` itself is deterministic in whether it acts (it may still draw its own
    parameters, e.g. the crop box or the jitter factors); `compose_view_steps` adds the coin.
    """

    name: str
    probability: float
    transform: Transform


def simclr_view_steps(config: ViewConfig) -> list[ViewStep]:
    """The operations of one SimCLR view, in order (paper appendix A).

    Args:
        config: View parameters.

    Returns:
        Steps named ``convert_to_rgb``, ``random_resized_crop``, ``horizontal_flip``,
        ``color_jitter``, ``grayscale``, ``gaussian_blur`` (only when ``config.blur_enabled``),
        ``to_float_tensor`` and ``normalize``.
    """
    strength = config.color_strength
    crop = _random_resized_crop(config.image_size, config.min_scale)
    steps = [
        ViewStep("convert_to_rgb", 1.0, v2.RGB()),
        ViewStep("random_resized_crop", 1.0, crop),
        ViewStep("horizontal_flip", config.flip_prob, v2.RandomHorizontalFlip(p=1.0)),
        ViewStep(
            "color_jitter",
            config.color_jitter_prob,
            v2.ColorJitter(
                brightness=0.8 * strength,
                contrast=0.8 * strength,
                saturation=0.8 * strength,
                hue=0.2 * strength,
            ),
        ),
        ViewStep("grayscale", config.grayscale_prob, v2.Grayscale(num_output_channels=3)),
    ]
    if config.blur_enabled:
        blur = v2.GaussianBlur(kernel_size=config.blur_kernel_size, sigma=config.blur_sigma)
        steps.append(ViewStep("gaussian_blur", config.blur_prob, blur))
    steps += _tensor_steps(config.mean, config.std)
    return steps


def compose_view_steps(steps: Sequence[ViewStep]) -> Transform:
    """Chains steps, applying each with its probability (steps with probability 0 are dropped).

    Args:
        steps: Operations in order, e.g. from `simclr_view_steps`.

    Returns:
        A picklable transform (safe for DataLoader workers) running the steps in order.
    """
    transforms: list[Transform] = []
    for step in steps:
        if step.probability >= 1:
            transforms.append(step.transform)
        elif step.probability > 0:
            transforms.append(v2.RandomApply([step.transform], p=step.probability))
    return v2.Compose(transforms)


def simclr_view(config: ViewConfig) -> Callable[[Image.Image], Tensor]:
    """One random SimCLR view of an image (https://arxiv.org/abs/2002.05709, appendix A).

    Args:
        config: View parameters.

    Returns:
        A transform from a PIL image of any size (RGB; other modes are converted) to a
        normalised float32 tensor. Shape: (3, image_size, image_size).
    """
    return compose_view_steps(simclr_view_steps(config))


class TwoViews:
    """Two independent random views of the same image: the positive pair of NT-Xent.

    Args:
        view: Transform producing one random view, usually ``simclr_view(config)``.
    """

    def __init__(self, view: Callable[[Image.Image], Tensor]) -> None:
        self.view = view

    @classmethod
    def from_config(cls, config: ViewConfig) -> TwoViews:
        """Two SimCLR views built from ``config``."""
        return cls(simclr_view(config))

    def __call__(self, image: Image.Image) -> tuple[Tensor, Tensor]:
        """Returns ``(view1, view2)``, each of shape (3, image_size, image_size)."""
        return self.view(image), self.view(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.view!r})"


def finetune_transform(
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    min_scale: float | None = None,
) -> Callable[[Image.Image], Tensor]:
    """Training transform for fine-tuning: random resized crop, horizontal flip, normalise.

    SimCLR fine-tunes with crops and flips only, no colour distortion (arXiv 2002.05709,
    appendix B.5; the official code crops with area fraction in [0.08, 1]).

    Args:
        image_size: Output side ``S`` in pixels.
        mean: Normalisation mean; None for ImageNet's.
        std: Normalisation standard deviation; None for ImageNet's.
        min_scale: Smallest crop area fraction. None picks 0.08 (SimCLR's value) above 64 px
            and 0.25 at 64 px or less, where an 8% crop keeps only ~9 x 9 pixels of a 32 px
            image: too little of the object for a classifier trained on a handful of labels.

    Returns:
        A transform from a PIL image to a float32 tensor. Shape: (3, image_size, image_size).
    """
    _check_image_size(image_size)
    if min_scale is None:
        min_scale = 0.25 if image_size <= 64 else 0.08
    _check_min_scale(min_scale)
    steps = [
        ViewStep("convert_to_rgb", 1.0, v2.RGB()),
        ViewStep("random_resized_crop", 1.0, _random_resized_crop(image_size, min_scale)),
        ViewStep("horizontal_flip", 0.5, v2.RandomHorizontalFlip(p=1.0)),
        *_tensor_steps(*resolve_mean_std(mean, std)),
    ]
    return compose_view_steps(steps)


def eval_transform(
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Callable[[Image.Image], Tensor]:
    """Deterministic evaluation transform: resize the shorter side, centre crop, normalise.

    Above 64 px the shorter side is resized to ``round(S / 0.875)`` and the central ``S x S``
    kept (the standard ImageNet protocol, SimCLR's ``CROP_PROPORTION``); at 64 px or less it is
    resized to ``S`` so that small images lose nothing (a square image is used whole).

    Args:
        image_size: Output side ``S`` in pixels.
        mean: Normalisation mean; None for ImageNet's.
        std: Normalisation standard deviation; None for ImageNet's.

    Returns:
        A transform from a PIL image to a float32 tensor. Shape: (3, image_size, image_size).
    """
    _check_image_size(image_size)
    resize_side = image_size if image_size <= 64 else round(image_size / EVAL_CROP_FRACTION)
    resize = v2.Resize(resize_side, interpolation=INTERPOLATION, antialias=True)
    steps = [
        ViewStep("convert_to_rgb", 1.0, v2.RGB()),
        ViewStep("resize", 1.0, resize),
        ViewStep("center_crop", 1.0, v2.CenterCrop(image_size)),
        *_tensor_steps(*resolve_mean_std(mean, std)),
    ]
    return compose_view_steps(steps)


def _random_resized_crop(image_size: int, min_scale: float) -> Transform:
    return v2.RandomResizedCrop(
        image_size,
        scale=(min_scale, 1.0),
        ratio=CROP_RATIO,
        interpolation=INTERPOLATION,
        antialias=True,
    )


def _tensor_steps(mean: Sequence[float], std: Sequence[float]) -> list[ViewStep]:
    to_float_tensor = v2.Compose([v2.ToImage(), v2.ToPureTensor(), v2.ToDtype(torch.float32, scale=True)])
    return [
        ViewStep("to_float_tensor", 1.0, to_float_tensor),
        ViewStep("normalize", 1.0, v2.Normalize(mean=list(mean), std=list(std))),
    ]


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise UserError(f"Image size {image_size!r} must be a whole number of pixels, e.g. 224.")
    if image_size < MIN_IMAGE_SIZE:
        raise UserError(f"Image size {image_size} is too small; use at least {MIN_IMAGE_SIZE} px.")


def _check_min_scale(min_scale: float) -> None:
    if not 0 < min_scale <= 1:
        raise UserError(f"Crop min_scale {min_scale} must be in (0, 1]; the paper uses 0.08.")
