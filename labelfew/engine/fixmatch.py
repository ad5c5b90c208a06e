"""FixMatch for `finetune --method fixmatch`: the unlabeled batches, the weak and strong views, the
pseudo-label counts and the step (a labelled batch and μ× as many unlabeled images, one forward pass).

FixMatch (Sohn et al. 2020, https://arxiv.org/abs/2001.07685, algorithm 1): each unlabeled image
gets a weak view (a flip and a shifted window of the image at the scale it is stored at,
reflect-padded by 1/8 of the side up to 64 px: `labelfew.views.finetune.ShiftFlipViews`) and a
strong view (that same weak view, then RandAugment with per-image operations and magnitudes, then
Cutout: `labelfew.views.randaugment`); the labelled images get the weak view too. The weak view's
prediction, without gradient, is the pseudo-label where its softmax reaches the threshold; the
strong view is trained towards it:

    loss = CE(labelled) + λ_u · mean over the μB images of [max q ≥ τ] · CE(strong, argmax q)

with ``q = softmax(weak logits)`` (`labelfew.losses.fixmatch_unlabeled_loss`). Labelled, weak and
strong views go through the model as one batch, so BatchNorm normalises them together; the
official code interleaves them across devices for the same reason, which one device per process
does not need.

BatchNorm: the model's running statistics are what the moving average copies (`labelfew.engine.ema`),
so their momentum follows the average's decay, 0.001 once it is warmed up, as both references
(official ``batch_norm`` momentum 0.999 in TensorFlow's convention; USB ``bn_momentum = 1 - ema_m``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from labelfew.config import FixMatchSettings
from labelfew.data import sources
from labelfew.data.batches import Batch, EpochBatches, LabelledPairBatch, WithLabelled
from labelfew.data.images import require_images
from labelfew.data.labelled import unlabeled_batches
from labelfew.data.labels import folder_labels
from labelfew.data.store import DEFAULT_MEMORY_BUDGET
from labelfew.engine.accelerator import console
from labelfew.engine.counts import EpochCounts
from labelfew.engine.ema import ModelEMA
from labelfew.engine.trainer import StepFunction
from labelfew.losses import classification_loss, fixmatch_unlabeled_loss
from labelfew.spec import Decoding
from labelfew.views.finetune import CropFlipViews, ShiftFlipViews
from labelfew.views.ops import normalization, normalize
from labelfew.views.randaugment import RandAugmentViews

UNIT_MEAN, UNIT_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
"""Normalisation that leaves views in [0, 1], where RandAugment works."""
PSEUDO_LABEL_METRICS = ("mask_rate", "pseudo_label_top1", "masked_pseudo_label_top1")
"""What `PseudoLabels` logs per epoch (the accuracies only for a folder with classes)."""
FIXMATCH_VERSION = 2
"""What FixMatch trains beyond its options, in a resume's fingerprint so that a checkpoint of another
version is refused rather than continued differently (2: the weak view flip + shift, the strong view
of its window, the classifier decayed, BatchNorm momentum following the average)."""


@dataclass(frozen=True)
class UnlabeledImages:
    """FixMatch's unlabeled images, and their classes when the folder is a tree of the label classes.

    Attributes:
        root: the folder, searched recursively.
        paths: its image files, sorted.
        labels: each file's class index (for the logged pseudo-label accuracy only), or None.
        skipped: ``"path: reason"`` for what the folder holds that is not read (FIFOs, links out).
    """

    root: Path
    paths: list[Path]
    labels: list[int] | None
    skipped: list[str] = field(default_factory=list)

    def listing_sha256(self) -> str:
        """A short hash of the relative paths (what a resumed run must train on again)."""
        listing = "\n".join(str(path.relative_to(self.root)) for path in self.paths)
        return hashlib.sha256(os.fsencode(listing)).hexdigest()[:16]


def find_unlabeled(root: Path, class_names: list[str], follow_links: bool = False) -> UnlabeledImages:
    """The images of `root` (`labelfew.data.images.require_images`).

    Raises:
        UserError: the folder holds no image files.
    """
    found = require_images(root, follow_links=follow_links)
    return UnlabeledImages(root, found.paths, folder_labels(found.paths, root, class_names), found.skipped)


def paired_batches(labelled: EpochBatches, unlabeled: UnlabeledImages, count: int, seed: int, image_size: int,
                   accelerator: Any, workers: int, show: bool,
                   decoding: Decoding = Decoding()) -> tuple[WithLabelled, list[str]]:  # fmt: skip
    """`count` unlabeled images a step (the global batch, μ × the labelled one), from the same store
    or stream as pretraining (`labelfew.data.sources`) in their own seeded order, each batch carrying
    the next labelled batch (`WithLabelled`); and the files found undecodable. `decoding`: the
    model's channels and window.

    Raises:
        UserError: too few decodable images for one batch per process.
    """
    budget = DEFAULT_MEMORY_BUDGET / 2**30
    batches, undecodable = unlabeled_batches(
        unlabeled.paths, unlabeled.labels, count, seed, image_size, accelerator, root=unlabeled.root, workers=workers,
        place=sources.augment_place("auto", budget, unlabeled.paths, image_size, decoding=decoding), memory_budget=budget,
        on_progress=sources.decode_progress(console) if show and accelerator.is_main_process else None,
        decoding=decoding,
    )  # fmt: skip
    return WithLabelled(batches, labelled), undecodable


class WeakStrongViews:
    """The weak and the strong view of every image of an unlabeled batch, both normalised.

    The weak view is a flip and a small shift (`ShiftFlipViews`); the strong view is
    the same window, then RandAugment (N = 2 operations per image, each of its own, with a random
    magnitude) and Cutout (half the side), as FixMatch's appendix table 12. Sharing the window is
    the official ImageNet pipeline's (one crop, RandAugment on it); the official CIFAR code and USB
    draw a second flip and shift for the strong view (at most 1/4 of the side from the weak one's,
    perhaps mirrored), never another part of the photo. A strong view of another part than its
    pseudo-label's weak view would be trained towards a label it may not show.

    Args:
        image_size: Output side ``S`` in pixels.
        mean: Normalisation mean of the model.
        std: Normalisation standard deviation of the model.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        channels = len(mean)  # the weak view stays in [0, 1] for RandAugment, for any channel count
        self.shift_flip = ShiftFlipViews(image_size, UNIT_MEAN[:1] * channels, UNIT_STD[:1] * channels)
        self.randaugment = RandAugmentViews()
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, images: Tensor, sizes: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Shape: (batch, C, H, W) uint8 with valid sizes (batch, 2) -> two (batch, C, S, S) float32."""
        weak = self.shift_flip(images, sizes, generator)
        strong = self.randaugment(weak, generator)  # a new tensor: the weak view is kept
        mean, std = normalization(self.mean, self.std, images.device)
        return normalize(weak, mean, std), normalize(strong, mean, std)


class PseudoLabels(EpochCounts):
    """Per-epoch rates of the pseudo-labels: the fraction that passed the threshold (``mask_rate``)
    and, when the unlabeled folder is a class-per-folder tree of the label classes (a benchmark),
    the weak view's top-1 on every image (``pseudo_label_top1``) and on the confident ones
    (``masked_pseudo_label_top1``, what the loss trains on; 0 while none passes)."""

    def __init__(self, device: torch.device, has_labels: bool) -> None:
        super().__init__(("masked", "images", "correct", "masked_correct"), device)
        self.has_labels = has_labels

    @torch.no_grad()
    def add(self, weak_logits: Tensor, labels: Tensor | None, threshold: float) -> None:
        """Counts one step's pseudo-labels. Shapes: (batch, classes) logits, (batch,) labels or None."""
        confidence, guess = torch.softmax(weak_logits.float(), dim=1).max(dim=1)
        mask = confidence >= threshold
        correct = guess == labels if labels is not None else torch.zeros_like(mask)
        self.count(
            masked=mask.sum(),
            images=mask.numel(),
            correct=correct.sum(),
            masked_correct=(correct & mask).sum(),
        )

    def epoch_metrics(self, accelerator: Any) -> dict[str, float]:
        """This epoch's rates over every process (each must call it); the counts start again."""
        totals = self.totals(accelerator)
        metrics = {"mask_rate": totals["masked"] / max(totals["images"], 1)}
        if not self.has_labels:
            return metrics
        return {**metrics, "pseudo_label_top1": totals["correct"] / max(totals["images"], 1),
                "masked_pseudo_label_top1": totals["masked_correct"] / max(totals["masked"], 1)}  # fmt: skip


