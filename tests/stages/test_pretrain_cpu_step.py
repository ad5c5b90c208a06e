"""Pretraining's CPU step: channels-last (the same loss and gradients as the contiguous layout) and
bf16 autocast under --precision auto where the CPU has native bf16 (pretrain only)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from labelfew.cli import app
from labelfew.config import PretrainConfig
from labelfew.data.batches import Batch
from labelfew.engine import accelerator as accelerators
from labelfew.engine import simclr
from labelfew.stages import pretrain
from labelfew.views.simclr import SimCLRViews

runner = CliRunner()


def test_pretrain_is_channels_last_on_the_cpu_and_on_gpus() -> None:
    assert pretrain.channels_last(torch.device("cpu")) and pretrain.channels_last(torch.device("cuda"))


def test_the_channels_last_step_gives_the_contiguous_steps_loss_and_gradients() -> None:
    """The reference is the same step on the contiguous model: channels-last changes the memory
    layout (and oneDNN's kernels), not the arithmetic beyond rounding."""
    config = simclr.resolve(PretrainConfig(data=Path("d"), arch="test_resnet", batch_size=8,
                                           image_size=32, small_stem=False), [Path("d")] * 16)  # fmt: skip
    torch.manual_seed(0)
    contiguous = pretrain.build_model(config).train()
    last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    batch = Batch(images, torch.full((8, 2), 32), torch.arange(8), seed=3)
    results = []
    for model, memory_format in ((contiguous, False), (last, True)):
        views = SimCLRViews(simclr.view_config(config))
        loss, count = pretrain.contrastive_step(config.temperature, memory_format, views)(model, batch)
        loss.backward()
        results.append((loss.item(), count, [parameter.grad for parameter in model.parameters()]))
    (loss, count, grads), (loss_last, count_last, grads_last) = results
    assert count == count_last == 16 and loss == pytest.approx(loss_last, abs=1e-5)
    for grad, grad_last in zip(grads, grads_last, strict=True):
        torch.testing.assert_close(grad_last, grad, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("native", [True, False])
def test_pretrains_auto_precision_is_bf16_on_a_native_bf16_cpu_and_finetunes_stays_float32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    monkeypatch.setattr(accelerators, "native_cpu_bf16", lambda: native)
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for index in range(16):
        pixels = np.random.default_rng(index).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    (tmp_path / "labels.csv").write_text(
        "path,label\n" + "".join(f"images/a/{i}.png,{'xy'[i % 2]}\n" for i in range(16))
    )
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(tmp_path / "images"), "--arch", "test_resnet", "--no-small-stem",
                                 "--epochs", "1", "--batch-size", "8", "--out", str(out), "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["finetune", "--labels", str(tmp_path / "labels.csv"), "--from", str(out),
                                 "--epochs", "1", "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    pretrained = json.loads((out / "pretrain" / "run.json").read_text())
    assert pretrained["device"].endswith(f"precision {'bf16' if native else 'no'}")
    finetuned = json.loads(next(out.glob("finetune*/run.json")).read_text())
    assert finetuned["device"].endswith("precision no")
