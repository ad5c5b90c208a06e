"""Using a trained model: classify a folder, embed it, and search it by similarity.

- `predict`: the fine-tuned model's class, confidence (softmax probability) and top-k classes
  for every image of a folder, written as a CSV whose `path,label` columns are those of a label CSV.
- `embed`: L2-normalised backbone features, saved as safetensors with an index CSV of paths beside
  it. They are the features kNN and the linear probe use, not the projection head's output
  (trap 6 in DESIGN.md: the head is shaped for the contrastive loss).
- `similar`: the indexed images nearest to a query image by cosine similarity.

Images are decoded as in training (`load_rgb`) and go through the artifact's evaluation transform.
A file that cannot be decoded is reported by name and never stops a run.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, Dataset

from labelfew import engine
from labelfew.artifacts import Artifact, load_artifact, resolve_artifact, save_tensors
from labelfew.data.images import BadImage, find_images, load_rgb
from labelfew.errors import UserError
from labelfew.fileio import atomic_write_text, sha256_file
from labelfew.models import artifact_backbone, load_weights
from labelfew.stages.finetune import load_classifier
from labelfew.views.pil import eval_transform

console = Console()  # results go to stdout; progress goes to engine.console (stderr)


@dataclass(frozen=True)
class PredictConfig:
    """`labelfew predict`: classify every image of a folder."""

    images: Path
    out: Path = Path("predictions.csv")
    source: Path | None = None  # finetune artifact / stage / run folder; None: latest run
    top_k: int = 3
    batch_size: int = 256
    workers: int | None = None
    quiet: bool = False


@dataclass(frozen=True)
class EmbedConfig:
    """`labelfew embed`: backbone features of every image of a folder."""

    images: Path
    out: Path = Path("embeddings.safetensors")
    source: Path | None = None  # pretrain (preferred in a run folder) or finetune artifact
    batch_size: int = 256
    workers: int | None = None
    quiet: bool = False


@dataclass(frozen=True)
class SimilarConfig:
    """`labelfew similar`: nearest indexed images to a query image."""

    query: Path
    index: Path = Path("embeddings.safetensors")
    top_k: int = 10
    source: Path | None = None  # the model the index was built with, if it has moved since


@dataclass
class Outputs:
    """Model outputs for a list of image files.

    Attributes:
        values: one row per decodable file. Shape: (len(kept), dim)
        kept: the index (into the file list) of each row of `values`.
        errors: file index -> why that file could not be decoded.
    """

    values: torch.Tensor
    kept: list[int]
    errors: dict[int, str] = field(default_factory=dict)


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


def device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def run_model(
    model: nn.Module,
    paths: list[Path],
    artifact: Artifact,
    batch_size: int = 256,
    workers: int | None = None,
    description: str = "",
    quiet: bool = True,
) -> Outputs:
    """Runs `model` (in eval mode, float32) over image files with the artifact's eval transform.

    Shape: returns values (decodable files, model output size)
    """
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: use at least 1")
    transform = eval_transform(
        int(artifact.metadata["image_size"]), artifact.json_field("mean"), artifact.json_field("std")
    )
    loader = DataLoader(
        _Files(paths, transform),
        batch_size=batch_size,
        num_workers=engine.default_workers(workers),
        collate_fn=_collate,
        pin_memory=torch.cuda.is_available(),
    )
    target = device()
    model = model.eval().to(target)
    values, kept, errors = [], [], {}
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
        for batch in loader:
            errors.update(batch["errors"])
            if batch["images"] is not None:
                values.append(model(batch["images"].to(target)).float().cpu())
                kept.extend(batch["indices"])
            progress.advance(task, len(batch["indices"]) + len(batch["errors"]))
    width = values[0].shape[1] if values else 0
    return Outputs(torch.cat(values) if values else torch.zeros(0, width), kept, errors)


def load_backbone(artifact: Artifact) -> nn.Module:
    """The backbone of a pretrain artifact, or the fine-tuned backbone of a finetune artifact.

    Raises:
        UserError: the tensors do not fit the recorded architecture, or another kind of artifact.
    """
    if artifact.stage == "finetune":
        return load_classifier(artifact).backbone
    if artifact.stage != "pretrain":
        raise UserError(f"{artifact.path}: a {artifact.stage} file; pass a pretrain or finetune artifact")
    return load_weights(artifact_backbone(artifact), artifact)


def resolve_model(source: Path | None, stages: tuple[str, ...]) -> Artifact:
    """Loads the artifact `--from` names, preferring a self-supervised finetune over a scratch one.

    A run folder (or no `--from`) can hold both `finetune-<labels>/` and the `--scratch` baseline;
    the baseline is used only when it is the run's only fine-tuned model.
    """
    path = resolve_artifact(source, stages)
    artifact = load_artifact(path)
    picked_from_run = source is None or (Path(source).is_dir() and path.parent != Path(source))
    if artifact.stage == "finetune" and picked_from_run and _is_scratch(artifact):
        siblings = sorted(
            (p for p in path.parent.parent.glob("finetune*/model.safetensors") if p != path),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for sibling in siblings:
            if (sibling.parent / "run.json").is_file():
                candidate = load_artifact(sibling, "finetune")
                if not _is_scratch(candidate):
                    return candidate
    return artifact


def _is_scratch(artifact: Artifact) -> bool:
    return bool(json.loads(artifact.metadata.get("scratch", "false")))


def _image_files(folder: Path) -> list[Path]:
    paths = find_images(folder)
    if not paths:
        raise UserError(
            f"{folder}: no image files (jpg, png, webp, bmp, tif, gif) found, searched recursively"
        )
    return paths


def _relative(path: Path, folder: Path) -> str:
    """`path` relative to `folder` (POSIX separators), as label CSVs write paths."""
    try:
        return Path(os.path.relpath(path.absolute(), folder.absolute())).as_posix()
    except ValueError:  # another drive on Windows
        return path.absolute().as_posix()


def _shown(path: Path) -> str:
    """A path as the user typed it would look: relative to the current folder when inside it."""
    try:
        return path.absolute().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path.absolute())


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _report_bad(paths: list[Path], errors: dict[int, str], where: str) -> None:
    if errors:
        names = ", ".join(_shown(paths[index]) for index in sorted(errors)[:3])
        more = ", …" if len(errors) > 3 else ""
        console.print(f"[yellow]{len(errors)} file(s) could not be decoded[/] ({where}): {names}{more}")


def predict(config: PredictConfig) -> Path:
    """Classifies every image under `config.images`; writes and returns the predictions CSV.

    Columns: `path` (relative to the CSV's folder), `label` (top-1 class), `confidence` (its softmax
    probability), `label_2`, `confidence_2`, … up to `top_k`, and `error` (empty unless the file
    could not be decoded, in which case the class columns are empty).
    """
    if config.top_k < 1:
        raise UserError(f"--top-k {config.top_k}: use at least 1")
    artifact = resolve_model(config.source, ("finetune",))
    if artifact.stage != "finetune":
        raise UserError(f"{artifact.path}: a {artifact.stage} artifact; predict needs a fine-tuned model")
    paths = _image_files(config.images)
    class_names: list[str] = artifact.json_field("class_names")
    outputs = run_model(
        load_classifier(artifact), paths, artifact, config.batch_size, config.workers, "predict", config.quiet
    )
    if not outputs.kept:
        raise UserError(f"{config.images}: none of the {len(paths)} image files could be decoded")
    k = min(config.top_k, len(class_names))
    top_probability, top_index = torch.softmax(outputs.values, dim=1).topk(k, dim=1)
    header = ["path", "label", "confidence"]
    for rank in range(2, k + 1):
        header += [f"label_{rank}", f"confidence_{rank}"]
    row_of = {file_index: row for row, file_index in enumerate(outputs.kept)}
    folder = config.out.absolute().parent
    rows: list[list[Any]] = []
    for file_index, path in enumerate(paths):
        if file_index in outputs.errors:
            rows.append([_relative(path, folder), *[""] * (2 * k), outputs.errors[file_index]])
            continue
        row = row_of[file_index]
        cells: list[Any] = []
        for rank in range(k):
            cells += [class_names[int(top_index[row, rank])], f"{float(top_probability[row, rank]):.4f}"]
        rows.append([_relative(path, folder), *cells, ""])
    _write_csv(config.out, [*header, "error"], rows)
    if not config.quiet:
        _print_predictions(config, artifact, class_names, top_index[:, 0], top_probability[:, 0], outputs)
        _report_bad(paths, outputs.errors, "listed in the CSV with their error")
    return config.out


def _print_predictions(
    config: PredictConfig,
    artifact: Artifact,
    class_names: list[str],
    predicted: torch.Tensor,
    confidence: torch.Tensor,
    outputs: Outputs,
) -> None:
    table = Table(title=f"predictions — {len(outputs.kept)} images")
    for column in ("class", "images", "mean confidence"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for index, name in enumerate(class_names):
        chosen = predicted == index
        count = int(chosen.sum())
        mean = f"{float(confidence[chosen].mean()):.2f}" if count else "—"
        table.add_row(name, str(count), mean)
    console.print(table)
    console.print(
        f"model {_shown(artifact.path)}; wrote {_shown(config.out)} "
        f"({len(outputs.kept) + len(outputs.errors)} rows, top {min(config.top_k, len(class_names))})"
    )


def embed(config: EmbedConfig) -> Path:
    """Writes L2-normalised backbone features of every image and an index CSV beside them.

    The safetensors file holds `embeddings` (Shape: (images, num_features)) and records the model it
    came from (path and sha256), so `similar` embeds queries with the same backbone. Row i of the
    index CSV (`<out stem>.csv`, columns `row,path`) is row i of the embeddings.
    """
    if config.out.suffix != ".safetensors":
        raise UserError(f"--out {config.out}: name the embeddings file *.safetensors")
    artifact = resolve_model(config.source, ("pretrain", "finetune"))
    paths = _image_files(config.images)
    outputs = run_model(
        load_backbone(artifact), paths, artifact, config.batch_size, config.workers, "embed", config.quiet
    )
    if not outputs.kept:
        raise UserError(f"{config.images}: none of the {len(paths)} image files could be decoded")
    embeddings = nn.functional.normalize(outputs.values, dim=1)
    index = config.out.with_suffix(".csv")
    folder = index.absolute().parent
    _write_csv(
        index, ["row", "path"], [[row, _relative(paths[i], folder)] for row, i in enumerate(outputs.kept)]
    )
    metadata = {
        "stage": "embeddings",
        **{key: artifact.metadata[key] for key in ("arch", "image_size", "mean", "std", "small_stem")},
        "num_features": str(embeddings.shape[1]),
        "images": str(embeddings.shape[0]),
        "index": index.name,
        "source": str(artifact.path.resolve()),
        "source_stage": artifact.stage,
        "source_sha256": sha256_file(artifact.path),
    }
    save_tensors(config.out, {"embeddings": embeddings}, metadata)
    if not config.quiet:
        console.print(
            f"wrote {_shown(config.out)}: {embeddings.shape[0]} × {embeddings.shape[1]} L2-normalised "
            f"{artifact.stage} backbone features from {_shown(artifact.path)}; index {_shown(index)}"
        )
        _report_bad(paths, outputs.errors, "not in the index")
    return config.out


@dataclass(frozen=True)
class Neighbour:
    """One result of `similar`."""

    rank: int
    similarity: float
    path: Path


def similar(config: SimilarConfig) -> list[Neighbour]:
    """The `top_k` indexed images most similar to the query (cosine similarity), most similar first.

    The query itself is left out when it is one of the indexed files.
    """
    if config.top_k < 1:
        raise UserError(f"-k {config.top_k}: use at least 1")
    if not config.index.is_file():
        raise UserError(
            f"--index {config.index}: no such file; build it with `labelfew embed FOLDER --out {config.index}`"
        )
    index = load_artifact(config.index, "embeddings")
    paths = _index_paths(index)
    artifact = _index_model(index, config.source)
    if not config.query.is_file():
        raise UserError(f"{config.query}: no such image file")
    query = run_model(load_backbone(artifact), [config.query], artifact)
    if query.errors:
        raise UserError(f"{config.query}: not a readable image ({query.errors[0]})")
    similarity = index.tensors["embeddings"].float() @ nn.functional.normalize(query.values, dim=1)[0]
    same = [row for row, path in enumerate(paths) if path.resolve() == config.query.resolve()]
    similarity[same] = -float("inf")
    count = min(config.top_k, len(paths) - len(same))
    values, rows = similarity.topk(count)
    neighbours = [
        Neighbour(rank + 1, float(value), paths[int(row)])
        for rank, (value, row) in enumerate(zip(values, rows, strict=True))
    ]
    table = Table(title=f"most similar to {_shown(config.query)}")
    table.add_column("rank", justify="right")
    table.add_column("similarity", justify="right")
    table.add_column("path", overflow="fold")
    for neighbour in neighbours:
        table.add_row(str(neighbour.rank), f"{neighbour.similarity:.3f}", _shown(neighbour.path))
    console.print(table)
    return neighbours


def _index_paths(index: Artifact) -> list[Path]:
    csv_path = index.path.parent / index.metadata.get("index", index.path.with_suffix(".csv").name)
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: the index CSV beside {index.path} is missing; rerun `labelfew embed`")
    with csv_path.open(encoding="utf-8", newline="") as stream:
        paths = [csv_path.parent / row["path"] for row in csv.DictReader(stream)]
    if len(paths) != index.tensors["embeddings"].shape[0]:
        raise UserError(
            f"{csv_path}: {len(paths)} rows but {index.path} holds "
            f"{index.tensors['embeddings'].shape[0]} embeddings; rerun `labelfew embed`"
        )
    return paths


def _index_model(index: Artifact, source: Path | None) -> Artifact:
    """The artifact the index was built with: as recorded, or `--from` when it has moved."""
    path = Path(source) if source is not None else Path(index.metadata["source"])
    if source is not None and path.is_dir():
        path = resolve_artifact(path, (index.metadata["source_stage"],))
    if not path.is_file():
        raise UserError(
            f"{index.path} was built with {path}, which no longer exists; pass --from with that artifact"
        )
    if sha256_file(path) != index.metadata["source_sha256"]:
        raise UserError(
            f"{path} is not the model {index.path} was built with; pass --from with that artifact "
            "or rerun `labelfew embed`"
        )
    return load_artifact(path)
