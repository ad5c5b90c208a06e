"""The evaluation transform on PIL images, kept only until `labelfew.use.inference` and fine-tuning's
validation move to the batched `labelfew.views.evaluate.EvalView` over the streaming source.

Every training view is made on the device (`labelfew.views.simclr`, `labelfew.views.finetune`);
the per-image SimCLR path is the distribution reference in ``tests/reference/pil_views.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from labelfew.spec import eval_resize_side
from labelfew.views.config import check_image_size, resolve_mean_std


def eval_transform(
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Callable[[Image.Image], Tensor]:
    """Deterministic evaluation transform: resize the shorter side, centre crop, normalise.

    The shorter side goes to `labelfew.spec.eval_resize_side` (``round(S / 0.875)`` above 64 px,
    ``S`` at 64 px or less), bicubic, then the central ``S x S`` is kept.

    Returns:
        A transform from a PIL image to a float32 tensor. Shape: (3, image_size, image_size).
    """
    check_image_size(image_size)
    resolved_mean, resolved_std = resolve_mean_std(mean, std)
    return v2.Compose(
        [
            v2.RGB(),
            v2.Resize(
                eval_resize_side(image_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.CenterCrop(image_size),
            v2.ToImage(),
            v2.ToPureTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(resolved_mean), std=list(resolved_std)),
        ]
    )
