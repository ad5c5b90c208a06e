"""ModelSpec: what a model is (arch, stem, image size, normalisation, head, classes), and the rules
that follow from it.

Every artifact stores its spec as str→str safetensors metadata (`to_metadata`); every stage and use
command rebuilds the model and its preprocessing from `ModelSpec.from_metadata`, so the rules below
are written once:

- the small-image stem for images of `SMALL_IMAGE_SIDE` px or less (trap 4 in DESIGN.md: a 32 px
  image through an ImageNet stem is 8 px after it);
- the evaluation resize (`eval_resize_side`): above 64 px the shorter side goes to
  ``round(S / 0.875)`` and the central ``S x S`` is kept (the ImageNet protocol, SimCLR's
  ``CROP_PROPORTION``); at 64 px or less to ``S``, so small images lose nothing;
- ImageNet's mean and std, what timm and torchvision backbones expect.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from labelfew.errors import UserError

SMALL_IMAGE_SIDE = 64
"""Images this size or smaller get the small-image stem and are resized, never cropped, for evaluation."""
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet RGB in [0, 1]."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet RGB in [0, 1]."""
EVAL_CROP_FRACTION = 0.875
"""Evaluation keeps the central 87.5% (SimCLR's ``CROP_PROPORTION``): 256 -> 224."""


def uses_small_stem(image_size: int) -> bool:
    """Whether a model for `image_size` px gets the 3×3 stride-1 stem without max-pool."""
    return image_size <= SMALL_IMAGE_SIDE


def eval_resize_side(image_size: int) -> int:
    """The shorter side an image is resized to before the central `image_size` crop (256 for 224)."""
    return image_size if image_size <= SMALL_IMAGE_SIDE else round(image_size / EVAL_CROP_FRACTION)


@dataclass(frozen=True)
class Decoding:
    """How a file becomes the model's 8-bit pixels: how many channels, and the window of deep images.

    Attributes:
        channels: The decoded array's channel count: 1 (grayscale), 3 (RGB) or N (multi-channel
            TIFF); every decoder returns ``(height, width, channels)`` uint8.
        window: ``(low, high)``: values of images deeper than 8 bits (16-bit, 32-bit, float, DICOM)
            map linearly from ``low`` to 0 and ``high`` to 255, clipped. None: no dataset window.
        file_windows: A DICOM file's own WindowCenter/WindowWidth win over ``window`` where present
            (False when the window was set by hand).
    """

    channels: int = 3
    window: tuple[float, float] | None = None
    file_windows: bool = True


