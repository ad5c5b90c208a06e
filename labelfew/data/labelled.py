"""The images a training stage reads besides pretraining's: the labelled ones (a held-out split and
the training batches of the rest) and the unlabeled ones of distillation and FixMatch."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from labelfew.data import sources
from labelfew.data.batches import EpochBatches, EpochOrder
from labelfew.data.images import image_extent, printable
from labelfew.data.labels import LabeledImages
from labelfew.data.store import DEFAULT_MEMORY_BUDGET
from labelfew.data.subsets import balanced_subset, multilabel_holdout
from labelfew.errors import UserError
from labelfew.spec import Decoding


def held_out_split(
    labeled: LabeledImages, fraction: float, seed: int
) -> tuple[LabeledImages, LabeledImages | None]:
    """`(train, held out)`: `fraction` of each class held out (seeded with seed + 1), or None for 0.

    Raises:
        UserError: a fraction of 1 or more, or one that holds out nothing or a whole class.
    """
    if fraction <= 0:
        return labeled, None
    if fraction >= 1:
        raise UserError(f"--val-fraction {fraction}: use a value in [0, 1)")
    if labeled.multi_label:  # every class keeps a positive to train on
        held = multilabel_holdout(labeled, fraction, seed + 1)
    else:
        held = balanced_subset(labeled, fraction=fraction, seed=seed + 1, allow_empty=True)
    held_paths = set(held.paths)
    kept = [(p, label) for p, label in zip(labeled.paths, labeled.labels, strict=True) if p not in held_paths]
    rest = LabeledImages(tuple(p for p, _ in kept), tuple(label for _, label in kept), labeled.root)
    if len(held) == 0 or len(rest.class_names) < len(labeled.class_names):
        raise UserError(
            f"--val-fraction {fraction} leaves no validation images or empties a class; use 0 or more labels"
        )
    return rest, held


def readable_labels(labeled: LabeledImages, skip_bad: bool) -> tuple[LabeledImages, list[str]]:
    """`labeled` without the images whose header cannot be read, and their paths (`printable`).

    A label is a person's work and a few dozen may be all there are, so an unreadable labelled
    image stops the run (before any training) unless `skip_bad`; then it is left out, and the
    stage counts and names it. Only headers are read here (a few tenths of a millisecond per
    file); a file whose header is fine but whose pixels are truncated is found when the batches
    are decoded (`labelled_batches`).

    Raises:
        UserError: some images cannot be opened and `skip_bad` is False.
    """
    with ThreadPoolExecutor() as pool:
        extents = list(pool.map(image_extent, labeled.paths))
    bad = [printable(path) for path, extent in zip(labeled.paths, extents, strict=True) if extent is None]
    if not bad:
        return labeled, []
    _refuse_unless(skip_bad, bad, len(labeled))
    kept = [(path, label) for path, label, extent in zip(labeled.paths, labeled.labels, extents, strict=True)
            if extent is not None]  # fmt: skip
    return LabeledImages(tuple(p for p, _ in kept), tuple(label for _, label in kept), labeled.root), bad


def _refuse_unless(skip_bad: bool, bad: list[str], count: int) -> None:
    """The UserError for unreadable labelled images, unless `skip_bad` (or every one is bad)."""
    if skip_bad and len(bad) < count:
        return
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    what = (
        "none of the labelled images can be decoded"
        if len(bad) == count
        else "labelled image cannot be decoded"
    )
    hint = "fix or remove it from the labels" + (
        "" if len(bad) == count else ", or pass --skip-bad to leave it out"
    )
    raise UserError(f"{bad[0]}{more}: {what}; {hint}")


def labelled_batches(labeled: LabeledImages, class_names: list[str], batch_size: int, seed: int, image_size: int,
                     accelerator: Any, workers: int, balanced: bool = False,
                     skip_bad: bool = False, decoding: Decoding = Decoding()) -> tuple[EpochBatches, list[str]]:  # fmt: skip
    """The labelled images as uint8 batches from the store when they fit, else the stream
    (`labelfew.data.sources`), and the files found undecodable before training.

    `batch_size` is the global batch, capped by the images there are; each process takes its
    share. The last incomplete batch is dropped, so no step sees a single image (a BatchNorm in
    training mode cannot normalise one, e.g. the head layer of ``--from-head-layer 1``). With
    `balanced`, every class is drawn equally often (with replacement). `decoding`: the model's
    channels and window (`labelfew.spec.ModelSpec.decoding`).

    Raises:
        UserError: a labelled image cannot be decoded and `skip_bad` is False (`readable_labels`).
    """
    targets = labeled.label_indices(class_names)
    batch = max(1, min(batch_size, len(labeled)) // accelerator.num_processes)
    weights = None
    if balanced:
        counts = torch.bincount(torch.tensor(targets), minlength=len(class_names)).float()
        weights = (1.0 / counts)[torch.tensor(targets)].tolist()
    order = EpochOrder(len(labeled), batch, seed, accelerator.process_index, accelerator.num_processes,
                       weights=weights)  # fmt: skip
    paths = list(labeled.paths)
    budget = DEFAULT_MEMORY_BUDGET / 2**30
    place = sources.augment_place("auto", budget, paths, image_size, decoding=decoding)
    batches, undecodable = sources.training_batches(paths, place, image_size, order, accelerator, budget,
                                                    workers=workers, labels=targets, decoding=decoding)  # fmt: skip
    if undecodable:
        _refuse_unless(skip_bad, undecodable, len(paths))
    return batches, undecodable


def unlabeled_batches(paths: list[Path], labels: list[int] | None, batch_size: int, seed: int, image_size: int,
                      accelerator: Any, *, root: Path, place: str, memory_budget: float, workers: int,
                      on_progress: Callable[[int, int], None] | None = None,
                      decoding: Decoding = Decoding()) -> tuple[EpochBatches, list[str]]:  # fmt: skip
    """Unlabeled images as uint8 batches from the same store or stream as pretraining
    (`labelfew.data.sources`) in their own seeded order, and the files found undecodable.

    `batch_size` is the global batch, capped by the images there are; each process takes its
    share and the last incomplete batch is dropped. `labels` (a folder of class folders) only
    serve the logged pseudo-label accuracy. `decoding`: the model's channels and window.

    Raises:
        UserError: too few decodable images under `root` for one batch per process.
    """
    per_process = max(1, min(batch_size, len(paths)) // accelerator.num_processes)
    order = EpochOrder(len(paths), per_process, seed, accelerator.process_index, accelerator.num_processes)
    batches, undecodable = sources.training_batches(paths, place, image_size, order, accelerator, memory_budget,
                                                    workers=workers, labels=labels, on_progress=on_progress,
                                                    decoding=decoding)  # fmt: skip
    if len(batches) == 0:
        raise UserError(f"{root}: too few decodable images for one batch of {accelerator.num_processes}")
    return batches, undecodable