def fixmatch_step(
    labelled_views: ShiftFlipViews,
    unlabeled_views: WeakStrongViews,
    threshold: float,
    unlabeled_weight: float,
    label_smoothing: float,
    channels_last: bool,
    pseudo_labels: PseudoLabels,
    class_weights: Sequence[float] | None = None,
) -> StepFunction:
    """The step over a `LabelledPairBatch` (the unlabeled images, their labelled batch attached by
    `labelfew.data.batches.WithLabelled`): cross-entropy on the labelled images' weak views
    (weighted by `class_weights`) plus ``unlabeled_weight`` × FixMatch's unlabeled loss; the number
    of views is B + 2μB.

    The unlabeled loss is never class-weighted: neither FixMatch's paper nor USB
    (microsoft/Semi-supervised-learning, ``semilearn/algorithms/fixmatch/fixmatch.py``: ``ce_loss``
    of the labelled logits, ``consistency_loss(..., 'ce', mask=mask)`` of the pseudo-labels) weighs
    either part; weighing the pseudo-labels by the labels' frequencies would weigh guesses."""
    weights = None if class_weights is None else torch.tensor(list(class_weights))

    def step(model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        labelled = cast(LabelledPairBatch, batch).labelled
        assert labelled is not None and labelled.labels is not None
        supervised_views = labelled_views(labelled.images, labelled.sizes, labelled.generator())
        weak, strong = unlabeled_views(batch.images, batch.sizes, batch.generator())
        images = torch.cat([supervised_views, weak, strong])
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = model(images).float()
        count, unlabeled = supervised_views.shape[0], weak.shape[0]
        weak_logits, strong_logits = logits[count : count + unlabeled], logits[count + unlabeled :]
        supervised = classification_loss(logits[:count], labelled.labels, label_smoothing, weights)
        consistency, _ = fixmatch_unlabeled_loss(weak_logits, strong_logits, threshold)
        pseudo_labels.add(weak_logits.detach(), batch.labels, threshold)
        return supervised + unlabeled_weight * consistency, images.shape[0]

    return step


@dataclass
class FixMatchTraining:
    """What `finetune --method fixmatch` adds to a supervised run: the batches with the unlabeled
    images attached, the files found undecodable, the step, the moving average and its counts."""

    loader: WithLabelled
    skipped: list[str]
    step: StepFunction
    ema: ModelEMA
    pseudo_labels: PseudoLabels


def fixmatch_training(model: nn.Module, labelled: EpochBatches, unlabeled: UnlabeledImages, settings: FixMatchSettings,
                      views: CropFlipViews, label_smoothing: float, *, labelled_batch: int, seed: int, workers: int, show: bool,
                      accelerator: Any, class_weights: Sequence[float] | None = None,
                      decoding: Decoding = Decoding()) -> FixMatchTraining:  # fmt: skip
    """FixMatch's parts around the unwrapped `model` and the labelled batches: μ × the labelled
    batch (global) of unlabeled images a step (their own order, `seed`), weak and strong views on the
    device (`views` gives their side and normalisation: the labelled images get the weak view, not
    its crop), and the moving average, which sets `model`'s BatchNorm momentum (`ModelEMA`).
    `decoding`: the model's channels and window, for the unlabeled images."""
    count = min(settings.mu * labelled_batch, len(unlabeled.paths))  # global, as `labelled_batch`
    paired, skipped = paired_batches(
        labelled, unlabeled, count, seed, views.image_size, accelerator, workers, show, decoding
    )
    pseudo_labels = PseudoLabels(accelerator.device, has_labels=unlabeled.labels is not None)
    weak = ShiftFlipViews(views.image_size, views.mean, views.std)
    step = fixmatch_step(weak, WeakStrongViews(views.image_size, views.mean, views.std), settings.threshold,
                         settings.unlabeled_weight, label_smoothing, accelerator.device.type == "cuda", pseudo_labels,
                         class_weights)  # fmt: skip
    ema = ModelEMA(model, settings.ema, batchnorm=True)
    return FixMatchTraining(paired, skipped, step, ema, pseudo_labels)
