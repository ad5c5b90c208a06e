"""The registry of stages: what each stage writes, and how commands find models through it.

Each stage module registers what it writes (`register_stage`: its model file and folder, backbone
or classifier, evaluate's name for it); `resolve_artifact`, `find_models` and `resolve_model` find
models through that registry (`labelfew.stages` imports every stage), and a stage folder by what it
holds (its file and a run.json naming the stage), not its name. The files themselves are read and
written by `labelfew.artifacts`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from labelfew.artifacts import Artifact, load_artifact
from labelfew.errors import UserError

RUNS_ROOT = Path("runs")
ModelKind = Literal["backbone", "classifier"]


@dataclass(frozen=True)
class StageInfo:
    """What a stage writes, as the commands that read it need to know.

    Attributes:
        name: the `stage` metadata value (and `run.json`'s), e.g. "finetune".
        file: the model file in the stage's folder, e.g. "model.safetensors".
        folder: the stage's folder in a run: `<run>/<folder>` or `<run>/<folder>-<suffix>`.
        kind: "backbone" (features only: kNN, probe, embed) or "classifier" (logits too).
        label: the model's name in evaluate's table, from its artifact ("fine-tuned (scratch)").
    """

    name: str
    file: str
    folder: str
    kind: ModelKind
    label: Callable[[Artifact], str]


_STAGES: dict[str, StageInfo] = {}


def register_stage(info: StageInfo) -> StageInfo:
    """Adds (or, on a module reload, replaces) a stage; stage modules call it at import."""
    _STAGES[info.name] = info
    return info


def stage_info(name: str) -> StageInfo:
    """The registered stage called `name`.

    Raises:
        KeyError: no such stage is registered (import `labelfew.stages` to register them all).
    """
    if name not in _STAGES:
        raise KeyError(f"stage {name!r} is not registered; known: {', '.join(_STAGES) or 'none'}")
    return _STAGES[name]


def stages() -> tuple[StageInfo, ...]:
    """Every registered stage: backbones first, then classifiers, each in registration order."""
    return tuple(info for name in stage_names(("backbone", "classifier")) for info in [_STAGES[name]])


def stage_names(kinds: tuple[ModelKind, ...]) -> tuple[str, ...]:
    """The registered stages whose models are of `kinds`, in that order, then in registration order."""
    return tuple(info.name for kind in kinds for info in _STAGES.values() if info.kind == kind)


def model_label(artifact: Artifact) -> str:
    """How evaluate names the model (`StageInfo.label`)."""
    return stage_info(artifact.stage).label(artifact)


def either(names: tuple[str, ...] | list[str]) -> str:
    """Stage names for a message: `finetune`, `finetune or distill`, `pretrain, finetune or distill`."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def resolve_artifact(source: Path | None, stages: tuple[str, ...], runs_root: Path = RUNS_ROOT) -> Path:
    """Finds the artifact file a command should start from.

    `source` may be an artifact file, a stage folder (`runs/NAME/pretrain`), or a run folder
    (`runs/NAME`, which resolves to its newest completed stage among `stages`, in order of
    preference). Without `source`, the most recently modified run under `runs_root`.

    Raises:
        UserError: nothing suitable found, with what was looked for.
    """
    wanted = either(stages)
    if source is None:
        runs = (
            sorted(
                (
                    folder
                    for folder in runs_root.glob("*")
                    if folder.is_dir() and _stage_files(folder, stages)
                ),
                key=lambda folder: max(p.stat().st_mtime for p in _stage_files(folder, stages)),
            )
            if runs_root.is_dir()
            else []
        )
        if not runs:
            raise UserError(f"no {wanted} artifact under {runs_root}/; run that stage first or pass --from")
        source = runs[-1]
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise UserError(f"--from {source}: no such file or folder")
    candidates = _stage_files(source, stages)
    if not candidates:
        raise UserError(f"--from {source}: holds no completed {wanted} artifact")
    return candidates[0]


def _recorded_stage(folder: Path) -> str | None:
    """The stage a folder's run.json names; None when it names none (written before it did) or is unreadable."""
    try:
        record = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    stage = record.get("stage") if isinstance(record, dict) else None
    return stage if isinstance(stage, str) else None


def _holds(folder: Path, info: StageInfo) -> bool:
    """Whether a folder holds a completed model of a stage: its file, and a run.json naming the stage.

    A run.json that names no stage (an old one) falls back to the folder's name (`<folder>*`).
    """
    if not (folder / info.file).is_file() or not (folder / "run.json").is_file():
        return False
    stage = _recorded_stage(folder)
    return stage == info.name if stage is not None else folder.name.startswith(info.folder)


def _subfolders(folder: Path) -> list[Path]:
    """A run's folders, by name (hidden ones left out)."""
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))


