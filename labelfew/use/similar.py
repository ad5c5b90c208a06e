"""`labelfew similar`: the images of an `embed` index nearest to a query image (cosine similarity),
the query embedded with the same backbone the index was built with."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table
from torch import nn

from labelfew.artifacts import Artifact, load_artifact
from labelfew.config import SimilarConfig
from labelfew.engine.init_weights import read_init
from labelfew.errors import UserError
from labelfew.fileio import sha256_file
from labelfew.models import features_model, load_model
from labelfew.registry import resolve_artifact
from labelfew.spec import ModelSpec
from labelfew.use.files import console, shown
from labelfew.use.frozen_init import init_backbone
from labelfew.use.inference import run_model


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
    model, spec = _index_backbone(index, config.source)
    if not config.query.is_file():
        raise UserError(f"{config.query}: no such image file")
    query = run_model(model, [config.query], spec)
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
    table = Table(title=f"most similar to {shown(config.query)}")
    table.add_column("rank", justify="right")
    table.add_column("similarity", justify="right")
    table.add_column("path", overflow="fold")
    for neighbour in neighbours:
        table.add_row(str(neighbour.rank), f"{neighbour.similarity:.3f}", shown(neighbour.path))
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


def _index_backbone(index: Artifact, source: Path | None) -> tuple[nn.Module, ModelSpec]:
    """The backbone the index was built with and its spec: a labelfew model, or `embed --init`'s weights
    (read again from their source, `--from` when they have moved, and checked by sha256)."""
    if index.metadata.get("source_stage") != "init":
        artifact = _index_model(index, source)
        return features_model(load_model(artifact)), artifact.spec
    origin = str(source) if source is not None else index.metadata["source"]
    init = read_init(origin, arch=index.metadata["arch"], prefix=index.metadata.get("init_prefix"))
    if init.sha256 != index.metadata["source_sha256"]:
        raise UserError(
            f"--init {origin} is not the weights {index.path} was built with; pass --from with those "
            "or rerun `labelfew embed`"
        )
    recorded = ModelSpec.from_metadata(index.metadata, index.path)  # the decoding the index was embedded with
    own = init_backbone(init, [], recorded.image_size, recorded.decoding)
    return own.model, own.spec


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
