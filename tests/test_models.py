"""Models by shape and finiteness on CPU (as timm's test_models.py does), at 32 px."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from labelfew.artifacts import load_artifact, save_tensors
from labelfew.errors import UserError
from labelfew.models import (
    Classifier,
    ProjectionHead,
    SimCLRModel,
    build_backbone,
    build_model,
    features_model,
    head_prefix,
    load_model,
)
from labelfew.spec import HeadSpec, ModelSpec

BATCH = 2


def _images(side: int = 32) -> torch.Tensor:
    return torch.randn(BATCH, 3, side, side, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("arch", "small_stem", "side_after_stem"),
    [
        ("test_resnet", False, 8),
        ("test_resnet", True, 32),
        ("resnet18", False, 8),
        ("resnet18", True, 32),
        ("resnet18d", True, 32),
    ],
)
def test_resnet_backbones_give_finite_pooled_features(
    arch: str, small_stem: bool, side_after_stem: int
) -> None:
    torch.manual_seed(0)
    model = build_backbone(arch, small_stem=small_stem)
    entering_layer1: list[int] = []
    model.layer1.register_forward_pre_hook(lambda _, inputs: entering_layer1.append(inputs[0].shape[-1]))  # type: ignore[union-attr]
    with torch.no_grad():
        features = model.train()(_images())
    assert features.shape == (BATCH, model.num_features)
    assert torch.isfinite(features).all()
    # The small stem keeps a 32 px image at 32 px into layer1; the ImageNet stem shrinks it 4×.
    assert entering_layer1 == [side_after_stem]


def test_gradients_reach_every_parameter_through_the_small_stem() -> None:
    torch.manual_seed(0)
    model = build_backbone("test_resnet", small_stem=True)
    model.train()(_images()).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_small_stem_is_a_3x3_stride_1_conv_without_max_pool() -> None:
    model = build_backbone("resnet18", small_stem=True)
    assert isinstance(model.conv1, nn.Conv2d)
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)
    deep = build_backbone("resnet18d", small_stem=True)
    first = deep.conv1[0]  # type: ignore[index]
    assert isinstance(first, nn.Conv2d) and first.stride == (1, 1) and first.in_channels == 3
    assert [m.stride for m in deep.conv1 if isinstance(m, nn.Conv2d)][1:] == [(1, 1), (1, 1)]  # type: ignore[union-attr]


def test_standard_stem_keeps_timms_key_layout() -> None:
    ours = build_backbone("test_resnet", small_stem=False).state_dict()
    reference = timm.create_model("test_resnet", num_classes=0).state_dict()
    assert {key: value.shape for key, value in ours.items()} == {
        key: value.shape for key, value in reference.items()
    }


@pytest.mark.parametrize("arch", ["test_vit", "test_convnext"])
def test_non_resnet_without_small_stem_works(arch: str) -> None:
    model = build_backbone(arch, small_stem=False, image_size=32)
    with torch.no_grad():
        features = model.eval()(_images())
    assert features.shape == (BATCH, model.num_features)
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("arch", ["test_vit", "test_convnext"])
def test_non_resnet_with_small_stem_is_a_user_error(arch: str) -> None:
    with pytest.raises(UserError, match=f"--arch {arch}: the small-image stem .*--no-small-stem"):
        build_backbone(arch, small_stem=True, image_size=32)


@pytest.mark.parametrize(
    ("arch", "suggested"),
    [("resnet81", "resnet18"), ("resnet", "resnet18"), ("RESNET18D", "resnet18d")],
)
def test_unknown_arch_is_a_user_error_with_suggestions(arch: str, suggested: str) -> None:
    with pytest.raises(UserError, match=rf"--arch {arch}: not a timm model \(did you mean .*\b{suggested}\b"):
        build_backbone(arch, small_stem=False)


def test_unknown_arch_without_anything_close() -> None:
    with pytest.raises(UserError, match=r"not a timm model \(see timm.list_models\(\)\)"):
        build_backbone("zzzqqq", small_stem=False)


def test_pretrained_tag_names_are_accepted() -> None:
    model = build_backbone("test_resnet.r160_in1k", small_stem=False)
    assert model.num_features == timm.create_model("test_resnet", num_classes=0).num_features


@pytest.mark.parametrize(("depth", "hidden_layers"), [(2, 1), (3, 2)])
def test_projection_head_shapes(depth: int, hidden_layers: int) -> None:
    head = ProjectionHead(in_features=96, hidden_dim=64, output_dim=16, depth=depth)
    assert len(head.layers) == hidden_layers + 1
    assert isinstance(head.layers[-1], nn.Linear) and head.layers[-1].out_features == 16
    for block in list(head.layers)[:-1]:
        linear, norm, _ = block  # type: ignore[misc]
        assert linear.bias is None and isinstance(norm, nn.BatchNorm1d)
    output = head.train()(torch.randn(4, 96))
    assert output.shape == (4, 16) and torch.isfinite(output).all()


@pytest.mark.parametrize("depth", [1, 0, -1])
def test_projection_head_depth_below_two_is_a_user_error(depth: int) -> None:
    with pytest.raises(UserError, match=f"--projection-depth {depth}"):
        ProjectionHead(in_features=8, hidden_dim=8, depth=depth)


def test_head_prefix_takes_the_first_hidden_blocks() -> None:
    head = ProjectionHead(in_features=96, hidden_dim=64, output_dim=16, depth=3)
    first = head_prefix(head, 1)
    assert len(first) == 1 and first[0] is head.layers[0]  # shares the pretrained weights
    assert first.eval()(torch.randn(3, 96)).shape == (3, 64)
    assert len(head_prefix(head, 2)) == 2
    for layers in (0, 3, -1):
        with pytest.raises(UserError, match=f"--from-head-layer {layers}: this head has hidden layers 1..2"):
            head_prefix(head, layers)


def test_simclr_model_projects_backbone_features() -> None:
    backbone = build_backbone("test_resnet", small_stem=True)
    model = SimCLRModel(backbone, ProjectionHead(backbone.num_features, 32, 8, depth=2))
    projections = model.train()(_images())
    assert projections.shape == (BATCH, 8) and torch.isfinite(projections).all()


def test_classifier_without_head_layers() -> None:
    backbone = build_backbone("test_resnet", small_stem=True)
    classifier = Classifier(backbone, num_classes=5)
    assert classifier.classifier.in_features == backbone.num_features
    assert set(classifier.state_dict()) >= {"classifier.weight", "classifier.bias"}
    assert not any(key.startswith("head.") for key in classifier.state_dict())
    with torch.no_grad():
        logits = classifier.eval()(_images())
    assert logits.shape == (BATCH, 5) and torch.isfinite(logits).all()


def test_classifier_with_head_layers() -> None:
    backbone = build_backbone("test_resnet", small_stem=True)
    head = ProjectionHead(backbone.num_features, hidden_dim=48, output_dim=16, depth=3)
    classifier = Classifier(backbone, num_classes=4, head=head_prefix(head, 1))
    assert classifier.classifier.in_features == 48
    assert any(key.startswith("head.0.0.") for key in classifier.state_dict())
    with torch.no_grad():
        classifier.eval()
        assert classifier.features(_images()).shape == (BATCH, 48)
        logits = classifier(_images())
    assert logits.shape == (BATCH, 4) and torch.isfinite(logits).all()


# --- build_model / load_model: one way to rebuild a model from its spec ---------------------------


@pytest.mark.parametrize(
    ("spec", "kind", "width"),
    [
        (ModelSpec("test_resnet", 32, True, 96), nn.Module, 96),
        (ModelSpec("test_resnet", 32, True, 96, class_names=("a", "b", "c")), Classifier, 3),
        (
            ModelSpec(
                "test_resnet",
                32,
                False,
                96,
                head=HeadSpec(3, 32, 16),
                from_head_layer=1,
                class_names=("a", "b"),
            ),
            Classifier,
            2,
        ),
    ],
)
def test_build_model_follows_the_spec(spec: ModelSpec, kind: type, width: int) -> None:
    model = build_model(spec)
    assert isinstance(model, kind)
    assert isinstance(features_model(model).maxpool, nn.Identity) is spec.small_stem
    with torch.no_grad():
        assert model.eval()(_images()).shape == (BATCH, width)
    assert features_model(model)(_images()).shape == (BATCH, 96)


def test_build_model_refuses_a_head_layer_without_a_head() -> None:
    with pytest.raises(UserError, match="without a recorded projection head"):
        build_model(ModelSpec("test_resnet", 32, True, 96, from_head_layer=1, class_names=("a", "b")))


def test_load_model_round_trips_and_refuses_what_is_not_a_model(tmp_path: Path) -> None:
    import labelfew.stages  # noqa: F401  (registers pretrain and finetune)

    spec = ModelSpec(
        "test_resnet", 32, True, 96, head=HeadSpec(3, 32, 16), from_head_layer=1, class_names=("a", "b")
    )
    torch.manual_seed(0)
    original = build_model(spec)
    path = tmp_path / "model.safetensors"
    save_tensors(path, original.state_dict(), {"stage": "finetune", **spec.to_metadata()})
    loaded = load_model(load_artifact(path))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(_images()), original.eval()(_images()))
    other = tmp_path / "embeddings.safetensors"
    save_tensors(
        other, {"embeddings": torch.ones(2, 96)}, {"stage": "embeddings", **spec.backbone().to_metadata()}
    )
    with pytest.raises(UserError, match="a embeddings file; pass a pretrain, finetune or distill artifact"):
        load_model(load_artifact(other))
    wrong = tmp_path / "wrong.safetensors"
    save_tensors(wrong, {"w": torch.ones(1)}, {"stage": "pretrain", **spec.backbone().to_metadata()})
    with pytest.raises(UserError, match="its tensors do not fit test_resnet"):
        load_model(load_artifact(wrong))
