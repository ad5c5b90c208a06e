"""`labelfew select`: which images of an unlabeled folder to label first.

Embeds the folder with the run's pretrained backbone (or `--init`'s weights: timm's, another
tool's, an export; `labelfew.engine.start.frozen_backbone`), clusters the embeddings into budget +
already-labelled clusters, and picks per `--strategy` (see `labelfew.selection`):

- typical (TypiClust, arXiv 2202.02794): the most typical image of each cluster that the
  labelled images do not cover, largest cluster first. The default without a fine-tuned model.
- uncertain: the smallest top-1 − top-2 softmax margin of the fine-tuned model, one image per
  cluster a round, so that one confusing region cannot take the whole budget.
- mixed (the default with a fine-tuned model and `--labels`): typical picks until the labels
  reach `MIXED_TYPICAL_PER_CLASS` per class of the model, uncertain picks after.

Writes `to-label.csv` (`path,label`, label empty, paths relative to the CSV's folder) and
`to-label.html` beside it (`labelfew.report.label_page`): the picks to label, and the `--labels`
images with their labels, editable, so that the page's download (`labels-round<N>.csv`, a name no
earlier round's file in that folder has) holds every label. A CSV whose labels were filled in is
never overwritten without `--force`.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from labelfew import selection
from labelfew.artifacts import Artifact, load_artifact
from labelfew.config import SelectConfig
from labelfew.data.images import printable, scan_images, skipped_note
from labelfew.data.labels import LabeledImages, read_label_files
from labelfew.engine.init_weights import Init, read_init
from labelfew.engine.start import FrozenBackbone
from labelfew.errors import UserError
from labelfew.fileio import atomic_write_text
from labelfew.models import features_model, load_model
from labelfew.registry import resolve_artifact, resolve_model, stage_info, stage_names
from labelfew.report.label_page import PageItem, channels_note, thumbnail_uri, write_label_page
from labelfew.spec import Decoding
from labelfew.use.frozen_init import init_backbone
from labelfew.use.inference import run_model

console = Console()


def _models(source: Path | None, init: Init | None) -> tuple[Artifact | None, Artifact | None]:
    """(the pretrained backbone to embed with, the fine-tuned model if `--from` leads to one).

    With `--init` the init embeds: `--from` then only names the fine-tuned model (none without it).

    Raises:
        UserError: nothing found, or no pretrained backbone in the run (a `--scratch` model alone).
    """
    if init is not None:
        return None, resolve_model(source, ("classifier",)) if source is not None else None
    artifact = resolve_model(source, ("classifier", "backbone"))
    if stage_info(artifact.stage).kind == "backbone":
        return artifact, None
    parent = (artifact.run_info().get("parent") or {}).get("path")
    if parent and Path(parent).is_file():
        return load_artifact(Path(parent)), artifact
    try:
        backbone = resolve_artifact(artifact.path.parent.parent, stage_names(("backbone",)))
    except UserError:
        raise UserError(
            f"{artifact.path}: its run has no pretrained backbone; select embeds with one: run "
            "`labelfew pretrain FOLDER` first, or pass --from a run or artifact that has one"
        ) from None
    return load_artifact(backbone), artifact


def _embed(
    paths: list[Path], pretrained: Artifact | None, own: FrozenBackbone | None, config: SelectConfig
) -> tuple[np.ndarray, list[int]]:
    """L2-normalised backbone features (the pretrained run's, or `--init`'s) of the decodable files,
    and their indices into `paths`.

    Shape: -> (decodable files, num_features)
    """
    if own is not None:
        model, spec = own.model, own.spec
    else:
        assert pretrained is not None
        model, spec = features_model(load_model(pretrained)), pretrained.spec
    outputs = run_model(model, paths, spec, config.batch_size, config.workers, "embed", config.quiet)
    if outputs.errors and not config.quiet:
        console.print(f"[yellow]{len(outputs.errors)} file(s) could not be decoded[/] and are not chosen")
    return selection.normalize(outputs.values.numpy()), outputs.kept


def _probabilities(paths: list[Path], kept: list[int], model: Artifact, config: SelectConfig) -> np.ndarray:
    """Softmax outputs of the fine-tuned model on the files in `kept` (in that order).

    Shape: -> (len(kept), classes)
    """
    files = [paths[index] for index in kept]
    outputs = run_model(
        load_model(model), files, model.spec, config.batch_size, config.workers, "classify", config.quiet
    )
    if len(outputs.kept) != len(kept):
        raise UserError(f"{config.folder}: files changed while select read them; rerun it")
    return torch.softmax(outputs.values, dim=1).numpy()


def _labelled(known: LabeledImages | None, paths: list[Path]) -> np.ndarray:
    """A mask of the folder's files that `--labels` already labels.

    Raises:
        UserError: a labelled path is not in the folder.
    """
    mask = np.zeros(len(paths), dtype=bool)
    if known is None:
        return mask
    position = {Path(os.path.normpath(path.absolute())): index for index, path in enumerate(paths)}
    outside = [path for path in known.paths if Path(os.path.normpath(path)) not in position]
    if outside:
        raise UserError(
            f"--labels: {len(outside)} of their {len(known)} paths are not in the folder (e.g. "
            f"{outside[0]}); pass the labels of images in this folder"
        )
    mask[[position[Path(os.path.normpath(path))] for path in known.paths]] = True
    return mask


def _check_out(config: SelectConfig) -> None:
    """Refuses to overwrite an `--out` CSV with labels filled in (a round's work) unless `--force`.

    Raises:
        UserError: the CSV has a filled label, or cannot be read to tell.
    """
    if config.force or not config.out.exists():
        return
    try:
        with config.out.open(newline="", encoding="utf-8-sig") as handle:
            filled = sum(1 for row in csv.DictReader(handle) if (row.get("label") or "").strip())
    except (OSError, UnicodeDecodeError, csv.Error):
        filled = -1
    if filled:
        what = "cannot be read as a label CSV" if filled < 0 else f"has {filled} label(s) filled in"
        raise UserError(
            f"--out {config.out}: {what}; pass it to --labels (already labelled), choose another --out, "
            "or add --force to overwrite it"
        )


def download_name(config: SelectConfig) -> str:
    """The name the page downloads its labels as: `labels-round<N>.csv`, N one more than the label
    files given and past any such file in the page's folder, so no round replaces an earlier one."""
    folder = config.out.absolute().parent
    given = {path.absolute() for path in config.labels}
    round_number = len(config.labels) + 1
    while (path := folder / f"labels-round{round_number}.csv").exists() or path in given:
        round_number += 1
    return path.name


def _strategy(config: SelectConfig, model: Artifact | None) -> str:
    multi_label = model is not None and model.spec.multi_label
    if config.strategy is None:
        return "mixed" if model is not None and config.labels and not multi_label else "typical"
    if config.strategy in ("uncertain", "mixed") and multi_label:
        raise UserError(
            f"--strategy {config.strategy}: the top-1 − top-2 margin is not defined for the multi-label model "
            f"{model.path if model else ''}; use --strategy typical"
        )
    if config.strategy in ("uncertain", "mixed") and model is None:
        raise UserError(
            f"--strategy {config.strategy} needs a fine-tuned model: pass --from a finetune artifact or a "
            "run folder with one (or use --strategy typical)"
        )
    return config.strategy


def choose(
    embeddings: np.ndarray,
    labelled: np.ndarray,
    budget: int,
    strategy: str,
    seed: int,
    probabilities: np.ndarray | None = None,
) -> tuple[list[selection.Pick], np.ndarray]:
    """The picks (rows of `embeddings`) and every row's cluster, for one strategy.

    Shape: embeddings (N, D), labelled (N,) bool, probabilities (N, classes) -> clusters (N,)
    """
    clusters = selection.cluster(embeddings, budget + int(labelled.sum()), seed)
    typical_count = budget
    if strategy != "typical":
        assert probabilities is not None
        typical_count = (
            selection.mixed_split(int(labelled.sum()), budget, probabilities.shape[1])[0]
            if strategy == "mixed"
            else 0
        )
    picks = selection.choose_typical(embeddings, clusters, labelled, typical_count, seed=seed)
    if typical_count < budget:
        taken = labelled.copy()
        taken[[pick.row for pick in picks]] = True
        assert probabilities is not None
        margin = selection.margins(probabilities)
        picks += selection.choose_uncertain(margin, clusters, taken, budget - typical_count)
    return picks, clusters


def _relative(path: Path, folder: Path) -> str:
    try:
        return printable(Path(os.path.relpath(path.absolute(), folder.absolute())).as_posix())
    except ValueError:  # another drive on Windows
        return printable(path.absolute().as_posix())


def _classes(config: SelectConfig, model: Artifact | None, known: LabeledImages | None) -> list[str]:
    """The page's label choices: `--classes`, else the fine-tuned model's, else the labels' classes."""
    if config.classes:
        return [name.strip() for name in config.classes.split(",") if name.strip()]
    if model is not None:
        return list(model.spec.class_names or [])
    return known.class_names if known is not None else []


def _write(
    config: SelectConfig,
    chosen: list[Path],
    picks: list[selection.Pick],
    clusters: np.ndarray,
    classes: list[str],
    known: LabeledImages | None,
    decoding: Decoding,
) -> Path:
    """Writes the CSV and the page beside it (the picks, then the earlier labels), thumbnails as the
    embedding model decodes the images (`decoding`); returns the page's path."""
    folder = config.out.absolute().parent
    rows = [_relative(path, folder) for path in chosen]
    atomic_write_text(config.out, "path,label\n" + "".join(f"{_csv_cell(row)},\n" for row in rows))
    sizes = np.bincount(clusters)
    items = [
        PageItem(row, pick.cluster, int(sizes[pick.cluster]), pick.reason, thumbnail_uri(path, decoding))
        for row, pick, path in zip(rows, picks, chosen, strict=True)
    ]
    if known is not None:
        items += [
            PageItem(
                _relative(path, folder),
                -1,
                0,
                "labelled earlier",
                thumbnail_uri(path, decoding),
                earlier=label,
            )
            for path, label in zip(known.paths, known.labels, strict=True)
        ]
    title = f"{len(chosen)} images to label from {config.folder.name or config.folder}"
    page = config.out.with_suffix(".html")
    return write_label_page(page, items, classes, title, download_name(config), channels_note(decoding))


def _csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\r\n') else text


def run(config: SelectConfig) -> Path:
    """Chooses `config.budget` images to label; writes the CSV and the page, returns the CSV's path.

    Raises:
        UserError: a budget above the unlabelled images, `--labels` outside the folder, no
            pretrained backbone, or `uncertain`/`mixed` without a fine-tuned model.
    """
    if config.out.suffix.lower() != ".csv":
        raise UserError(f"--out {config.out}: name the file *.csv (the page goes beside it as *.html)")
    _check_out(config)
    init = read_init(config.init, arch=config.arch, prefix=config.init_prefix) if config.init else None
    known = read_label_files(config.labels) if config.labels else None
    pretrained, model = _models(config.source, init)
    found = scan_images(config.folder, follow_links=config.follow_links)
    paths = found.paths
    labelled = _labelled(known, paths)
    available = len(paths) - int(labelled.sum())
    if config.budget > available:
        raise UserError(
            f"--budget {config.budget}: {config.folder} has only {available} unlabelled images; use at most {available}"
        )
    strategy = _strategy(config, model)
    # --init sees the folder as the fine-tuned model does, else as a survey of it finds
    size, decoding = (model.spec.image_size, model.spec.decoding) if model else (None, None)
    own = init_backbone(init, paths, size, decoding, config.seed) if init else None
    embeddings, kept = _embed(paths, pretrained, own, config)
    labelled = labelled[kept]
    if config.budget > len(kept) - int(labelled.sum()):
        raise UserError(
            f"--budget {config.budget}: only {len(kept) - int(labelled.sum())} unlabelled images decode"
        )
    probabilities = _probabilities(paths, kept, model, config) if strategy != "typical" and model else None
    picks, clusters = choose(embeddings, labelled, config.budget, strategy, config.seed, probabilities)
    decoded = set(kept)
    skipped = found.skipped + [printable(path) for index, path in enumerate(paths) if index not in decoded]
    chosen = [paths[kept[pick.row]] for pick in picks]
    decoding = (
        own.spec.decoding if own is not None else pretrained.spec.decoding if pretrained else Decoding()
    )
    page = _write(config, chosen, picks, clusters, _classes(config, model, known), known, decoding)
    if not config.quiet:
        reasons = ", ".join(f"{count} {reason}" for reason, count in Counter(p.reason for p in picks).items())
        console.print(
            f"chose {len(picks)} of {len(kept)} images ({reasons}; {strategy}, {int(labelled.sum())} already "
            f"labelled, {len(np.unique(clusters))} clusters){escape(skipped_note(skipped))}; "
            f"wrote {config.out} and {page}"
        )
    if (outliers := sum(pick.reason == "outlier" for pick in picks)) and not config.quiet:
        console.print(
            f"[yellow]{outliers} pick(s) come from clusters of ≤ {selection.MIN_CLUSTER_SIZE} images[/], outliers "
            f"that TypiClust never picks: the larger clusters had no image left for --budget {config.budget}"
        )
    _record(config, strategy, pretrained, own, model, len(kept), skipped)
    return config.out


def _record(
    config: SelectConfig,
    strategy: str,
    pretrained: Artifact | None,
    own: FrozenBackbone | None,
    model: Artifact | None,
    images: int,
    skipped: list[str],
) -> None:
    """`<out stem>.json` beside the CSV: how the selection was made, to reproduce it (an `--init`
    by its source, sha256 and the image size its features were taken at)."""
    record = {
        "folder": str(config.folder.absolute()),
        "images": images,
        "skipped": len(skipped),
        "skipped_files": skipped,
        "budget": config.budget,
        "strategy": strategy,
        "seed": config.seed,
        "labels": [str(path.absolute()) for path in config.labels],
        "pretrain": str(pretrained.path.absolute()) if pretrained else None,
        "init": {
            **own.init.record(),
            "image_size": own.spec.image_size,
            "channels": own.spec.channels,
            "window": own.spec.window,
        }
        if own
        else None,
        "finetune": str(model.path.absolute()) if model else None,
    }
    atomic_write_text(config.out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
