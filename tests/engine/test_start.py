"""Where fine-tuning's weights come from: the pretrained backbone, its arch check, or random init."""

from __future__ import annotations

from pathlib import Path

import pytest

from labelfew.artifacts import load_artifact
from labelfew.data.images import find_images
from labelfew.engine.init_weights import read_init
from labelfew.engine.start import DEFAULT_ARCH, finetune_start, init_start, load_pretrained
from labelfew.errors import UserError
from labelfew.spec import IMAGENET_MEAN, IMAGENET_STD


def test_the_pretrained_backbone_gives_arch_size_stem_and_normalisation(tiny_pretrained: Path) -> None:
    run = tiny_pretrained / "run"
    backbone = load_artifact(run / "pretrain" / "backbone.safetensors", "pretrain")
    start = finetune_start(run, False, None, None, [])
    assert start.artifact is not None and start.artifact.path == backbone.path
    spec = backbone.spec
    assert (start.arch, start.image_size, start.small_stem) == ("test_resnet", spec.image_size, False)
    assert (start.mean, start.std) == (spec.mean, spec.std)
    assert finetune_start(run, False, "test_resnet", 48, []).image_size == 48  # --image-size wins


def test_an_arch_other_than_the_pretrained_one_is_refused_naming_the_flag(tiny_pretrained: Path) -> None:
    run = tiny_pretrained / "run"
    with pytest.raises(UserError, match=r"^--from .*pretrained as test_resnet, but --arch resnet18"):
        finetune_start(run, False, "resnet18", None, [])
    with pytest.raises(UserError, match=r"pretrained as test_resnet"):
        finetune_start(run, True, "resnet18", None, [])  # --scratch still takes arch and size from the run
    with pytest.raises(UserError, match=r"^--from-pretrain .*drop --arch or pretrain resnet18$"):
        load_pretrained(run, "resnet18", "--from-pretrain")
    assert load_pretrained(run, "test_resnet").arch == "test_resnet"


def test_scratch_without_a_pretrain_starts_from_random_init_sized_by_the_images(
    tiny_pretrained: Path, tmp_path: Path
) -> None:
    empty = tmp_path
    with pytest.raises(UserError):
        finetune_start(empty, False, None, None, [])
    paths = find_images(tiny_pretrained / "labels")
    start = finetune_start(empty, True, None, None, paths)
    # 32 px digits: the small-image stem, ImageNet normalisation, SimCLR's CIFAR backbone
    assert (start.artifact, start.arch, start.image_size, start.small_stem) == (None, DEFAULT_ARCH, 32, True)
    assert (start.mean, start.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_init_start_takes_an_init_already_read(tiny_pretrained: Path) -> None:
    """`finetune` reads `--init` before any image is opened, then makes its start from that read."""
    run = str(tiny_pretrained / "run")
    read = read_init(run)
    start = init_start(read, None, None, None, None, [])
    again = init_start(run, None, None, None, None, [])
    assert start.init is read
    assert (start.arch, start.image_size, start.small_stem, start.mean, start.std) == (
        again.arch,
        again.image_size,
        again.small_stem,
        again.mean,
        again.std,
    )


def test_a_windowed_starts_decoding_record_compares_equal_after_a_json_round_trip() -> None:
    """Fingerprints are read back from fingerprint.json: a tuple window would never equal its list,
    and a windowed run could never resume."""
    import json

    from labelfew.engine.start import Start

    start = Start(None, "test_resnet", 32, True, (0.5,), (0.25,), channels=1, window=(0.0, 4095.0))
    record = start.decoding_record()
    assert json.loads(json.dumps(record)) == record
    assert record == {
        "channels": 1,
        "window": [0.0, 4095.0],
        "file_windows": True,
        "mean": [0.5],
        "std": [0.25],
    }