@dataclass(frozen=True)
class HeadSpec:
    """The SimCLR projection head: `depth` linear layers, `hidden` wide, `dim` outputs."""

    depth: int
    hidden: int
    dim: int


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model and feed it images, without its weights.

    Attributes:
        arch: timm model name.
        image_size: input side in pixels.
        small_stem: the backbone has the small-image stem (`uses_small_stem` picks the default).
        num_features: width of the backbone's pooled features.
        mean, std: per-channel normalisation of RGB in [0, 1].
        head: the projection head (pretrain's head file, or a model fine-tuned from a head layer).
        from_head_layer: how many head blocks a classifier keeps between backbone and linear layer.
        class_names: the class index order of a classifier; None for a backbone.
        scratch: trained from random initialisation (the baseline, not a self-supervised start).
        init: the `--init` SOURCE the weights started from before any labelfew training
            (``timm:resnet50.a1_in1k``, a file, a run), or None for random init.
        init_sha256: the sha256 of those weights (`labelfew.engine.init_weights.Init.sha256`).
        multi_label: a classifier with one sigmoid per class (several classes an image), not a softmax;
            an artifact without the key is single-label.
        threshold: a multi-label classifier's score threshold for "present", chosen on validation
            (`labelfew.multilabel.choose_threshold`; 0.5 without validation images).
        channels: the input channels (1, 3 or N); `mean` and `std` have one entry each.
        window: the ``(low, high)`` window that maps deep images to 8 bits (`Decoding.window`), or
            None for 8-bit data.
        file_windows: DICOM files' own windows were used where present (`Decoding.file_windows`).
    """

    arch: str
    image_size: int
    small_stem: bool
    num_features: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    head: HeadSpec | None = None
    from_head_layer: int = 0
    class_names: tuple[str, ...] | None = None
    scratch: bool = False
    init: str | None = None
    init_sha256: str | None = None
    multi_label: bool = False
    threshold: float | None = None
    channels: int = 3
    window: tuple[float, float] | None = None
    file_windows: bool = True

    @property
    def is_classifier(self) -> bool:
        return self.class_names is not None

    @property
    def resize_side(self) -> int:
        """See `eval_resize_side`."""
        return eval_resize_side(self.image_size)

    @property
    def decoding(self) -> Decoding:
        """How this model's images are decoded (channels and window)."""
        return Decoding(self.channels, self.window, self.file_windows)

    def backbone(self) -> ModelSpec:
        """The spec of this model's backbone alone (no head, no classes)."""
        return ModelSpec(
            self.arch, self.image_size, self.small_stem, self.num_features, self.mean, self.std,
            init=self.init, init_sha256=self.init_sha256,
            channels=self.channels, window=self.window, file_windows=self.file_windows,
        )  # fmt: skip

    def to_metadata(self) -> dict[str, str]:
        """The safetensors metadata of format 1 (the keys and encodings every artifact so far has)."""
        metadata = {
            "arch": self.arch,
            "num_features": str(self.num_features),
            "image_size": str(self.image_size),
            "small_stem": json.dumps(self.small_stem),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
        }
        if self.class_names is not None:
            metadata["class_names"] = json.dumps(list(self.class_names))
            metadata["from_head_layer"] = str(self.from_head_layer)
            metadata["scratch"] = json.dumps(self.scratch)
            if self.multi_label:  # absent: single-label, as every artifact before multi-label
                metadata["multi_label"] = "true"
                metadata["threshold"] = json.dumps(self.threshold)
        if self.channels != 3:  # absent: RGB, as every artifact before
            metadata["channels"] = str(self.channels)
        if self.window is not None:  # absent: 8-bit data
            metadata["window"] = json.dumps(list(self.window))
            metadata["file_windows"] = json.dumps(self.file_windows)
        if self.init is not None:
            metadata["init"] = self.init
            metadata["init_sha256"] = self.init_sha256 or ""
        if self.head is not None:
            metadata["projection_depth"] = str(self.head.depth)
            metadata["projection_hidden"] = str(self.head.hidden)
            metadata["projection_dim"] = str(self.head.dim)
        return metadata

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], where: object = "artifact") -> ModelSpec:
        """Reads the spec back from an artifact's metadata (any artifact written since format 1).

        Raises:
            UserError: a key is missing or unreadable, naming `where` (usually the file).
        """
        try:
            head = None
            if "projection_depth" in metadata:
                head = HeadSpec(
                    int(metadata["projection_depth"]),
                    int(metadata["projection_hidden"]),
                    int(metadata["projection_dim"]),
                )
            class_names = json.loads(metadata["class_names"]) if "class_names" in metadata else None
            return cls(
                arch=metadata["arch"],
                image_size=int(metadata["image_size"]),
                small_stem=bool(json.loads(metadata["small_stem"])),
                num_features=int(metadata["num_features"]),
                mean=_triple(json.loads(metadata["mean"])),
                std=_triple(json.loads(metadata["std"])),
                head=head,
                from_head_layer=int(metadata.get("from_head_layer", "0")),
                class_names=tuple(str(name) for name in class_names) if class_names is not None else None,
                scratch=bool(json.loads(metadata.get("scratch", "false"))),
                init=metadata.get("init"),
                init_sha256=metadata.get("init_sha256") or None,
                multi_label=bool(json.loads(metadata.get("multi_label", "false"))),
                threshold=json.loads(metadata["threshold"]) if "threshold" in metadata else None,
                channels=int(metadata.get("channels", "3")),
                window=_window(metadata["window"]) if "window" in metadata else None,
                file_windows=bool(json.loads(metadata.get("file_windows", "true"))),
            )
        except (KeyError, ValueError, TypeError) as error:
            raise UserError(
                f"{where}: its model description is incomplete or unreadable ({error!r}); "
                "rerun the stage that wrote it"
            ) from None


def _triple(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(value) for value in values)


def _window(text: str) -> tuple[float, float]:
    low, high = (float(value) for value in json.loads(text))
    return low, high
