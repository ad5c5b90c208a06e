"""Backbones (through timm), the small-image stem, the projection head and the classifier;
`load_model`, the one way every stage and use command rebuilds a model from its artifact."""

from __future__ import annotations

import difflib

import timm
import torch
from torch import nn

from labelfew.artifacts import Artifact, load_artifact
from labelfew.errors import UserError
from labelfew.registry import either, stage_names
from labelfew.spec import HeadSpec, ModelSpec


def build_backbone(
    arch: str, small_stem: bool, image_size: int | None = None, channels: int = 3
) -> nn.Module:
    """A timm model with no classifier, returning pooled features of size `num_features`.

    Args:
        arch: any timm model name (`timm.list_models()`), e.g. resnet18, resnet50, vit_small_patch16_224.
        small_stem: replace a ResNet-style stem (7×7 stride-2 conv + max-pool) with a 3×3 stride-1
            conv and no pool, as the SimCLR paper does for CIFAR-10 (appendix B.9). Without it a
            32 px image is 8 px after the stem and most of the network sees almost nothing.
        image_size: passed to models whose size is fixed at build time (vision transformers).
        channels: input channels (timm's ``in_chans``): 1 for grayscale, 3 for RGB, N for
            multi-channel images; the small stem takes as many.

    Raises:
        UserError: unknown arch, `small_stem` for a model without a ResNet-style stem, or
            channels < 1.
    """
    if channels < 1:
        raise UserError(f"--channels {channels}: a model needs at least one input channel")
    if not timm.is_model(arch):
        close = _similar_models(arch)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see timm.list_models())"
        raise UserError(f"--arch {arch}: not a timm model{hint}")
    model = _create(arch, image_size, channels)
    if not hasattr(model, "num_features"):
        raise UserError(
            f"--arch {arch}: the timm model has no num_features; choose a classification backbone"
        )
    if small_stem:
        _use_small_stem(model, arch)
    return model


def _similar_models(arch: str, limit: int = 5) -> list[str]:
    """timm names containing `arch`, else the closest spellings (resnet81 -> resnet18)."""
    names = timm.list_models()
    wanted = arch.lower()
    containing = sorted(
        (name for name in names if wanted in name), key=lambda name: not name.startswith(wanted)
    )
    return containing[:limit] or difflib.get_close_matches(arch.lower(), names, n=limit, cutoff=0.6)


def _create(arch: str, image_size: int | None, channels: int) -> nn.Module:
    """Models built for a fixed input size (ViTs) take `img_size`; the others refuse it."""
    if image_size is not None:
        try:
            return timm.create_model(
                arch, pretrained=False, num_classes=0, img_size=image_size, in_chans=channels
            )
        except TypeError:
            pass
    return timm.create_model(arch, pretrained=False, num_classes=0, in_chans=channels)


def _use_small_stem(model: nn.Module, arch: str) -> None:
    stem = getattr(model, "conv1", None)
    if not hasattr(model, "maxpool") or stem is None:
        raise UserError(
            f"--arch {arch}: the small-image stem is implemented for ResNet-style models "
            "(conv1 + maxpool); pass --no-small-stem or choose a resnet"
        )
    first = (
        stem if isinstance(stem, nn.Conv2d) else next(m for m in stem.modules() if isinstance(m, nn.Conv2d))
    )
    replacement = nn.Conv2d(
        first.in_channels, first.out_channels, kernel_size=3, stride=1, padding=1, bias=False
    )
    if isinstance(stem, nn.Conv2d):
        model.conv1 = replacement
    else:  # deep stems (resnet*d, *t): a sequence of 3×3 convs; drop the stride of the first
        names = [name for name, module in stem.named_modules() if module is first]
        parent_name, _, child_name = names[0].rpartition(".")
        parent = stem.get_submodule(parent_name) if parent_name else stem
        first_stride_one = nn.Conv2d(
            first.in_channels, first.out_channels, kernel_size=3, stride=1, padding=1, bias=False
        )
        setattr(parent, child_name, first_stride_one)
    model.maxpool = nn.Identity()


