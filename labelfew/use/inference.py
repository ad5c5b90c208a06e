"""The one loop that runs a model over images: evaluate, predict, embed, similar, the report's
figures and fine-tuning's validation all go through `model_outputs`.

Images come from the streaming source's decoder (`labelfew.data.stream`: DataLoader workers decode
as the model's spec says, `ModelSpec.decoding`: its channel count and the window of deep images, so a
1- or N-channel, windowed model is fed what it was trained on, and resize the shorter side to the
spec's evaluation side, Pillow's bicubic as torchvision's
``Resize`` on a PIL image) and become model inputs on the model's device through the one view
executor (`labelfew.views.evaluate.EvalView`, here only its centre crop and the recorded
mean/std), so the inputs are torchvision's resize + centre crop + normalise of the photo.
A file that cannot be decoded is reported by index with its error and never stops a run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import DataLoader

from labelfew import engine
from labelfew.artifacts import Artifact
from labelfew.data.batches import Batch
from labelfew.data.labels import LabeledImages
from labelfew.data.stream import DecodedFiles, FileBatch, FilesInOrder, collate, collate_in_order
from labelfew.errors import UserError
from labelfew.models import build_model, load_model
from labelfew.multilabel import multi_hot
from labelfew.spec import Decoding, ModelSpec, eval_resize_side
from labelfew.views.evaluate import EvalView


@dataclass
class Outputs:
    """Model outputs for a list of image files.

    Attributes:
        values: one row per decodable file, in file order. Shape: (len(kept), width)
        kept: the index (into the file list) of each row of `values`.
        errors: file index -> why that file could not be decoded.
    """

    values: torch.Tensor
    kept: list[int]
    errors: dict[int, str] = field(default_factory=dict)


def device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class EvalImages:
    """uint8 image batches and the evaluation view that turns each into model inputs.

    Attributes:
        batches: Padded uint8 batches (`labelfew.data.batches.Batch`), in order.
        view: The evaluation view, applied on the device the batch is on.
    """

    batches: Iterable[Batch]
    view: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)


@torch.no_grad()
def model_outputs(
    model: nn.Module, images: EvalImages, target: torch.device | None = None
) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Yields each batch with the model's float32 outputs for its evaluation views, in eval mode.

    The model's train/eval mode is restored afterwards (fine-tuning validates between epochs).
    `target` None leaves model and batches where they are (a loader prepared by Accelerate).

    Shape: batch.images (batch_size, C, H, W) uint8 -> outputs (batch_size, width); a batch of
    no image (every file undecodable) gets outputs of shape (0,).
    """
    was_training = model.training
    model.eval()
    if target is not None:
        model.to(target)
    try:
        for batch in images:
            if len(batch) == 0:
                yield batch, torch.zeros(0)
                continue
            if target is not None:
                batch = batch.to(target, non_blocking=True)
            yield batch, model(images.view(batch.images, batch.sizes)).float()
    finally:
        model.train(was_training)


def file_images(paths: list[Path], spec: ModelSpec, batch_size: int, workers: int | None) -> EvalImages:
    """`paths` in file order, decoded as the spec's model was trained (`ModelSpec.decoding`: its
    channels and window) at its evaluation side, with the spec's evaluation view.

    Each batch is a `labelfew.data.stream.FileBatch`: the decodable files' images and `indices`,
    and `errors` (file index -> reason) for the others.
    """
    loader = DataLoader(
        FilesInOrder(paths, eval_resize_side(spec.image_size), decoding=spec.decoding),
        batch_size=batch_size,
        num_workers=engine.default_workers(workers),
        collate_fn=partial(collate_in_order, channels=spec.channels),
        pin_memory=torch.cuda.is_available(),
    )
    return EvalImages(loader, EvalView(spec.image_size, spec.mean, spec.std))


def held_out_images(
    labeled: LabeledImages,
    class_names: list[str],
    image_size: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    batch_size: int,
    workers: int | None,
    accelerator: Any,
    decoding: Decoding = Decoding(),
) -> EvalImages:
    """Labelled held-out images for `accuracy` / `held_out_scores`, sharded by Accelerate.

    Decoded by the streaming source with the shorter side resized to the evaluation side (an
    undecodable file is replaced by the next decodable one, so every process's batches keep their
    size), on the accelerator's device.

    Args:
        labeled: The held-out images and their labels.
        class_names: The classifier's classes, in output order.
        image_size: The model's input side.
        mean: Normalisation mean; None for ImageNet's.
        std: Normalisation standard deviation; None for ImageNet's.
        batch_size: The global batch (each process takes its share, at most the images there are).
        workers: DataLoader worker processes (None: `labelfew.engine.default_workers`).
        accelerator: The run's Accelerator (its device and process shards).
        decoding: The model's channels and window (`ModelSpec.decoding`), as its training images had.
    """
    labels = labeled.label_indices(class_names)
    files = DecodedFiles(
        list(labeled.paths), eval_resize_side(image_size), labels, enlarge=True, decoding=decoding
    )
    per_process = max(1, min(batch_size, len(labeled)) // accelerator.num_processes)
    workers = engine.default_workers(workers)
    loader = DataLoader(files, batch_size=per_process, num_workers=workers, collate_fn=collate,
                        persistent_workers=workers > 0)  # fmt: skip
    return EvalImages(accelerator.prepare(loader), EvalView(image_size, mean, std))


def run_model(
    model: nn.Module,
    paths: list[Path],
    spec: ModelSpec,
    batch_size: int = 256,
    workers: int | None = None,
    description: str = "",
    quiet: bool = True,
) -> Outputs:
    """Runs `model` (in eval mode, float32) over image files with the spec's evaluation transform.

    Shape: returns values (decodable files, model output size)
    """
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: use at least 1")
    values: list[torch.Tensor] = []
    kept: list[int] = []
    errors: dict[int, str] = {}
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        TimeElapsedColumn(),
        console=engine.console,
        disable=quiet,
    )
    with progress:
        task = progress.add_task(description, total=len(paths))
        for batch, outputs in model_outputs(model, file_images(paths, spec, batch_size, workers), device()):
            assert isinstance(batch, FileBatch)
            errors.update(batch.errors)
            if len(batch):
                values.append(outputs.cpu())
                kept.extend(batch.indices.tolist())
            progress.advance(task, len(batch) + len(batch.errors))
    width = values[0].shape[1] if values else 0
    return Outputs(torch.cat(values) if values else torch.zeros(0, width), kept, errors)


