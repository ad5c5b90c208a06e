"""ModelSpec: round trips, the metadata of artifacts written before it existed, and the rules it owns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from labelfew.errors import UserError
from labelfew.spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SMALL_IMAGE_SIDE,
    HeadSpec,
    ModelSpec,
    eval_resize_side,
    uses_small_stem,
)

FIXTURE_RUN = Path(__file__).parent / "fixtures" / "v1_run"

SPECS = [
    ModelSpec("test_resnet", 32, True, 96),
    ModelSpec("resnet18", 224, False, 512, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
    ModelSpec("test_resnet", 32, True, 96, head=HeadSpec(3, 32, 16)),
    ModelSpec("test_resnet", 64, True, 96, class_names=("ants", "bees"), scratch=True),
    ModelSpec(
        "test_resnet",
        96,
        False,
        96,
        head=HeadSpec(3, 96, 128),
        from_head_layer=1,
        class_names=("a", "b", "c"),
    ),
]


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as reader:
        return dict(reader.metadata())


@pytest.mark.parametrize("spec", SPECS)
def test_metadata_round_trip(spec: ModelSpec) -> None:
    metadata = spec.to_metadata()
    assert all(isinstance(value, str) for value in metadata.values())
    assert ModelSpec.from_metadata(metadata) == spec


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "pretrain/backbone.safetensors",
            ModelSpec("test_resnet", 32, True, 96, IMAGENET_MEAN, IMAGENET_STD),
        ),
        (
            "pretrain/head.safetensors",
            ModelSpec("test_resnet", 32, True, 96, head=HeadSpec(depth=3, hidden=32, dim=16)),
        ),
        (
            "finetune-v1_labels/model.safetensors",
            ModelSpec(
                "test_resnet", 32, True, 96, head=HeadSpec(3, 32, 16), from_head_layer=1,
                class_names=("0", "1", "7"), scratch=False,
            ),
        ),
    ],
)  # fmt: skip
def test_reads_the_metadata_of_artifacts_written_before_the_spec(name: str, expected: ModelSpec) -> None:
    metadata = _metadata(FIXTURE_RUN / name)
    spec = ModelSpec.from_metadata(metadata)
    assert spec == expected
    # and writes back exactly the keys and strings the old code wrote
    written = spec.to_metadata()
    assert {key: metadata[key] for key in written} == written
    spec_keys = set(metadata) - {"stage", "config", "format_version", "labelfew_version", "part"}
    assert spec_keys == set(written)


def test_incomplete_metadata_names_the_file() -> None:
    metadata = SPECS[0].to_metadata()
    del metadata["image_size"]
    with pytest.raises(UserError, match=r"model.safetensors: its model description is incomplete"):
        ModelSpec.from_metadata(metadata, where="model.safetensors")
    with pytest.raises(UserError, match="unreadable"):
        ModelSpec.from_metadata({**SPECS[0].to_metadata(), "mean": "[0.5,"})


def test_backbone_spec_drops_head_and_classes() -> None:
    backbone = SPECS[4].backbone()
    assert backbone == ModelSpec("test_resnet", 96, False, 96)
    assert not backbone.is_classifier and SPECS[4].is_classifier
    assert json.loads(SPECS[4].to_metadata()["class_names"]) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("image_size", "resize", "small"),
    [(8, 8, True), (32, 32, True), (64, 64, True), (65, 74, False), (96, 110, False), (224, 256, False)],
)
def test_the_small_image_and_resize_rules(image_size: int, resize: int, small: bool) -> None:
    assert eval_resize_side(image_size) == resize
    assert uses_small_stem(image_size) is small
    assert ModelSpec("resnet18", image_size, small, 512).resize_side == resize
    assert (image_size <= SMALL_IMAGE_SIDE) is small


def test_the_init_a_model_started_from_is_kept_in_the_metadata_and_by_its_backbone() -> None:
    spec = ModelSpec(
        "resnet18",
        224,
        False,
        512,
        class_names=("a", "b"),
        init="timm:resnet18.a1_in1k",
        init_sha256="0" * 64,
    )
    metadata = spec.to_metadata()
    assert metadata["init"] == "timm:resnet18.a1_in1k" and metadata["init_sha256"] == "0" * 64
    assert ModelSpec.from_metadata(metadata) == spec
    assert spec.backbone().init == spec.init and spec.backbone().init_sha256 == spec.init_sha256
    plain = ModelSpec("resnet18", 224, False, 512)
    assert "init" not in plain.to_metadata() and ModelSpec.from_metadata(plain.to_metadata()).init is None