class ProjectionHead(nn.Module):
    """The SimCLR projection MLP g(·) on top of the backbone features.

    depth 2 is SimCLR v1 (arXiv 2002.05709): Linear → BN → ReLU → Linear. depth 3 is SimCLR v2
    (arXiv 2006.10029), which also fine-tunes from the first layer of the head
    (`--from-head-layer 1`). Every hidden block is Linear (no bias) → BatchNorm → ReLU.

    Shape: (batch_size, in_features) -> (batch_size, output_dim)
    """

    def __init__(self, in_features: int, hidden_dim: int, output_dim: int = 128, depth: int = 2) -> None:
        super().__init__()
        if depth < 2:
            raise UserError(f"--projection-depth {depth}: use 2 (SimCLR v1) or 3 (SimCLR v2)")
        blocks: list[nn.Module] = []
        width = in_features
        for _ in range(depth - 1):
            blocks.append(
                nn.Sequential(
                    nn.Linear(width, hidden_dim, bias=False),
                    nn.BatchNorm1d(hidden_dim),
                    nn.ReLU(inplace=True),
                )
            )
            width = hidden_dim
        blocks.append(nn.Linear(width, output_dim))
        self.layers = nn.Sequential(*blocks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class SimCLRModel(nn.Module):
    """Backbone + projection head; returns the projections z used by the contrastive loss."""

    def __init__(self, backbone: nn.Module, head: ProjectionHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Shape: (batch_size, channels, H, W) -> (batch_size, output_dim)"""
        return self.head(self.backbone(images))


class Classifier(nn.Module):
    """Backbone (+ optionally the first projection-head blocks) + a linear classifier.

    Keys of its state dict: `backbone.*`, `head.*` (only when fine-tuning from a head layer)
    and `classifier.weight` / `classifier.bias`.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        width = _output_width(head) if head is not None else int(backbone.num_features)  # type: ignore[arg-type]
        self.classifier = nn.Linear(width, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Shape: (batch_size, channels, H, W) -> (batch_size, width)"""
        features = self.backbone(images)
        return self.head(features) if self.head is not None else features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Shape: (batch_size, channels, H, W) -> (batch_size, num_classes) logits"""
        return self.classifier(self.features(images))


def _output_width(module: nn.Module) -> int:
    linears = [layer for layer in module.modules() if isinstance(layer, nn.Linear)]
    return linears[-1].out_features


def head_prefix(head: ProjectionHead, layers: int) -> nn.Sequential:
    """The first `layers` blocks of a projection head (SimCLRv2 fine-tunes from layer 1)."""
    available = len(head.layers) - 1
    if not 0 < layers <= available:
        raise UserError(
            f"--from-head-layer {layers}: this head has hidden layers 1..{available} (or 0 for none)"
        )
    return nn.Sequential(*list(head.layers.children())[:layers])


def build_head(spec: HeadSpec, in_features: int) -> ProjectionHead:
    """An untrained projection head of the shape `spec` records."""
    return ProjectionHead(in_features, spec.hidden, output_dim=spec.dim, depth=spec.depth)


def head_spec(head_artifact: Artifact) -> HeadSpec:
    """The projection head's shape a pretrain run recorded in its `head.safetensors`.

    Raises:
        UserError: the file records no head (a pretrain run older than the head metadata).
    """
    head = head_artifact.spec.head
    if head is None:
        raise UserError(f"{head_artifact.path}: no projection head recorded; rerun pretrain")
    return head


def build_classifier(
    arch: str,
    small_stem: bool,
    image_size: int,
    num_classes: int,
    pretrain: Artifact | None = None,
    from_head_layer: int = 0,
    load_weights: bool = True,
    channels: int | None = None,
) -> Classifier:
    """The backbone (+ head layers) with `pretrain`'s weights when `load_weights`, and a new linear layer.

    The linear layer starts at zero, as SimCLR's `zero_init_logits_layer` (the official fine-tuning
    command sets it): the first steps then train the classifier alone (the backbone's gradient is
    `W^T (p - y)` = 0) instead of back-propagating a random projection into the pretrained features.

    Args:
        arch: timm model name.
        small_stem: the 3×3 stride-1 stem (`build_backbone`).
        image_size: for models whose size is fixed at build time.
        num_classes: outputs of the linear layer.
        pretrain: the pretrain artifact (its backbone; its `head.safetensors` beside it for
            `from_head_layer`), or None for random init.
        from_head_layer: 0: the classifier on the backbone; k: on the first k projection layers
            (SimCLRv2), whose shape comes from `pretrain` even when its weights are not loaded.
        load_weights: False keeps the random init (the `--scratch` baseline of a pretrained arch).
        channels: input channels; None: `pretrain`'s (`ModelSpec.channels`), 3 without one.

    Raises:
        UserError: `from_head_layer` without a pretrain artifact, or a head layer it does not have.
    """
    if channels is None:
        channels = 3 if pretrain is None else pretrain.spec.channels
    backbone = build_backbone(arch, small_stem=small_stem, image_size=image_size, channels=channels)
    head: nn.Module | None = None
    if pretrain is not None and load_weights:
        backbone.load_state_dict(pretrain.tensors)
    if from_head_layer > 0:
        if pretrain is None:
            raise UserError("--from-head-layer needs a pretrain artifact (the head's layers come from it)")
        head_artifact = load_artifact(pretrain.path.parent / "head.safetensors", "pretrain")
        full = build_head(head_spec(head_artifact), pretrain.spec.num_features)
        if load_weights:
            full.load_state_dict(head_artifact.tensors)
        head = head_prefix(full, from_head_layer)
    model = Classifier(backbone, num_classes, head)
    nn.init.zeros_(model.classifier.weight)
    nn.init.zeros_(model.classifier.bias)
    return model


def build_model(spec: ModelSpec) -> nn.Module:
    """An untrained model of `spec`: the backbone, or a `Classifier` (with its head blocks),
    taking `spec.channels` input channels.

    Raises:
        UserError: unknown arch, or a head layer without a recorded head.
    """
    backbone = build_backbone(
        spec.arch, small_stem=spec.small_stem, image_size=spec.image_size, channels=spec.channels
    )
    if spec.class_names is None:
        return backbone
    head = None
    if spec.from_head_layer > 0:
        if spec.head is None:
            raise UserError(f"from_head_layer {spec.from_head_layer} without a recorded projection head")
        head = head_prefix(build_head(spec.head, spec.num_features), spec.from_head_layer)
    return Classifier(backbone, len(spec.class_names), head)


def load_model(artifact: Artifact) -> nn.Module:
    """The model an artifact holds, with its weights.

    A backbone stage (pretrain) gives the timm backbone; a classifier stage (finetune) gives a
    `Classifier`, whose `backbone` is its fine-tuned backbone (`features_model`).

    Raises:
        UserError: not a model artifact (embeddings, a head file), or tensors that do not fit.
    """
    models = stage_names(("backbone", "classifier"))
    if artifact.stage not in models or artifact.metadata.get("part") == "head":
        raise UserError(f"{artifact.path}: a {artifact.stage} file; pass a {either(models)} artifact")
    return load_weights(build_model(artifact.spec), artifact)


def features_model(model: nn.Module) -> nn.Module:
    """The part of a loaded model that gives backbone features (kNN, probe, embed, similar)."""
    return model.backbone if isinstance(model, Classifier) else model


def load_weights(model: nn.Module, artifact: Artifact) -> nn.Module:
    """Loads the artifact's tensors into `model` (strictly); returns `model`.

    Raises:
        UserError: the tensors do not fit the model (another arch, stem or class count).
    """
    try:
        model.load_state_dict(artifact.tensors)
    except RuntimeError as error:
        raise UserError(
            f"{artifact.path}: its tensors do not fit {artifact.arch} ({str(error)[:200]})"
        ) from None
    return model
