"""The training loop on its own: the loss log, and a diverging loss stops the run with a clear error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from labelfew import engine


def _trainer(loss_of: Any, log_file: Path | None = None, steps: int = 12) -> engine.Trainer:
    accelerator = engine.make_accelerator("no", seed=0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / (2 * steps))
    batches = [{"images": torch.ones(4, 2), "bad": []} for _ in range(steps)]

    def step(module: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        return loss_of(module(batch["images"]).mean()), 4

    return engine.Trainer(accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                          loader=batches, step=step, epochs=1, description="test", quiet=True,  # type: ignore[arg-type]
                          log_file=log_file)  # fmt: skip


def test_every_step_is_logged_with_its_own_learning_rate(tmp_path: Path) -> None:
    result = _trainer(lambda value: value**2, tmp_path / "log.jsonl").fit()
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 13))
    rates = [line["lr"] for line in lines]
    assert rates == sorted(rates, reverse=True) and len(set(rates)) == 12  # per step, not per flush
    assert result.steps == 12 and len(result.epoch_losses) == 1


def test_a_diverging_loss_stops_with_a_clear_error() -> None:
    with pytest.raises(FloatingPointError, match="NaN or infinite by step 10"):
        _trainer(lambda value: value * float("nan")).fit()
