"""What a view is made of: `ViewConfig` (the SimCLR view parameters) and the shared constants.

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
6. conversion to float32 in ``[0, 1]`` and per-channel normalisation.

The views follow the images' channels (one entry of ``mean`` / ``std`` per channel). For 1 channel:
crop, flip, brightness and contrast jitter, blur; no hue, saturation or grayscale (the identity on
a gray image). For N > 3 channels: crop, flip, brightness and contrast jitter drawn per channel
(one factor per channel per view), blur; no hue, saturation or grayscale.

`labelfew.views.simclr` makes these views for a whole batch on the training device; the
per-image PIL version that the distribution tests compare it with is ``tests/reference/pil_views.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from labelfew.errors import UserError
from labelfew.spec import IMAGENET_MEAN, IMAGENET_STD, SMALL_IMAGE_SIDE

CROP_RATIO = (3 / 4, 4 / 3)
"""Aspect-ratio range of random resized crops (paper appendix A)."""
BLUR_AUTO_MAX_SIZE = 32
"""Images of this side or less get no blur unless forced (paper appendix B.9, CIFAR-10)."""
MIN_IMAGE_SIZE = 8
"""Smallest output side accepted (a 3 x 3 blur kernel still fits)."""
MAX_COLOR_STRENGTH = 2.5
"""Hue jitter is ``0.2 * strength`` and torchvision allows at most 0.5."""

CHANNEL_VIEWS = (
    "For 1 channel the views are crop, flip, brightness and contrast jitter and blur: no hue or "
    "saturation. For N > 3 channels: crop, flip, brightness and contrast drawn per channel, blur."
)
"""The sentence `--help` quotes for the views of images that are not RGB (module docstring)."""

ChannelStatistics = tuple[float, ...]
"""One value per input channel: 3 for RGB, 1 for grayscale, N for multi-channel images."""


def resolve_mean_std(
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> tuple[ChannelStatistics, ChannelStatistics]:
    """Checks normalisation statistics, defaulting to ImageNet's.

    Args:
        mean: One mean per input channel in [0, 1] units (3 for RGB, 1 for grayscale, N for
            multi-channel images), or None for `IMAGENET_MEAN`.
        std: One positive standard deviation per channel, as many as ``mean``, or None for
            `IMAGENET_STD`.

    Returns:
        ``(mean, std)`` as tuples of floats (hashable, JSON-friendly).

    Raises:
        UserError: ``mean`` and ``std`` differ in length, are empty, or a standard deviation is
            not positive.
    """
    resolved_mean = _channel_floats(IMAGENET_MEAN if mean is None else mean, name="mean")
    resolved_std = _channel_floats(IMAGENET_STD if std is None else std, name="std")
    if len(resolved_mean) != len(resolved_std):
        raise UserError(
            f"Normalisation mean {resolved_mean} and std {resolved_std} must have one value per "
            "channel each (as many means as stds)."
        )
    if any(not value > 0 for value in resolved_std):
        raise UserError(f"Normalisation std {resolved_std} has a value <= 0; use positive values.")
    return resolved_mean, resolved_std


def _channel_floats(values: Sequence[float], name: str) -> ChannelStatistics:
    if isinstance(values, str) or len(values) == 0:
        raise UserError(f"Normalisation {name} {values!r} must have one value per channel.")
    try:
        floats = tuple(float(value) for value in values)
    except (TypeError, ValueError) as error:
        raise UserError(f"Normalisation {name} {values!r} must hold numbers.") from error
    if not all(math.isfinite(value) for value in floats):
        raise UserError(f"Normalisation {name} {values!r} must hold finite numbers.")
    return floats


def check_channels(images_channels: int, mean: ChannelStatistics) -> None:
    """Raises ValueError unless a batch of ``images_channels`` channels fits the statistics ``mean``."""
    if images_channels != len(mean):
        raise ValueError(
            f"images of {images_channels} channels, but normalisation statistics for {len(mean)}"
        )


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
            and timm expect); its length is the channel count of the images (1, 3 or N).
        std: Per-channel normalisation standard deviation, as many as ``mean``.

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
    mean: ChannelStatistics = IMAGENET_MEAN
    std: ChannelStatistics = IMAGENET_STD

    def __post_init__(self) -> None:
        mean, std = resolve_mean_std(self.mean, self.std)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "blur_sigma", tuple(float(value) for value in self.blur_sigma))
        self._validate()

    def _validate(self) -> None:
        check_image_size(self.image_size)
        check_min_scale(self.min_scale)
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
    def channels(self) -> int:
        """The input channels the views are made for: one per entry of ``mean``."""
        return len(self.mean)

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


def check_image_size(image_size: int) -> None:
    """Raises `UserError` unless ``image_size`` is a whole number of pixels, at least 8."""
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise UserError(f"Image size {image_size!r} must be a whole number of pixels, e.g. 224.")
    if image_size < MIN_IMAGE_SIZE:
        raise UserError(f"Image size {image_size} is too small; use at least {MIN_IMAGE_SIZE} px.")


def check_min_scale(min_scale: float) -> None:
    """Raises `UserError` unless ``min_scale`` is in (0, 1]."""
    if not 0 < min_scale <= 1:
        raise UserError(f"Crop min_scale {min_scale} must be in (0, 1]; the paper uses 0.08.")


def finetune_min_scale(image_size: int) -> float:
    """Smallest crop area fraction when fine-tuning: SimCLR's 0.08 above 64 px, 0.25 at 64 px or less.

    At 32 px an 8% crop keeps only ~9 x 9 pixels: too little of the object for a classifier
    trained on a handful of labels.
    """
    return 0.25 if image_size <= SMALL_IMAGE_SIDE else 0.08


def resized_extent(height: int, width: int, shorter_side: int) -> tuple[int, int]:
    """``(height, width)`` after resizing the shorter side to ``shorter_side``, aspect kept.

    torchvision's rule for ``Resize(int)`` (the longer side is truncated, ``int(side * long /
    short)``), so that an image stored at the evaluation side by `labelfew.data.images.load_resized`
    has exactly the pixels torchvision's ``Resize`` gives it.
    """
    if height <= width:
        return shorter_side, int(shorter_side * width / height)
    return int(shorter_side * height / width), shorter_side
