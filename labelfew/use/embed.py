"""`labelfew embed`: L2-normalised backbone features of every image of a folder, saved as
safetensors with an index CSV of paths beside it, for `labelfew similar`.

They are the features kNN and the linear probe use, not the projection head's output (trap 6 in
DESIGN.md: the head is shaped for the contrastive loss). With `--init` they are the features of
weights that already exist (`labelfew.engine.start.frozen_backbone`), recorded by source and sha256.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from labelfew.artifacts import Artifact, save_tensors
from labelfew.config import EmbedConfig
from labelfew.data.images import require_images
from labelfew.engine.init_weights import Init, read_init
from labelfew.errors import UserError
from labelfew.fileio import sha256_file
from labelfew.models import features_model, load_model
from labelfew.registry import resolve_model
from labelfew.spec import ModelSpec
from labelfew.use.files import console, relative_path, report_bad, report_skipped, shown, write_csv
from labelfew.use.frozen_init import init_backbone
from labelfew.use.inference import run_model


def embed(config: EmbedConfig) -> Path:
    """Writes L2-normalised backbone features of every image and an index CSV beside them.

    The safetensors file holds `embeddings` (Shape: (images, num_features)) and records the model it
    came from (path and sha256), so `similar` embeds queries with the same backbone. Row i of the
    index CSV (`<out stem>.csv`, columns `row,path`) is row i of the embeddings.
    """
    if config.out.suffix != ".safetensors":
        raise UserError(f"--out {config.out}: name the embeddings file *.safetensors")
    if config.out.is_dir():  # `x.safetensors/`: else an IsADirectoryError after every image was embedded
        raise UserError(
            f"--out {config.out}: a folder; name the embeddings file, e.g. {config.out / 'embeddings.safetensors'}"
        )
    init = read_init(config.init, arch=config.arch, prefix=config.init_prefix) if config.init else None
    artifact = resolve_model(config.source, ("backbone", "classifier")) if init is None else None
    found = require_images(config.images, follow_links=config.follow_links)
    paths = found.paths
    model, spec, source = _backbone(artifact, init, paths)
    outputs = run_model(model, paths, spec, config.batch_size, config.workers, "embed", config.quiet)
    if not outputs.kept:
        raise UserError(f"{config.images}: none of the {len(paths)} image files could be decoded")
    embeddings = nn.functional.normalize(outputs.values, dim=1)
    index = config.out.with_suffix(".csv")
    folder = index.absolute().parent
    write_csv(
        index, ["row", "path"], [[row, relative_path(paths[i], folder)] for row, i in enumerate(outputs.kept)]
    )
    metadata = {
        "stage": "embeddings",
        **spec.backbone().to_metadata(),
        "images": str(embeddings.shape[0]),
        "index": index.name,
        **source,
    }
    save_tensors(config.out, {"embeddings": embeddings}, metadata)
    if not config.quiet:
        console.print(
            f"wrote {shown(config.out)}: {embeddings.shape[0]} × {embeddings.shape[1]} L2-normalised "
            f"{_origin(spec, source['source_stage'], source['source'])}; index {shown(index)}"
        )
        report_bad(paths, outputs.errors, "not in the index")
        report_skipped(found.skipped)
    return config.out


def _backbone(
    artifact: Artifact | None, init: Init | None, paths: list[Path]
) -> tuple[nn.Module, ModelSpec, dict[str, str]]:
    """The backbone to embed with, its spec, and what the embeddings file records of where it came from.

    An `--init` backbone is recorded by its source, sha256 and key prefix (`source_stage` "init"), and
    decodes the images as a survey of them finds (`labelfew.use.frozen_init`; the index records it).
    """
    if init is not None:
        own = init_backbone(init, paths)
        record = {"source": init.source, "source_stage": "init", "source_sha256": init.sha256,
                  "init_prefix": init.prefix}  # fmt: skip
        return own.model, own.spec, record
    assert artifact is not None
    record = {"source": str(artifact.path.resolve()), "source_stage": artifact.stage,
              "source_sha256": sha256_file(artifact.path)}  # fmt: skip
    return features_model(load_model(artifact)), artifact.spec, record


def _origin(spec: ModelSpec, stage: str, source: str) -> str:
    """What the features are, for the summary line: `pretrain backbone features from PATH`."""
    if stage == "init":
        return f"backbone features of --init {source} ({spec.arch}, {spec.image_size} px)"
    return f"{stage} backbone features from {shown(Path(source))}"
