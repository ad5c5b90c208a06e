"""Pretrain stage: where the views are made, the batched path's batches, --compile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from labelfew import engine
from labelfew.cli import app
from labelfew.config import PretrainConfig
from labelfew.data.images import find_images
from labelfew.data.store import MemoryBatches, decoded_bytes
from labelfew.errors import UserError
from labelfew.stages import pretrain

runner = CliRunner()


def _folder(root: Path, count: int = 24, side: int = 32) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = np.random.default_rng(index).integers(0, 255, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{index}.png")
    return root


def test_auto_makes_views_on_the_device_when_the_decoded_images_fit() -> None:
    gib = 2**30
    fits = decoded_bytes(50_000, 32) / gib  # CIFAR-10's training images: 146 MiB
    assert pretrain.augment_place("auto", fits, 50_000, 32) == "device"
    assert pretrain.augment_place("auto", fits * 0.99, 50_000, 32) == "workers"
    # Above 64 px images are stored at S / 0.875: 1.28 M ImageNet images at 224 px need 234 GiB.
    assert pretrain.augment_place("auto", 4.0, 1_281_167, 224) == "workers"
    assert pretrain.augment_place("auto", 4.0, 20_000, 224) == "device"
    assert pretrain.augment_place("workers", 4.0, 10, 32) == "workers"
    assert pretrain.augment_place("device", 4.0, 10**9, 224) == "device"  # decoding then fails clearly


@pytest.mark.parametrize(
    ("place", "budget", "message"),
    [
        ("gpu", 4.0, "use one of auto, device, workers"),
        ("auto", 0.0, "give a positive size"),
        ("auto", -1.0, "give a positive size"),
    ],
)
def test_invalid_places_and_budgets_are_refused(place: str, budget: float, message: str) -> None:
    with pytest.raises(UserError, match=message):
        pretrain.augment_place(place, budget, 10, 32)


def test_device_batches_hold_every_image_and_give_each_process_its_share(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "images", count=20)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    paths = find_images(folder)
    config = pretrain.resolve(PretrainConfig(data=folder, arch="test_resnet", batch_size=8), paths)
    assert config.augment_on == "device" and config.image_size == 32
    accelerator = engine.make_accelerator("no", seed=0)
    batches, undecodable = pretrain.build_batches(config, paths, accelerator, per_process=8)
    assert isinstance(batches, MemoryBatches) and len(batches) == 2  # 20 decoded images, batch 8
    assert undecodable == [str(folder / "broken.jpg")]
    first, second = next(iter(batches))["images"]
    assert first.shape == second.shape == (8, 3, 32, 32) and first.dtype == torch.float32
    assert not torch.equal(first, second)


def test_workers_place_gives_a_prepared_dataloader(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "images", count=16)
    paths = find_images(folder)
    config = pretrain.resolve(
        PretrainConfig(data=folder, arch="test_resnet", batch_size=8, augment_on="workers", workers=0), paths
    )
    accelerator = engine.make_accelerator("no", seed=0)
    loader, undecodable = pretrain.build_batches(config, paths, accelerator, per_process=8)
    assert isinstance(loader, torch.utils.data.DataLoader) and undecodable == []
    first, _ = next(iter(loader))["images"]
    assert first.shape == (8, 3, 32, 32)


@pytest.mark.slow
def test_compiled_pretrain_writes_the_same_artifact_layout(tmp_path: Path) -> None:
    """--compile (torch.compile, a minute of compiling on 2 CPU cores) trains and saves as usual."""
    folder = _folder(tmp_path / "images", count=32)
    records = {}
    for name, extra in (("plain", []), ("compiled", ["--compile"])):
        result = runner.invoke(app, [
            "pretrain", str(folder), "--arch", "test_resnet", "--no-small-stem", "--epochs", "2",
            "--batch-size", "16", "--quiet", "--out", str(tmp_path / name), *extra,
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
        records[name] = load_file(str(tmp_path / name / "pretrain" / "backbone.safetensors"))
    plain, compiled = records["plain"], records["compiled"]
    assert plain.keys() == compiled.keys()  # no "_orig_mod." prefixes
    assert all(plain[key].shape == compiled[key].shape for key in plain)
    # Same seed, same views, same start: the compiled kernels train to nearly the same weights.
    weights = [key for key in plain if plain[key].is_floating_point()]
    assert all(torch.allclose(plain[key], compiled[key], atol=1e-3, rtol=1e-2) for key in weights)
