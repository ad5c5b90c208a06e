"""`labelfew embed --init`: the features of weights that already exist, recorded by source and sha256."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import CopyPerClass
from reference.pil_views import eval_transform
from safetensors.torch import save_file
from typer.testing import CliRunner

from labelfew.artifacts import load_artifact
from labelfew.cli import app
from labelfew.config import EmbedConfig, SimilarConfig
from labelfew.data.images import load_rgb
from labelfew.fileio import sha256_file
from labelfew.models import build_backbone
from labelfew.use.embed import embed
from labelfew.use.similar import similar

runner = CliRunner()


@pytest.fixture(autouse=True)
def _on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference runs on the CPU; on a GPU, cuDNN's TF32 convolutions differ by ~1e-3."""
    monkeypatch.setattr("labelfew.use.inference.device", lambda: torch.device("cpu"))


def test_embed_init_gives_the_weights_own_features_and_records_them(
    digits_folder: tuple[Path, Path], copy_per_class: CopyPerClass, tmp_path: Path
) -> None:
    images = copy_per_class(digits_folder[1], tmp_path / "images", per_class=2)
    torch.manual_seed(5)
    backbone = build_backbone("test_resnet", small_stem=False).eval()
    weights = tmp_path / "other-tool.safetensors"
    save_file(backbone.state_dict(), str(weights), metadata={"architecture": "test_resnet"})
    out = tmp_path / "index" / "embeddings.safetensors"
    out.parent.mkdir()
    embed(EmbedConfig(images=images, out=out, init=str(weights), workers=0, quiet=True))
    index = load_artifact(out, "embeddings")
    metadata = index.metadata
    assert (metadata["source"], metadata["source_stage"]) == (str(weights), "init")
    assert metadata["source_sha256"] == metadata["init_sha256"] == sha256_file(weights)
    assert (metadata["init"], metadata["arch"], metadata["image_size"]) == (str(weights), "test_resnet", "32")
    rows = out.with_suffix(".csv").read_text().splitlines()[1:]
    transform = eval_transform(32)  # the test images' side; ImageNet's mean/std (the file records none)
    for row, line in enumerate(rows):
        with torch.no_grad():
            features = backbone(transform(load_rgb(out.parent / line.split(",", 1)[1]))[None])[0]
        torch.testing.assert_close(
            index.tensors["embeddings"][row], features / features.norm(), atol=1e-5, rtol=1e-4
        )
    # similar embeds a query with the same weights, read again from where embed recorded them
    query = tmp_path / "query.png"
    shutil.copy(out.parent / rows[3].split(",", 1)[1], query)
    nearest = similar(SimilarConfig(query=query, index=out, top_k=1))[0]
    assert nearest.path.resolve() == (out.parent / rows[3].split(",", 1)[1]).resolve()
    assert nearest.similarity == pytest.approx(1.0, abs=1e-5)


def test_embed_with_a_bad_init_exits_2_in_one_line(digits_folder: tuple[Path, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["embed", str(digits_folder[1]), "--init", str(tmp_path / "missing.pth")])
    assert result.exit_code == 2, result.output
    assert "--init" in result.output and "no such file or folder" in result.output
    assert "Traceback" not in result.output
