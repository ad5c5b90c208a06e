"""The one loop that runs a model over images: evaluate, predict, embed, similar, the report's
figures and fine-tuning's validation all go through `model_outputs`.

Images are decoded as in training (`load_rgb`) and go through the spec's evaluation transform
(`labelfew.spec.eval_resize_side`, centre crop, the recorded mean/std). A file that cannot be
decoded is reported by index with its error and never stops a run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset

from labelfew import engine
from labelfew.data.images import BadImage, load_rgb
from labelfew.errors import UserError
from labelfew.spec import ModelSpec
from labelfew.views.pil import eval_transform


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


@torch.no_grad()
def model_outputs(
    model: nn.Module, batches: Iterable[dict[str, Any]], target: torch.device | None = None
) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """Yields each batch with the model's float32 outputs for its `images`, in eval mode.

    The model's train/eval mode is restored afterwards (fine-tuning validates between epochs).
    `target` None leaves model and images where they are (a loader prepared by Accelerate).

    Shape: batch["images"] (batch_size, 3, S, S) -> outputs (batch_size, width)
    """
    was_training = model.training
    model.eval()
    if target is not None:
        model.to(target)
    try:
        for batch in batches:
            images = batch["images"]
            if images is None:  # every file of the batch was undecodable
                yield batch, torch.zeros(0)
                continue
            yield batch, model(images if target is None else images.to(target)).float()
    finally:
        model.train(was_training)


class _Files(Dataset[Any]):
    """Decodes one file per item; a bad file yields its error instead of an image."""

    def __init__(self, paths: list[Path], transform: Any) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            image = load_rgb(self.paths[index])
        except BadImage as error:
            return index, None, str(error.__cause__ or error)
        return index, self.transform(image), ""


def _collate(items: list[tuple[int, torch.Tensor | None, str]]) -> dict[str, Any]:
    good = [(index, image) for index, image, _ in items if image is not None]
    return {
        "indices": [index for index, _ in good],
        "images": torch.stack([image for _, image in good]) if good else None,
        "errors": {index: error for index, image, error in items if image is None},
    }


def _batches(
    paths: list[Path], spec: ModelSpec, batch_size: int, workers: int | None
) -> Iterable[dict[str, Any]]:
    """Batches of `paths` through the spec's evaluation transform, in file order.

    Each batch: `indices` (the decodable files), `images` (Shape: (len(indices), 3, S, S), or None
    when none could be decoded) and `errors` (file index -> reason).
    """
    return DataLoader(
        _Files(paths, eval_transform(spec.image_size, spec.mean, spec.std)),
        batch_size=batch_size,
        num_workers=engine.default_workers(workers),
        collate_fn=_collate,
        pin_memory=torch.cuda.is_available(),
    )


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
        for batch, outputs in model_outputs(model, _batches(paths, spec, batch_size, workers), device()):
            errors.update(batch["errors"])
            if batch["indices"]:
                values.append(outputs.cpu())
                kept.extend(batch["indices"])
            progress.advance(task, len(batch["indices"]) + len(batch["errors"]))
    width = values[0].shape[1] if values else 0
    return Outputs(torch.cat(values) if values else torch.zeros(0, width), kept, errors)


def accuracy(model: nn.Module, loader: Iterable[dict[str, Any]], accelerator: Any) -> float:
    """Top-1 accuracy over a loader prepared by Accelerate (`images`, `labels`), all processes."""
    return held_out_scores(model, loader, accelerator)[0]


def held_out_scores(
    model: nn.Module, loader: Iterable[dict[str, Any]], accelerator: Any
) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) over a loader prepared by Accelerate, all processes.

    The cross-entropy ranks models on a few dozen held-out images far more finely than top-1,
    which moves in steps of one image.
    """
    correct = total = loss = torch.zeros((), device=accelerator.device)
    for batch, logits in model_outputs(model, loader):
        losses = nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")
        predictions, labels, losses = accelerator.gather_for_metrics(
            (logits.argmax(dim=1), batch["labels"], losses)
        )
        correct = correct + (predictions == labels).sum()
        loss = loss + losses.sum()
        total = total + labels.numel()
    count = total.clamp(min=1)
    return float(correct / count), float(loss / count)
