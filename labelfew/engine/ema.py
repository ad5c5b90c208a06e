"""An exponential moving average of a model's weights, the model FixMatch evaluates and saves.

FixMatch (Sohn et al. 2020, https://arxiv.org/abs/2001.07685, appendix B.1; google-research/fixmatch
``libml/train.py``) evaluates ``tf.train.ExponentialMovingAverage(decay=0.999)`` of the weights, not
the weights themselves (DESIGN.md trap 10). After every optimizer step each parameter ``p`` updates
its average ``a`` to ``d·a + (1 - d)·p``; buffers (BatchNorm's running mean, variance and count) are
copied, as in kekmodel/FixMatch-pytorch's ``ModelEMA`` and USB's ``EMA``: they are already running
averages.

The decay is warmed up as TensorFlow's ``num_updates`` does, ``d_n = min(decay, (1 + n) / (10 + n))``
at the n-th update (n from 0): with a plain 0.999 a run of 1,000 steps would still keep 37% of the
initial weights (0.999^1000), and FixMatch trains for 2^20 steps; from step ~9,000 on the decay is
0.999 exactly.

BatchNorm (``batchnorm=True``, FixMatch's): the copied running statistics must come from the same
window of steps as the averaged weights, or the average is evaluated with statistics of the last
~10 batches (PyTorch's momentum 0.1) of weights it has barely moved towards. Both references set
BatchNorm's momentum to ``1 - decay``: 0.001 (official: ``momentum=0.999`` in TensorFlow's
convention; USB: ``bn_momentum = 1 - ema_m``). Here the trained model's momentum is ``1 - d_n``
before the step that the n-th update averages, so it warms up with the decay (0.9 at the first
step, 0.001 from step ~9,000): a short run's statistics are not the initial ones either.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class ModelEMA:
    """A copy of `model` whose parameters follow the moving average of `model`'s.

    Args:
        model: the (unwrapped) model being trained; copied, with its device and memory format.
        decay: the average's decay ``d`` in [0, 1), reached after the warmup.
        batchnorm: set `model`'s BatchNorm momentum to ``1 - d_n`` before every step (FixMatch's
            ``1 - decay`` once warmed up); False leaves it as it is.

    Attributes:
        module: the averaged model, in eval mode, with no gradients.
        updates: how many times `update` has run.
    """

    def __init__(self, model: nn.Module, decay: float, batchnorm: bool = False) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}.")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0
        self.batchnorms = (
            [module for module in model.modules() if isinstance(module, _BatchNorm)] if batchnorm else []
        )
        self._set_momentum()

    def current_decay(self) -> float:
        """The decay the next `update` uses: ``min(decay, (1 + n) / (10 + n))`` after n updates."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    def batchnorm_momentum(self) -> float:
        """The trained model's BatchNorm momentum for the next step: ``1 - current_decay()``."""
        return 1 - self.current_decay()

    def _set_momentum(self) -> None:
        momentum = self.batchnorm_momentum()
        for module in self.batchnorms:
            module.momentum = momentum

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Moves every averaged parameter towards `model`'s and copies its buffers; call it after
        each optimizer step with the unwrapped model (the same parameters in the same order)."""
        decay = self.current_decay()
        for average, parameter in zip(self.module.parameters(), model.parameters(), strict=True):
            average.mul_(decay).add_(parameter.detach(), alpha=1 - decay)
        for average_buffer, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
            average_buffer.copy_(buffer)
        self.updates += 1
        self._set_momentum()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged model's state dict (the key layout of the trained model's)."""
        return self.module.state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        """Restores an average written by `state_dict` after `updates` updates (a resumed run), and
        the BatchNorm momentum that goes with them."""
        self.module.load_state_dict(tensors)
        self.updates = updates
        self._set_momentum()

    def extra_state(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the tensors: the update count (the warmup's position)."""
        return {"updates": self.updates, "decay": self.decay}
