"""How long a run will take, from its first measured steps, and which settings would fit an hour.

On a 2-core CPU, pretraining 3,000 photos at 224 px with resnet18 for 100 epochs runs at ~6 views/s:
more than a day, which the progress bar only showed after the first steps. The trainer measures
a few steps (`Trainer.on_first_steps`); the stage prints one line with the total, and on a CPU,
when it is over an hour, the settings that would fit, scaled from the measured time by the ratio
of forward-pass FLOPs (`forward_flops`) rather than guessed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from labelfew.engine.accelerator import console
from labelfew.models import build_backbone
from labelfew.spec import uses_small_stem

HOUR = 3600.0


def forward_flops(model: nn.Module, image_size: int) -> int:
    """FLOPs of one forward pass of one image (eval mode, no gradient): the unit of relative cost.

    Shape: the model takes (1, 3, image_size, image_size).
    """
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, image_size, image_size))
    model.train(was_training)
    return int(counter.get_total_flops())


def format_duration(seconds: float) -> str:
    """`50 s`, `40 min`, `3 h 20 min`, `2 d 4 h`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


@dataclass(frozen=True)
class Setting:
    """A (arch, image size, epochs) choice and its estimated training time."""

    arch: str
    image_size: int
    epochs: int
    seconds: float

    def flags(self) -> str:
        """`--image-size 96 --arch resnet18 --epochs 30 ≈ 40 min`."""
        return (
            f"--image-size {self.image_size} --arch {self.arch} --epochs {self.epochs} "
            f"≈ {format_duration(self.seconds)}"
        )


def fitting_setting(
    seconds_per_epoch: float,
    epochs: int,
    relative_cost: Callable[[str, int], float],
    candidates: Sequence[tuple[str, int]],
    budget: float = HOUR,
    enough_epochs: int = 30,
) -> Setting | None:
    """The first candidate (arch, image size) that trains `enough_epochs` (or `epochs`, if fewer)
    within `budget`; else the one that fits the most epochs (at least 5); else None.

    Args:
        seconds_per_epoch: measured, at the current settings.
        epochs: the epochs asked for (never exceeded).
        relative_cost: the cost of a candidate per image relative to the current settings (1.0
            for them), e.g. a ratio of `forward_flops`.
        candidates: in order of preference (the current arch and largest size first).
        budget: seconds.
        enough_epochs: enough for a useful SimCLR pretraining on a few thousand images.
    """
    best: Setting | None = None
    for arch, side in candidates:
        per_epoch = seconds_per_epoch * relative_cost(arch, side)
        fits = min(epochs, math.floor(budget / per_epoch))
        if fits >= 10:
            fits -= fits % 5  # a round number: 30, not 33
        setting = Setting(arch, side, fits, fits * per_epoch)
        if fits >= min(epochs, enough_epochs):
            return setting
        if fits >= 5 and (best is None or fits > best.epochs):
            best = setting
    return best


def smaller_settings(arch: str, image_size: int, small_side: int) -> list[tuple[str, int]]:
    """Candidates for `fitting_setting`: the current arch, then resnet18, at the current size and
    the smaller of 160, 128 and 96 px. Sizes are not lowered to `small_side` or below, where the
    small-image stem (no downsampling in the stem) would cost more, not less."""
    sides = [image_size] + [side for side in (160, 128, 96) if small_side < side < image_size]
    archs = [arch] + (["resnet18"] if arch != "resnet18" else [])
    return [(name, side) for name in archs for side in sides]


def estimate_line(
    seconds_per_step: float,
    steps_left: int,
    steps_per_epoch: int,
    epochs: int,
    on_cpu: bool,
    relative_cost: Callable[[str, int], float],
    candidates: Sequence[tuple[str, int]],
) -> str:
    """The one line a stage prints after its first steps: the estimated time left, and on a CPU,
    when that is over an hour, the settings that would fit one (see `fitting_setting`)."""
    total = seconds_per_step * steps_left
    line = (
        f"estimated time: {format_duration(total)} for {steps_left} steps "
        f"({seconds_per_step:.3g} s per step, measured)"
    )
    if not on_cpu or total <= HOUR:
        return line
    setting = fitting_setting(seconds_per_step * steps_per_epoch, epochs, relative_cost, candidates)
    if setting is None:
        return line + "; no smaller setting fits an hour on this CPU: use a GPU"
    return line + f"; to fit an hour on this CPU: {setting.flags()}"


def first_steps_printer(
    arch: str,
    image_size: int,
    small_stem: bool,
    epochs: int,
    steps_per_epoch: int,
    on_cpu: bool,
    small_side: int,
) -> Callable[[float, int], None]:
    """`Trainer.on_first_steps` that prints `estimate_line`: the time left and, on a CPU, over an
    hour, what would fit one, by the ratio of the backbones' forward FLOPs (`forward_flops`)."""

    @functools.cache
    def flops(name: str, side: int) -> int:
        small = small_stem if (name, side) == (arch, image_size) else uses_small_stem(side)
        return forward_flops(build_backbone(name, small_stem=small, image_size=side), side)

    def report(seconds_per_step: float, steps_left: int) -> None:
        candidates = smaller_settings(arch, image_size, small_side)
        console.print(estimate_line(
            seconds_per_step, steps_left, steps_per_epoch, epochs, on_cpu,
            lambda name, side: flops(name, side) / flops(arch, image_size), candidates,
        ))  # fmt: skip

    return report
