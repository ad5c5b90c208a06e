"""The only module that reads or writes weights and their metadata (the stages' registry is in
`labelfew.registry`).

An artifact is a `.safetensors` file (tensors + str→str metadata) with a `run.json` beside it.
Loading never unpickles, so a crafted artifact cannot run code; `run.json` records every
artifact's sha256 and a mismatch is reported as a corrupt file. The metadata holds the stage
name, the resolved config and the model's `labelfew.spec.ModelSpec`.

Weights of other tools (`--init` files) are read here too (`read_weights`): a safetensors file, or a
`.pth`/`.pt`/`.bin` through ``torch.load(weights_only=True)`` (never a full unpickle). Files
written today:

    pretrain/backbone.safetensors   backbone state dict, timm key layout (no prefixes)
    pretrain/head.safetensors       projection head state dict (`layers.*`), metadata part=head
    finetune*/model.safetensors     `backbone.*`, optional `head.*`, `classifier.*`
    finetune*/model-last.safetensors  the last epoch beside the best one (`--val-fraction`); recorded in
                                    run.json, not a stage's file: evaluate scores it only when named
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from labelfew import __version__
from labelfew.errors import UserError
from labelfew.fileio import atomic_write, atomic_write_json, sha256_file
from labelfew.spec import ModelSpec

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class Artifact:
    """Tensors and metadata read from one safetensors file."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def stage(self) -> str:
        return self.metadata.get("stage", "")

    @property
    def arch(self) -> str:
        return self.metadata["arch"]

    @property
    def spec(self) -> ModelSpec:
        """The model this artifact holds (raises UserError naming the file when incomplete)."""
        return ModelSpec.from_metadata(self.metadata, where=self.path)

    def json_field(self, key: str) -> Any:
        """A metadata value stored as JSON (config)."""
        return json.loads(self.metadata[key])

    def run_info(self) -> dict[str, Any]:
        """The `run.json` beside the artifact ({} when absent)."""
        run_file = self.path.parent / "run.json"
        if not run_file.is_file():
            return {}
        return json.loads(run_file.read_text(encoding="utf-8"))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Writes a safetensors file atomically and returns its sha256.

    Tensors are made contiguous and moved to the CPU; metadata gets `format_version` and
    `labelfew_version`.
    """
    plain = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    full_metadata = {**metadata, "format_version": FORMAT_VERSION, "labelfew_version": __version__}
    atomic_write(Path(path), lambda temporary: save_file(plain, str(temporary), metadata=full_metadata))
    return sha256_file(path)


def write_run_json(folder: Path, record: dict[str, Any]) -> None:
    """Writes `run.json` (resolved config, hashes, data summary, metrics, versions) atomically."""
    record = {
        "labelfew_version": __version__,
        "torch_version": torch.__version__,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **record,
    }
    atomic_write_json(Path(folder) / "run.json", record)


def load_artifact(path: Path, expected_stage: str | None = None) -> Artifact:
    """Reads and checks an artifact.

    Raises:
        UserError: missing file, not a safetensors file (truncated, random bytes), a sha256 that
            differs from run.json, or a stage other than `expected_stage`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such artifact file")
    expected_hash = _recorded_hash(path)
    if expected_hash is not None and sha256_file(path) != expected_hash:
        raise UserError(f"{path}: corrupt (its sha256 differs from run.json); rerun the stage that wrote it")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            metadata = dict(reader.metadata() or {})
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise UserError(
            f"{path}: not a readable safetensors artifact ({error}); rerun the stage that wrote it"
        ) from None
    if "stage" not in metadata or "arch" not in metadata:
        raise UserError(f"{path}: not a labelfew artifact (no stage/arch metadata)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: artifact format {metadata.get('format_version')!r}, but this labelfew "
            f"{__version__} reads format {FORMAT_VERSION!r}; use the labelfew version that wrote it "
            f"({metadata.get('labelfew_version', 'unknown')}) or rerun the stage"
        )
    if expected_stage is not None and metadata["stage"] != expected_stage:
        raise UserError(
            f"{path}: a {metadata['stage']} artifact, but a {expected_stage} artifact is needed here"
        )
    return Artifact(path=path, tensors=tensors, metadata=metadata)


def _recorded_hash(path: Path) -> str | None:
    run_file = path.parent / "run.json"
    if not run_file.is_file():
        return None
    try:
        record = json.loads(run_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{run_file}: corrupt run.json; rerun the stage that wrote it") from None
    value = record.get("artifacts", {}).get(path.name, {}).get("sha256")
    return value if isinstance(value, str) else None


PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
"""Weights files of other tools read with ``torch.load(weights_only=True)``."""


def read_weights(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a weights file of any tool: a ``.safetensors`` file (never
    unpickled), or a `PICKLE_SUFFIXES` checkpoint through ``torch.load(weights_only=True)`` (never a
    full unpickle), its nested dicts (``{"state_dict": {"module.x": t}}``) flattened to dotted keys.

    Raises:
        UserError: ``"{what}: ..."``: unreadable, not only tensors, no tensors, or another format.
    """
    if path.suffix == ".safetensors":
        metadata = weights_metadata(path, what)
        try:
            return load_file(str(path)), metadata
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise UserError(f"{what}: not a readable safetensors file ({error})") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise UserError(
            f"{what}: unknown weights format {path.suffix!r}; use .safetensors, .pth, .pt or .bin"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            why = "it holds Python objects, not only tensors, which torch.load(weights_only=True) refuses to run"
        raise UserError(f"{what}: cannot be read as weights ({why}); save its state_dict instead") from None
    tensors = _flatten(loaded)
    if not tensors:
        raise UserError(f"{what}: holds no tensors")
    return tensors, {}


def weights_metadata(path: Path, what: str) -> dict[str, str]:
    """A weights file's metadata without its tensors: a safetensors header's, {} for other files.

    Raises:
        UserError: ``"{what}: ..."``: an unreadable safetensors file.
    """
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            return dict(reader.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise UserError(f"{what}: not a readable safetensors file ({error})") from None


def _flatten(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dicts as one dict of dotted keys to tensors."""
    if isinstance(value, torch.Tensor):
        return {prefix[:-1]: value}
    if isinstance(value, Mapping):
        flat: dict[str, torch.Tensor] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {}
