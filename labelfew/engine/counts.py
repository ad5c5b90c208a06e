"""Named counts summed on the training device over an epoch, read back once at its end."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class EpochCounts:
    """Sums of per-step counts kept on the device (no host sync per step), reduced over every
    process at the epoch's end (`labelfew.engine.Trainer`'s ``on_epoch_end``).

    Args:
        names: what is counted, in order.
        device: the training device.
    """

    def __init__(self, names: Sequence[str], device: torch.device) -> None:
        self.names = tuple(names)
        self.counts = torch.zeros(len(self.names), device=device, dtype=torch.float64)

    def count(self, **values: torch.Tensor | float) -> None:
        """Adds one step's values, one per name (0-dim tensors or numbers)."""
        self.counts += torch.stack(
            [
                torch.as_tensor(values[name], dtype=torch.float64, device=self.counts.device)
                for name in self.names
            ]
        )

    def totals(self, accelerator: Any) -> dict[str, float]:
        """This epoch's sums over every process (each must call it); the counts start again at 0."""
        values = accelerator.reduce(self.counts, "sum").tolist()
        self.counts.zero_()
        return dict(zip(self.names, values, strict=True))
