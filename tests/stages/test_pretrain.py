"""Pretrain stage: where the views are made, the batched path's batches, --compile."""

from __future__ import annotations

import json
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
from labelfew.data.store import MemoryBatches
from labelfew.data.stream import StreamBatches
from labelfew.engine import estimate
from labelfew.errors import UserError
from labelfew.models import build_backbone
from labelfew.stages import pretrain
from labelfew.views.simclr import SimCLRViews

runner = CliRunner()


def _folder(root: Path, count: int = 24, side: int = 32) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = np.random.default_rng(index).integers(0, 255, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{index}.png")
    return root


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
    batch = next(iter(batches))
    assert batch.images.shape == (8, 3, 32, 32) and batch.images.dtype == torch.uint8
    first, second = SimCLRViews(pretrain.view_config(config))(batch.images, batch.sizes, batch.generator())
    assert first.shape == second.shape == (8, 3, 32, 32) and first.dtype == torch.float32
    assert not torch.equal(first, second)


def test_workers_place_streams_uint8_batches(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "images", count=16)
    paths = find_images(folder)
    config = pretrain.resolve(
        PretrainConfig(data=folder, arch="test_resnet", batch_size=8, augment_on="workers", workers=0), paths
    )
    accelerator = engine.make_accelerator("no", seed=0)
    loader, undecodable = pretrain.build_batches(config, paths, accelerator, per_process=8)
    assert isinstance(loader, StreamBatches) and undecodable == [] and len(loader) == 2
    batch = next(iter(loader))
    assert batch.images.shape == (8, 3, 32, 32) and batch.images.dtype == torch.uint8


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


@pytest.mark.parametrize(("strength", "side"), [(0.0, 32), (0.0, 96), (0.25, 96)])
def test_colour_strength_zero_means_no_colour_distortion(tmp_path: Path, strength: float, side: int) -> None:
    """`--color-strength 0` once became 1.0 (`x or 1.0`) while run.json recorded 0.0."""
    paths = find_images(_folder(tmp_path / "images", count=4, side=side))
    config = pretrain.resolve(PretrainConfig(data=tmp_path / "images", color_strength=strength), paths)
    assert config.color_strength == strength
    assert pretrain.view_config(config).color_strength == strength


def test_zero_sized_numeric_options_are_refused_not_replaced_by_defaults(tmp_path: Path) -> None:
    paths = find_images(_folder(tmp_path / "images", count=4))
    with pytest.raises(UserError, match="--image-size 0"):  # it became the images' 32 px
        pretrain.resolve(PretrainConfig(data=tmp_path / "images", image_size=0), paths)
    with pytest.raises(UserError, match="--projection-hidden 0"):  # it became the backbone's width
        PretrainConfig(data=tmp_path / "images", projection_hidden=0)


def test_a_cpu_run_over_an_hour_names_measured_settings_that_fit(tmp_path: Path) -> None:
    """3,000 photos at 224 px, resnet18, 100 epochs, batch 256 at 85 s per step (6 views/s on 2 cores)."""
    config = PretrainConfig(data=tmp_path, image_size=224, small_stem=False, epochs=100, quiet=False)
    accelerator = engine.make_accelerator("no", seed=0)
    printer = pretrain._estimate_printer(config, steps_per_epoch=12, accelerator=accelerator)
    with engine.console.capture() as captured:
        printer(85.0, 1200)
    line = " ".join(captured.get().split())
    assert line.startswith("estimated time: 28 h 20 min for 1200 steps")
    # The suggestion is the measured time scaled by forward FLOPs, not a guess.
    ratio = estimate.forward_flops(build_backbone("resnet18", small_stem=False, image_size=96), 96) / (
        estimate.forward_flops(build_backbone("resnet18", small_stem=False, image_size=224), 224)
    )
    fits = int(3600 // (12 * 85 * ratio))
    fits -= fits % 5
    assert f"to fit an hour on this CPU: --image-size 96 --arch resnet18 --epochs {fits} ≈" in line
    assert 5 <= fits < 30


def test_the_estimate_suggests_nothing_on_a_gpu_or_under_an_hour() -> None:
    def cost(arch: str, side: int) -> float:
        return (side / 224) ** 2

    candidates = estimate.smaller_settings("resnet50", 224, 64)
    assert candidates[:4] == [("resnet50", 224), ("resnet50", 160), ("resnet50", 128), ("resnet50", 96)]
    assert candidates[4] == ("resnet18", 224)
    gpu = estimate.estimate_line(2.0, 100_000, 1000, 100, False, cost, candidates)
    assert gpu == "estimated time: 2 d 7 h for 100000 steps (2 s per step, measured)"
    assert "fit" not in estimate.estimate_line(0.5, 7000, 70, 100, True, cost, candidates)  # 58 min
    # 300 s per epoch at 224 px: 160 px fits 23 epochs, 128 px (0.33 of the cost) 36, shown as 35.
    slow = estimate.estimate_line(10.0, 3000, 30, 100, True, cost, candidates)
    assert slow == (
        "estimated time: 8 h 20 min for 3000 steps (10 s per step, measured); "
        "to fit an hour on this CPU: --image-size 128 --arch resnet50 --epochs 35 ≈ 57 min"
    )


def test_without_a_batch_size_a_small_folder_trains_on_all_its_images(tmp_path: Path) -> None:
    # the README's first command failed on any folder under 256 images (issue 22, item 11)
    folder = _folder(tmp_path / "images", count=12)
    paths = find_images(folder)
    assert pretrain.resolve(PretrainConfig(data=folder), paths).batch_size == 12
    assert pretrain.resolve(PretrainConfig(data=folder), paths, processes=8).batch_size == 8  # splits evenly
    assert pretrain.resolve(PretrainConfig(data=folder), paths * 30).batch_size == pretrain.DEFAULT_BATCH
    assert pretrain.resolve(PretrainConfig(data=folder, batch_size=4), paths).batch_size == 4  # given: kept
    with pytest.raises(UserError, match="1 image\\(s\\); contrastive pretraining needs at least 2"):
        pretrain.resolve(PretrainConfig(data=folder), paths[:1])
    result = runner.invoke(app, [
        "pretrain", str(folder), "--arch", "test_resnet", "--no-small-stem", "--epochs", "1",
        "--out", str(tmp_path / "run"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    line = "batch 12: the default 256 is more than the 12 images in"
    assert line in result.output.replace("\n", " ")
    record = json.loads((tmp_path / "run" / "pretrain" / "run.json").read_text())
    assert record["config"]["batch_size"] == 12 and record["automatic_batch"].startswith(line)
    # an explicit batch larger than the folder is still refused (exit 2)
    args = ["pretrain", str(folder), "--batch-size", "64", "--out", str(tmp_path / "r2")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--batch-size 64 is larger than the 12 images" in result.output


def test_a_refused_resume_names_the_images_that_appeared_or_vanished(tmp_path: Path) -> None:
    from labelfew.engine import checkpoint

    folder = _folder(tmp_path / "images", count=4)
    paths = find_images(folder)
    config = pretrain.resolve(PretrainConfig(data=folder, batch_size=2), paths)
    saved = pretrain.fingerprint(config, paths)
    current = pretrain.fingerprint(config, [*paths[1:], folder / "new.png"])
    with pytest.raises(UserError, match=r"1 file\(s\) appeared: new.png; 1 file\(s\) vanished: 0.png\)"):
        checkpoint.check_fingerprint(tmp_path / "step-00000001", saved, current)
