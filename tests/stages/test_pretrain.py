"""Pretrain stage: where the views are made, the batched path's batches, --compile, --init, --decode-on."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
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
from labelfew.engine import estimate, simclr
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
    config = simclr.resolve(PretrainConfig(data=folder, arch="test_resnet", batch_size=8), paths)
    assert config.augment_on == "device" and config.image_size == 32
    accelerator = engine.make_accelerator("no", seed=0)
    batches, undecodable = pretrain.build_batches(config, paths, accelerator, per_process=8)
    assert isinstance(batches, MemoryBatches) and len(batches) == 2  # 20 decoded images, batch 8
    assert undecodable == [str(folder / "broken.jpg")]
    batch = next(iter(batches))
    assert batch.images.shape == (8, 3, 32, 32) and batch.images.dtype == torch.uint8
    first, second = SimCLRViews(simclr.view_config(config))(batch.images, batch.sizes, batch.generator())
    assert first.shape == second.shape == (8, 3, 32, 32) and first.dtype == torch.float32
    assert not torch.equal(first, second)


def test_workers_place_streams_uint8_batches(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "images", count=16)
    paths = find_images(folder)
    config = simclr.resolve(
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
    config = simclr.resolve(PretrainConfig(data=tmp_path / "images", color_strength=strength), paths)
    assert config.color_strength == strength
    assert simclr.view_config(config).color_strength == strength


def test_zero_sized_numeric_options_are_refused_not_replaced_by_defaults(tmp_path: Path) -> None:
    paths = find_images(_folder(tmp_path / "images", count=4))
    with pytest.raises(UserError, match="--image-size 0"):  # it became the images' 32 px
        simclr.resolve(PretrainConfig(data=tmp_path / "images", image_size=0), paths)
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
    assert simclr.resolve(PretrainConfig(data=folder), paths).batch_size == 12
    assert simclr.resolve(PretrainConfig(data=folder), paths, processes=8).batch_size == 8  # splits evenly
    assert simclr.resolve(PretrainConfig(data=folder), paths * 30).batch_size == simclr.DEFAULT_BATCH
    assert simclr.resolve(PretrainConfig(data=folder, batch_size=4), paths).batch_size == 4  # given: kept
    with pytest.raises(UserError, match="1 image\\(s\\); contrastive pretraining needs at least 2"):
        simclr.resolve(PretrainConfig(data=folder), paths[:1])
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
    config = simclr.resolve(PretrainConfig(data=folder, batch_size=2), paths)
    saved = simclr.fingerprint(config, paths)
    current = simclr.fingerprint(config, [*paths[1:], folder / "new.png"])
    with pytest.raises(UserError, match=r"1 file\(s\) appeared: new.png; 1 file\(s\) vanished: 0.png\)"):
        checkpoint.check_fingerprint(tmp_path / "step-00000001", saved, current)


def _export_folder(folder: Path, arch: str = "test_resnet", seed: int = 3) -> dict[str, torch.Tensor]:
    """A folder as `labelfew export` writes one (config.json + model.safetensors) with seeded weights
    of a whole timm model (its classifier too) and its own mean/std; returns the tensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = {key: value.clone() for key, value in timm.create_model(arch, num_classes=5).state_dict().items()}
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    config = {"architecture": arch, "pretrained_cfg": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}}
    (folder / "config.json").write_text(json.dumps(config))
    return state