def _stage_files(folder: Path, stages: tuple[str, ...]) -> list[Path]:
    """Completed artifacts in a run or stage folder, in `stages` preference order, newest first.

    A run's stage folders are found by what they hold, whatever their name (`finetune --out
    runs/x/ft-auto` is found as a finetune model of `runs/x`).
    """
    found: list[Path] = []
    subfolders = _subfolders(folder) if folder.is_dir() else []
    for stage in stages:
        info = stage_info(stage)
        direct = folder / info.file
        if direct.is_file() and (folder / "run.json").is_file() and _recorded_stage(folder) in (stage, None):
            found.append(direct)
        nested = [sub / info.file for sub in subfolders if _holds(sub, info)]
        found.extend(sorted(nested, key=lambda p: p.stat().st_mtime, reverse=True))
    return found


def _unusable(folder: Path, found: set[Path]) -> str | None:
    """Why a run's subfolder that looks like a stage gives no model (one line), or None."""
    if any(path.parent == folder for path in found):
        return None
    if (folder / "run.json").is_file():
        stage = _recorded_stage(folder)
        if stage in _STAGES and not (folder / _STAGES[stage].file).is_file():
            return f"{folder}: its run.json is a {stage} run's, but {_STAGES[stage].file} is missing; rerun {stage}"
        return None
    if any(folder.glob("*.safetensors")) or (folder / "checkpoints").is_dir():
        return f"{folder}: no run.json, so an unfinished (or still running) stage; rerun its command to finish it"
    return None


class RunModels(NamedTuple):
    """What `find_models` found.

    Attributes:
        models: the loaded models.
        run_folder: the run they belong to.
        unusable: one line per folder of the run that looks like a stage but gives no model.
    """

    models: list[Artifact]
    run_folder: Path
    unusable: list[str]


def find_models(source: Path | None, runs_root: Path = RUNS_ROOT) -> RunModels:
    """Every model `--from` names, the run folder they belong to, and the folders that could not be used.

    An artifact file or a stage folder gives its one model; a run folder (or no `source`: the
    newest run under `runs_root`) gives every completed model of every registered stage, whatever
    its folder is called, in the order of their folder names. A model whose stage is not
    registered is not a model here (pretrain's head file, embeddings). In a run folder, a model
    that cannot be loaded, or a stage folder without its run.json or model, is left out with a line
    in `unusable`.

    Raises:
        UserError: nothing found, with what was looked for.
    """
    everything = stage_names(("backbone", "classifier"))
    path = resolve_artifact(source, everything, runs_root)
    if source is not None and (Path(source).is_file() or path.parent == Path(source)):
        return RunModels([_model_file(load_artifact(path))], path.parent.parent, [])
    run_folder = path.parent.parent if source is None else Path(source)
    paths = sorted(set(_stage_files(run_folder, everything)), key=lambda p: p.parent.name)
    models, unusable = [], []
    for candidate in paths:
        try:
            models.append(load_artifact(candidate))
        except UserError as error:
            unusable.append(str(error))
    subfolders = _subfolders(run_folder)
    unusable += [line for sub in subfolders if (line := _unusable(sub, set(paths))) is not None]
    if not models:
        raise UserError(f"--from {run_folder}: no usable model ({'; '.join(unusable)})")
    return RunModels(models, run_folder, unusable)


def _model_file(artifact: Artifact) -> Artifact:
    """`artifact` when a registered stage wrote it; `--from` can name any file, and an embeddings
    file from `labelfew embed` has the metadata of one but no model (it failed later with a KeyError).

    Raises:
        UserError: the file holds no model, saying what to pass instead.
    """
    if artifact.stage in _STAGES:
        return artifact
    if artifact.stage == "embeddings":
        raise UserError(
            f"--from {artifact.path}: embeddings written by `labelfew embed`, not a model; pass --from the model "
            f"they came from ({artifact.metadata.get('source', 'its path is in the file')}) or its run folder"
        )
    raise UserError(
        f"--from {artifact.path}: a {artifact.stage} file, not a model; pass --from a "
        f"{either(stage_names(('backbone', 'classifier')))} artifact or a run folder"
    )


def resolve_model(source: Path | None, kinds: tuple[ModelKind, ...], runs_root: Path = RUNS_ROOT) -> Artifact:
    """The one model a command uses: `--from`'s file or stage folder, or the best of a run.

    In a run folder (or without `--from`) the kinds are tried in order, and within them a model
    trained from a self-supervised start before a `--scratch` baseline, newest first: a run
    holds both `finetune-<labels>/` and `finetune-scratch-<labels>/`, and the baseline is used
    only when it is the run's only model of that kind.

    A file is returned whatever it holds; the command checks that it can use it.

    Raises:
        UserError: nothing of `kinds` found.
    """
    path = resolve_artifact(source, stage_names(kinds), runs_root)
    picked_from_run = source is None or (Path(source).is_dir() and path.parent != Path(source))
    if not picked_from_run:
        return _model_file(load_artifact(path))
    newest_first: list[Path] = []
    for kind in kinds:
        newest_first = _stage_files(path.parent.parent, stage_names((kind,)))
        if newest_first:
            break
    newest_first.sort(key=lambda candidate: candidate.stat().st_mtime, reverse=True)
    baseline: Artifact | None = None
    for candidate in newest_first:
        artifact = load_artifact(candidate)
        if not artifact.spec.scratch:
            return artifact
        baseline = baseline or artifact
    assert baseline is not None  # resolve_artifact found at least `path`
    return baseline
