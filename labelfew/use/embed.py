"""`labelfew embed`: L2-normalised backbone features of every image of a folder, saved as
safetensors with an index CSV of paths beside it, for `labelfew similar`.

They are the features kNN and the linear probe use, not the projection head's output (trap 6 in
DESIGN.md: the head is shaped for the contrastive loss).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from labelfew.artifacts import resolve_model, save_tensors
from labelfew.config import EmbedConfig
from labelfew.data.images import require_images
from labelfew.errors import UserError
from labelfew.fileio import sha256_file
from labelfew.models import features_model, load_model
from labelfew.use.files import console, relative_path, report_bad, report_skipped, shown, write_csv
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
    artifact = resolve_model(config.source, ("backbone", "classifier"))
    spec = artifact.spec
    found = require_images(config.images, follow_links=config.follow_links)
    paths = found.paths
    outputs = run_model(
        features_model(load_model(artifact)),
        paths,
        spec,
        config.batch_size,
        config.workers,
        "embed",
        config.quiet,
    )
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
        "source": str(artifact.path.resolve()),
        "source_stage": artifact.stage,
        "source_sha256": sha256_file(artifact.path),
    }
    save_tensors(config.out, {"embeddings": embeddings}, metadata)
    if not config.quiet:
        console.print(
            f"wrote {shown(config.out)}: {embeddings.shape[0]} × {embeddings.shape[1]} L2-normalised "
            f"{artifact.stage} backbone features from {shown(artifact.path)}; index {shown(index)}"
        )
        report_bad(paths, outputs.errors, "not in the index")
        report_skipped(found.skipped)
    return config.out