def _spy_on_the_first_step(monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """Wraps the contrastive step so that the backbone's state as the first step receives it (before
    any forward pass or optimizer step) is copied into the returned dict."""
    seen: dict[str, torch.Tensor] = {}
    original = pretrain.contrastive_step

    def spying(*args: object, **kwargs: object) -> engine.StepFunction:
        step = original(*args, **kwargs)  # type: ignore[arg-type]

        def first(model: torch.nn.Module, batch: object) -> tuple[torch.Tensor, int]:
            if not seen:
                backbone = getattr(model, "module", model).backbone
                seen.update({key: value.detach().clone() for key, value in backbone.state_dict().items()})
            return step(model, batch)  # type: ignore[arg-type]

        return first

    monkeypatch.setattr(pretrain, "contrastive_step", spying)
    return seen


def test_init_pretraining_starts_from_its_tensors_and_records_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from labelfew.fileio import sha256_file

    folder = _folder(tmp_path / "images", count=8)
    state = _export_folder(tmp_path / "init")
    seen = _spy_on_the_first_step(monkeypatch)
    result = runner.invoke(app, [
        "pretrain", str(folder), "--init", str(tmp_path / "init"), "--epochs", "1", "--batch-size", "8",
        "--workers", "0", "--out", str(tmp_path / "run"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    backbone = build_backbone("test_resnet", small_stem=False).state_dict()
    assert seen.keys() == backbone.keys()
    for key in backbone:  # exactly the init's tensors, not a random init of the same shape
        assert torch.equal(seen[key], state[key]), key
    assert f"init {tmp_path / 'init'}: {len(backbone)} tensors loaded" in " ".join(result.output.split())
    sha = sha256_file(tmp_path / "init" / "model.safetensors")
    stage = tmp_path / "run" / "pretrain"
    from safetensors import safe_open

    with safe_open(str(stage / "backbone.safetensors"), framework="pt") as reader:
        metadata = reader.metadata()
    assert metadata["init"] == str(tmp_path / "init") and metadata["init_sha256"] == sha
    assert json.loads(metadata["mean"]) == [0.5, 0.4, 0.3] and json.loads(metadata["std"]) == [0.2, 0.25, 0.3]
    record = json.loads((stage / "run.json").read_text())
    assert record["init"]["source"] == str(tmp_path / "init") and record["init"]["sha256"] == sha
    assert set(record["init"]["skipped"]) == {"fc.weight", "fc.bias"} and record["init"]["random"] == []
    # the init's arch; its ImageNet-style stem kept at 32 px (the small stem would start conv1 random)
    assert record["config"]["arch"] == "test_resnet" and record["config"]["small_stem"] is False


def test_init_views_are_normalised_with_the_inits_mean_and_std(tmp_path: Path) -> None:
    from labelfew.engine.start import init_start

    paths = find_images(_folder(tmp_path / "images", count=4))
    _export_folder(tmp_path / "init")
    config = PretrainConfig(data=tmp_path / "images", init=str(tmp_path / "init"), batch_size=2)
    start = init_start(str(tmp_path / "init"), None, None, None, None, paths)
    views = simclr.view_config(simclr.resolve(config, paths, init=start), start)
    assert views.mean == (0.5, 0.4, 0.3) and views.std == (0.2, 0.25, 0.3)


def test_a_small_stem_over_an_init_starts_its_first_conv_random_and_says_so(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    folder = _folder(tmp_path / "images", count=4)
    weights = {key: value for key, value in timm.create_model("resnet18", num_classes=0).state_dict().items()}
    save_file(weights, str(tmp_path / "r18.safetensors"), metadata={"architecture": "resnet18"})
    result = runner.invoke(app, [
        "pretrain", str(folder), "--init", str(tmp_path / "r18.safetensors"), "--small-stem", "--epochs", "1",
        "--batch-size", "4", "--workers", "0", "--projection-dim", "8", "--out", str(tmp_path / "run"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "--small-stem: conv1.weight start(s) random" in " ".join(result.output.split())
    record = json.loads((tmp_path / "run" / "pretrain" / "run.json").read_text())
    assert record["init"]["random"] == ["conv1.weight"] and record["config"]["small_stem"] is True


def _spy_on_decoding(marker: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[int]]:
    """Counts PIL's `Image.open`, which every header read and decode of these PNG files goes through."""
    original = Image.open

    def spy(*args: object, **kwargs: object) -> Image.Image:
        with marker.open("a", encoding="utf-8") as handle:
            handle.write("1\n")
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", spy)
    return lambda: marker.read_text().split() if marker.is_file() else []


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--init", "{init}/cut.safetensors"], "cut.safetensors: not a readable safetensors file"),
        (["--init", "{init}", "--arch", "resnet18"], "weights of test_resnet, but --arch resnet18 was asked"),
        (["--init-prefix", "module."], "--init-prefix module.: only with --init"),
    ],
)
def test_a_bad_init_exits_2_in_one_line_before_any_image_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str], expected: str
) -> None:
    folder = _folder(tmp_path / "images", count=4)
    _export_folder(tmp_path / "init")
    data = (tmp_path / "init" / "model.safetensors").read_bytes()
    (tmp_path / "init" / "cut.safetensors").write_bytes(data[: len(data) // 2])
    opened = _spy_on_decoding(tmp_path / "opened", monkeypatch)
    args = [value.format(init=tmp_path / "init") for value in extra]
    result = runner.invoke(app, ["pretrain", str(folder), "--out", str(tmp_path / "run"), *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert opened() == [], "an image was opened before the bad init was refused"


@pytest.mark.skipif(torch.cuda.is_available(), reason="--decode-on device is valid where CUDA is")
def test_decode_on_device_without_cuda_exits_2_before_any_image_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(tmp_path / "images", count=4)
    opened = _spy_on_decoding(tmp_path / "opened", monkeypatch)
    result = runner.invoke(
        app, ["pretrain", str(folder), "--decode-on", "device", "--out", str(tmp_path / "r")]
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "--decode-on device decodes JPEGs with nvJPEG on a CUDA GPU; this run is on cpu" in lines[0]
    assert opened() == []


def test_a_changed_init_refuses_to_resume_and_no_init_keeps_the_old_keys(tmp_path: Path) -> None:
    from labelfew.engine import checkpoint
    from labelfew.engine.start import init_start

    folder = _folder(tmp_path / "images", count=4)
    paths = find_images(folder)
    _export_folder(tmp_path / "init")
    start = init_start(str(tmp_path / "init"), None, None, None, None, paths)
    config = simclr.resolve(
        PretrainConfig(data=folder, init=str(tmp_path / "init"), batch_size=2), paths, init=start
    )
    saved = simclr.fingerprint(config, paths, start)
    assert start.init is not None and saved["init_sha256"] == start.init.sha256
    other = dataclasses.replace(start, init=dataclasses.replace(start.init, sha256="0" * 64))
    with pytest.raises(UserError, match=r"init_sha256 '[0-9a-f]{64}' → '0{64}'"):
        checkpoint.check_fingerprint(
            tmp_path / "step-00000001", saved, simclr.fingerprint(config, paths, other)
        )
    # a run without --init fingerprints as before --init and --decode-on existed: its checkpoints resume
    plain = simclr.fingerprint(simclr.resolve(PretrainConfig(data=folder, batch_size=2), paths), paths)
    assert not {"init_sha256", "init", "decode_on"} & set(plain) and plain["init_prefix"] is None


def test_run_json_counts_the_files_the_device_decoded() -> None:
    facts = simclr.RunFacts(
        8, [], 0.1, "cpu", 1, "BatchNorm", decoded={"device_decoded": 7, "cpu_fallbacks": 1}
    )
    result = engine.FitResult(epochs=1, steps=1, seconds=1.0, views_per_second=16.0, final_loss=2.0)
    config = PretrainConfig(data=Path("d"), arch="test_resnet", batch_size=8, decode_on="device")
    record = simclr.run_record(config, facts, result, {"backbone.safetensors": "a"})
    assert record["data"]["device_decoded"] == 7 and record["data"]["cpu_fallbacks"] == 1
    assert record["config"]["decode_on"] == "device" and "init" not in record


def test_queue_run_saves_the_trained_encoder_and_a_too_long_queue_fails_in_one_line(tmp_path: Path) -> None:
    """`--queue` (issue 27): the artifact holds the online encoder's tensors only (its keys and
    shapes as without a queue), the summary names the queue, and run.json records it."""
    folder = _folder(tmp_path / "images", count=8)
    common = ["pretrain", str(folder), "--arch", "test_resnet", "--epochs", "2", "--batch-size", "4",
              "--workers", "0"]  # fmt: skip
    refused = runner.invoke(app, [*common, "--queue", "17", "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2
    assert "--queue 17 holds more keys than an epoch makes (2 per image, 16" in " ".join(
        refused.output.split()
    )
    assert not (tmp_path / "refused" / "pretrain" / "checkpoints").exists()  # before any training
    result = runner.invoke(app, [*common, "--queue", "12", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "queue of 12 keys (momentum 0.999)" in " ".join(result.output.split())
    assert "(chance 2.94)" in result.output  # log(2 × 4 − 1 + 12): the queue's keys are candidates too
    stage = tmp_path / "run" / "pretrain"
    backbone = build_backbone("test_resnet", small_stem=True).state_dict()
    saved = load_file(str(stage / "backbone.safetensors"))
    assert saved.keys() == backbone.keys() and all(saved[k].shape == backbone[k].shape for k in backbone)
    assert json.loads((stage / "run.json").read_text())["config"]["queue"] == 12
    last = sorted((stage / "checkpoints").iterdir())[-1]
    queue = load_file(str(last / "ema.safetensors"))
    assert queue["_queue.keys"].shape == (12, 128) and int(queue["_queue.filled"]) == 12


def test_continued_pretraining_has_its_own_epochs_and_warmup_defaults(tmp_path: Path) -> None:
    from labelfew.config.training import DEFAULT_EPOCHS, INIT_EPOCHS
    from labelfew.engine.start import init_start

    folder = _folder(tmp_path / "images", count=4)
    paths = find_images(folder)
    _export_folder(tmp_path / "init")
    start = init_start(str(tmp_path / "init"), None, None, None, None, paths)
    continued = simclr.resolve(
        PretrainConfig(data=folder, init=str(tmp_path / "init"), batch_size=2), paths, init=start
    )
    assert (continued.epochs, continued.warmup_epochs) == (INIT_EPOCHS, INIT_EPOCHS / 10)
    plain = simclr.resolve(PretrainConfig(data=folder, batch_size=2), paths)
    assert (plain.epochs, plain.warmup_epochs) == (DEFAULT_EPOCHS, 10.0) == (100, 10.0)
    given = simclr.resolve(PretrainConfig(data=folder, init=str(tmp_path / "init"), batch_size=2, epochs=30), paths,
                           init=start)  # fmt: skip
    assert (given.epochs, given.warmup_epochs) == (30, 3.0)  # a given --epochs wins, warmup 10% of it