"""`held_out_images`, or (until `labelfew.stages.finetune._val_loader` calls it) a prepared loader
of PIL-transformed ``{"images", "labels"}`` batches."""


def accuracy(model: nn.Module, images: EvalImages, accelerator: Any) -> float:
    """Top-1 accuracy over `held_out_images`, all processes."""
    return held_out_scores(model, images, accelerator)[0]


def top1_and_balanced(
    model: nn.Module, images: EvalImages, accelerator: Any, num_classes: int
) -> tuple[float, float]:
    """(top-1, balanced accuracy) over `held_out_images`, all processes: fine-tuning's per-epoch
    `val_top1` and `val_score`.

    Balanced accuracy is the mean over the classes present of each class's recall, as
    ``sklearn.metrics.balanced_accuracy_score``.
    """
    correct = torch.zeros(num_classes, device=accelerator.device)
    total = torch.zeros(num_classes, device=accelerator.device)
    for batch, logits in model_outputs(model, images):
        assert batch.labels is not None
        predictions, labels = accelerator.gather_for_metrics((logits.argmax(dim=1), batch.labels))
        total += torch.bincount(labels, minlength=num_classes).float()
        correct += torch.bincount(labels[predictions == labels], minlength=num_classes).float()
    present = total > 0
    top1 = float(correct.sum() / total.sum().clamp(min=1))
    return top1, float((correct[present] / total[present]).mean()) if bool(present.any()) else 0.0


def held_out_scores(model: nn.Module, images: EvalImages, accelerator: Any) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) over `held_out_images`, all processes.

    The cross-entropy ranks models on a few dozen held-out images far more finely than top-1,
    which moves in steps of one image.
    """
    correct = total = loss = torch.zeros((), device=accelerator.device)
    for batch, logits in model_outputs(model, images):
        assert batch.labels is not None
        losses = nn.functional.cross_entropy(logits.float(), batch.labels, reduction="none")
        predictions, labels, losses = accelerator.gather_for_metrics(
            (logits.argmax(dim=1), batch.labels, losses)
        )
        correct = correct + (predictions == labels).sum()
        loss = loss + losses.sum()
        total = total + labels.numel()
    count = total.clamp(min=1)
    return float(correct / count), float(loss / count)


def held_out_multi_label(
    model: nn.Module, images: EvalImages, accelerator: Any
) -> tuple[np.ndarray, np.ndarray]:
    """A multi-label model's sigmoid scores and the 0/1 targets over `held_out_images`, all processes.

    Shape: -> scores (N, C), targets (N, C)
    """
    scores, targets = [], []
    for batch, logits in model_outputs(model, images):
        assert batch.labels is not None
        probabilities, masks = accelerator.gather_for_metrics((torch.sigmoid(logits.float()), batch.labels))
        scores.append(probabilities.cpu())
        targets.append(multi_hot(masks.cpu(), logits.shape[1]))
    return torch.cat(scores).numpy(), torch.cat(targets).numpy()


def labelled_outputs(
    model: nn.Module, spec: ModelSpec, labeled: LabeledImages, class_names: list[str], batch_size: int,
    workers: int | None, skipped: dict[str, str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The model's outputs on the decodable labelled images, and their class indices.

    Each undecodable image is added to `skipped` (its path -> why), so that the report counts and names it.
    """
    labels = torch.tensor(labeled.label_indices(class_names), dtype=torch.long)
    outputs = run_model(model, list(labeled.paths), spec, batch_size, workers)
    if skipped is not None:
        skipped.update({str(labeled.paths[index]): reason for index, reason in outputs.errors.items()})
    return outputs.values, labels[outputs.kept]


def random_model(spec: ModelSpec, seed: int) -> nn.Module:
    """An untrained model of `spec`, the same for the same seed (the random-init baseline)."""
    torch.manual_seed(seed)
    return build_model(spec)


def backbone_features(
    artifact: Artifact,
    labeled: LabeledImages,
    class_names: list[str],
    batch_size: int = 256,
    workers: int | None = None,
    random_init: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen backbone features of labelled images (eval transform) and their class indices.

    Shape: -> features (N, num_features), labels (N,)
    """
    model = random_model(artifact.spec, seed) if random_init else load_model(artifact)
    return labelled_outputs(model, artifact.spec, labeled, class_names, batch_size, workers)


def finetuned_logits(
    artifact: Artifact,
    labeled: LabeledImages,
    class_names: list[str],
    batch_size: int = 256,
    workers: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a fine-tuned model on labelled images, and their class indices.

    Shape: -> logits (N, num_classes), labels (N,)
    """
    return labelled_outputs(load_model(artifact), artifact.spec, labeled, class_names, batch_size, workers)
