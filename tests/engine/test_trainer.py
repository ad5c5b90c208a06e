"""The training loop on its own: the loss log, and a diverging loss stops the run with a clear error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from labelfew import engine
from labelfew.data.batches import Batch


def _trainer(loss_of: Any, log_file: Path | None = None, steps: int = 12) -> engine.Trainer:
    accelerator = engine.make_accelerator("no", seed=0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / (2 * steps))
    batches = _Batches(steps)

    def step(module: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        return loss_of(module(batch.images.float().flatten(1)[:, :2]).mean()), 4

    return engine.Trainer(accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                          loader=batches, step=step, epochs=1, description="test", quiet=True,
                          log_file=log_file)  # fmt: skip


class _Batches:
    """`steps` batches of four 1 x 1 images, an `engine.EpochBatches` without any images on disk."""

    def __init__(self, steps: int) -> None:
        self.steps, self.first_step = steps, 0

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        self.first_step = first_step

    def __iter__(self) -> Iterator[Batch]:
        for _ in range(self.first_step, self.steps):
            yield Batch(
                torch.ones(4, 3, 1, 1, dtype=torch.uint8),
                torch.ones(4, 2, dtype=torch.int64),
                torch.arange(4),
            )


def test_every_step_is_logged_with_its_own_learning_rate(tmp_path: Path) -> None:
    result = _trainer(lambda value: value**2, tmp_path / "log.jsonl").fit()
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 13))
    rates = [line["lr"] for line in lines]
    assert rates == sorted(rates, reverse=True) and len(set(rates)) == 12  # per step, not per flush
    assert result.steps == 12 and len(result.epoch_losses) == 1


def test_the_logged_lr_is_the_one_the_step_used_not_the_next_steps(tmp_path: Path) -> None:
    _trainer(lambda value: value**2, tmp_path / "log.jsonl").fit()
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    # The schedule is lr(s) = 0.1 (1 - s / 24) for optimizer step s = 0, 1, ...; log step 1 is s = 0.
    assert [line["lr"] for line in lines] == pytest.approx([0.1 * (1 - s / 24) for s in range(12)])


def test_a_diverging_loss_stops_with_a_clear_error() -> None:
    with pytest.raises(FloatingPointError, match="NaN or infinite by step 10"):
        _trainer(lambda value: value * float("nan")).fit()


def test_the_first_steps_are_timed_once_for_the_estimate() -> None:
    calls: list[tuple[float, int]] = []
    trainer = _trainer(lambda value: value**2)
    trainer.on_first_steps = lambda seconds, left: calls.append((seconds, left))
    trainer.fit()
    # Timed from the end of step 1 to the end of step 4 (3 steps); 8 of the 12 steps are left.
    assert len(calls) == 1 and calls[0][1] == 8 and 0 < calls[0][0] < 5


def test_a_run_without_a_bar_prints_a_progress_line_every_few_seconds(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # --quiet and output to a file showed nothing within an epoch (issue 22, item 13)
    from labelfew.engine import trainer as trainer_module

    _trainer(lambda value: value**2).fit()  # 12 steps take well under PROGRESS_SECONDS: no line
    assert "step" not in capsys.readouterr().err
    monkeypatch.setattr(trainer_module, "PROGRESS_SECONDS", 0.0)
    _trainer(lambda value: value**2).fit()
    lines = [line for line in capsys.readouterr().err.splitlines() if " step " in line]
    # at the log point (step 10, log_every) and at the epoch end (step 12)
    assert [line.split(" step ")[1].split()[0] for line in lines] == ["10/12", "12/12"]
    assert all(line.startswith("test epoch 1/1 ") and "loss " in line and "views/s" in line for line in lines)
