"""`--init` weights into a model of another channel count: the first conv and the mean/std.

A model's channel count is its data's (`labelfew.spec.ModelSpec.channels`), so RGB weights (timm's,
a labelfew RGB run) often start a 1-channel or N-channel model. Only the first convolution takes
the channels; it is adapted by timm's own rule, ``timm.models._manipulate.adapt_input_conv`` (what
``timm.create_model(..., pretrained=True, in_chans=N)`` does): into 1 channel its weights are summed
over the colour axis; into N channels the RGB weights are repeated over the channels and scaled by
``3 / N``. The normalisation follows the weights:

- 1 channel from C: mean and std are the means of the init's C means and C stds. A gray image
  copied to 3 channels then gives exactly the RGB model's features when the RGB model's three
  means (and three stds) are equal, which makes ``sum_c w_c (x - m) / s`` equal to
  ``(sum_c w_c)(x - m) / s``; with ImageNet's unequal ones it is the nearest single statistic.
- N channels from C: channel ``c`` takes the mean and std of channel ``c mod C``, the channel whose
  weights it repeats (timm's repetition order), so each copied filter sees the inputs it was
  trained on; the data's own statistics (the lead's pretrain) replace them where measured.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from timm.models import get_pretrained_cfg
from timm.models._manipulate import adapt_input_conv
from torch import Tensor

from labelfew.errors import UserError
from labelfew.spec import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from labelfew.engine.init_weights import Init


def first_conv_key(arch: str, tensors: dict[str, Tensor]) -> str:
    """The weight of the convolution that takes the image (timm's ``pretrained_cfg.first_conv``).

    Falls back on the first 4-D tensor of the state dict for a model whose config names none.
    """
    config = get_pretrained_cfg(arch)
    first = getattr(config, "first_conv", None) if config is not None else None
    names = [first] if isinstance(first, str) else list(first or [])
    for name in names:
        if f"{name}.weight" in tensors:
            return f"{name}.weight"
    for key, value in tensors.items():
        if value.ndim == 4:
            return key
    raise UserError(f"{arch}: no first convolution found to adapt to another channel count")


def channel_statistics(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """Per-channel mean (or std) of ``len(values)`` channels for a model of ``channels`` channels.

    1 channel: the mean of the values; otherwise channel ``c`` takes ``values[c mod len(values)]``
    (the module docstring says why).
    """
    if channels == len(values):
        return values
    if channels == 1:
        return (sum(values) / len(values),)
    return tuple(values[channel % len(values)] for channel in range(channels))


def imagenet_statistics(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean and std for a model of ``channels`` channels (`channel_statistics`): what
    weights that record none, and a random init without data statistics, are normalised with."""
    return channel_statistics(IMAGENET_MEAN, channels), channel_statistics(IMAGENET_STD, channels)


def adapt_init(init: Init, channels: int) -> Init:
    """``init`` for a model of ``channels`` input channels: its first conv and mean/std adapted.

    The same ``init`` when it already has that many channels.

    Raises:
        UserError: the architecture's first layer is not a convolution timm can adapt.
    """
    if channels == init.channels:
        return init
    key = first_conv_key(init.arch, init.tensors)
    try:
        weight = adapt_input_conv(channels, init.tensors[key], base_chans=init.channels)
    except (NotImplementedError, ValueError, AssertionError) as error:
        raise UserError(
            f"--init {init.source}: its first layer {key} cannot be adapted from {init.channels} "
            f"to {channels} channels ({error})"
        ) from None
    return dataclasses.replace(
        init,
        tensors={**init.tensors, key: weight},
        channels=channels,
        mean=None if init.mean is None else channel_statistics(init.mean, channels),
        std=None if init.std is None else channel_statistics(init.std, channels),
    )
