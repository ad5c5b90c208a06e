"""Artifacts: safetensors + run.json; round trips, timm-compatible keys, and refusal of anything wrong."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from labelfew import __version__, registry
from labelfew.artifacts import FORMAT_VERSION, load_artifact, save_tensors, write_run_json
from labelfew.config import PretrainConfig
from labelfew.errors import UserError
from labelfew.fileio import sha256_file
from labelfew.models import build_backbone, features_model, load_model
from labelfew.registry import resolve_artifact
from labelfew.spec import ModelSpec
from labelfew.stages import pretrain
from labelfew.use.inference import run_model


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """Real one-epoch pretrain runs of test_resnet on 8 noise images: {small_stem: backbone path}."""
    root = tmp_path_factory.mktemp("pretrained")
    rng = np.random.default_rng(0)
    for index in range(8):
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        (root / "images").mkdir(exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"{index}.png")
    runs = {}
    for small_stem in (True, False):
        config = PretrainConfig(
            data=root / "images",
            out=root / f"run-small-{small_stem}",
            arch="test_resnet",
            small_stem=small_stem,
            image_size=32,
            epochs=1,
            batch_size=8,
            workers=0,
            quiet=True,
        )
        runs[small_stem] = pretrain.run(config)
    return runs


def _copy_run(backbone: Path, destination: Path) -> Path:
    shutil.copytree(backbone.parent, destination)
    return destination / backbone.name


# --- round trip ------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    tensors = {
        "weight": torch.randn(4, 3, requires_grad=True),
        "transposed": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
        "steps": torch.tensor(7, dtype=torch.long),
        "half": torch.randn(5).to(torch.bfloat16),
    }
    path = tmp_path / "stage" / "backbone.safetensors"
    digest = save_tensors(path, tensors, {"stage": "pretrain", "arch": "test_resnet", "mean": "[0.5]"})
    assert digest == sha256_file(path)
    loaded = load_artifact(path, expected_stage="pretrain")
    assert set(loaded.tensors) == set(tensors)
    for key, value in tensors.items():
        assert loaded.tensors[key].dtype == value.dtype
        assert torch.equal(loaded.tensors[key], value.detach())
    assert loaded.metadata["format_version"] == FORMAT_VERSION
    assert loaded.metadata["labelfew_version"] == __version__
    assert (loaded.stage, loaded.arch, loaded.json_field("mean")) == ("pretrain", "test_resnet", [0.5])
    assert loaded.run_info() == {}


def test_library_metadata_cannot_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"w": torch.ones(1)}, {"stage": "pretrain", "arch": "a", "format_version": "99"})
    assert load_artifact(path).metadata["format_version"] == FORMAT_VERSION


def test_run_json_records_versions_and_is_read_back(tmp_path: Path) -> None:
    path = tmp_path / "backbone.safetensors"
    digest = save_tensors(path, {"w": torch.ones(2)}, {"stage": "pretrain", "arch": "a"})
    write_run_json(tmp_path, {"stage": "pretrain", "artifacts": {path.name: {"sha256": digest}}})
    info = load_artifact(path).run_info()
    assert info["labelfew_version"] == __version__ and info["torch_version"] == torch.__version__
    assert info["artifacts"][path.name]["sha256"] == digest


# --- the pretrain artifact is a plain timm state dict -------------------------------------------


def test_standard_stem_backbone_loads_strictly_into_timm(pretrained: dict[bool, Path]) -> None:
    artifact = load_artifact(pretrained[False], expected_stage="pretrain")
    assert artifact.arch == "test_resnet" and artifact.metadata["small_stem"] == "false"
    assert not any(key.startswith(("module.", "_orig_mod.", "backbone.")) for key in artifact.tensors)
    model = timm.create_model(artifact.arch, num_classes=0)
    model.load_state_dict(artifact.tensors, strict=True)
    assert int(artifact.metadata["num_features"]) == model.num_features
    assert torch.equal(model.state_dict()["conv1.0.weight"], artifact.tensors["conv1.0.weight"])
    assert artifact.run_info()["artifacts"]["backbone.safetensors"]["sha256"] == sha256_file(artifact.path)


def test_small_stem_backbone_loads_strictly_into_the_small_stem_model(pretrained: dict[bool, Path]) -> None:
    artifact = load_artifact(pretrained[True], expected_stage="pretrain")
    assert artifact.metadata["small_stem"] == "true"
    model = build_backbone(artifact.arch, small_stem=True)
    model.load_state_dict(artifact.tensors, strict=True)
    features = model.eval()(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, int(artifact.metadata["num_features"]))


def test_head_artifact_is_beside_the_backbone(pretrained: dict[bool, Path]) -> None:
    head = load_artifact(pretrained[True].parent / "head.safetensors", expected_stage="pretrain")
    assert head.metadata["part"] == "head"
    assert all(key.startswith("layers.") for key in head.tensors)


# --- refusals ----------------------------------------------------------------------------------


def test_wrong_stage_is_refused(pretrained: dict[bool, Path]) -> None:
    with pytest.raises(UserError, match="a pretrain artifact, but a finetune artifact is needed"):
        load_artifact(pretrained[False], expected_stage="finetune")


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"gone.safetensors: no such artifact file"):
        load_artifact(tmp_path / "gone.safetensors")


@pytest.mark.parametrize("keep", [0, 7, 8, 100, -1])
def test_truncated_file_is_refused(pretrained: dict[bool, Path], tmp_path: Path, keep: int) -> None:
    data = pretrained[False].read_bytes()
    path = tmp_path / "backbone.safetensors"
    path.write_bytes(data[:keep])
    with pytest.raises(UserError, match=r"backbone.safetensors: not a readable safetensors artifact"):
        load_artifact(path)


@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_are_refused(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "backbone.safetensors"
    path.write_bytes(np.random.default_rng(seed).bytes(4096))
    with pytest.raises(UserError, match="not a readable safetensors artifact"):
        load_artifact(path)


def test_sha256_differing_from_run_json_is_refused(pretrained: dict[bool, Path], tmp_path: Path) -> None:
    path = _copy_run(pretrained[False], tmp_path / "copy")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one weight changes; the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"corrupt \(its sha256 differs from run\.json\)"):
        load_artifact(path, expected_stage="pretrain")
    (path.parent / "run.json").unlink()
    assert load_artifact(path).stage == "pretrain"  # it was the recorded hash that refused it


def test_corrupt_run_json_is_refused(pretrained: dict[bool, Path], tmp_path: Path) -> None:
    path = _copy_run(pretrained[False], tmp_path / "copy")
    (path.parent / "run.json").write_text("{not json")
    with pytest.raises(UserError, match=r"corrupt run.json"):
        load_artifact(path)


def test_safetensors_without_labelfew_metadata_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(1)}, str(path))
    with pytest.raises(UserError, match="not a labelfew artifact"):
        load_artifact(path)


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "future.safetensors"
    metadata = {"stage": "pretrain", "arch": "a", "format_version": "2", "labelfew_version": "9.0"}
    save_file({"w": torch.ones(1)}, str(path), metadata=metadata)
    with pytest.raises(UserError, match=r"artifact format '2'.*reads format '1'.*9.0"):
        load_artifact(path)


class _LeavesMarker:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_renamed_safetensors_runs_no_code(tmp_path: Path, writer: str) -> None:
    live = tmp_path / "live-marker"
    pickle.loads(pickle.dumps(_LeavesMarker(live))).close()
    assert live.exists()  # the payload works when unpickled...
    marker = tmp_path / "marker"
    path = tmp_path / "backbone.safetensors"
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"conv1.weight": _LeavesMarker(marker)}))
    else:
        torch.save({"conv1.weight": _LeavesMarker(marker)}, path)
    with pytest.raises(UserError, match="not a readable safetensors artifact"):
        load_artifact(path, expected_stage="pretrain")
    assert not marker.exists()  # ...and loading an artifact never unpickles


# --- resolve_artifact -----------------------------------------------------------------------------


def _stage(folder: Path, stage: str, mtime: float, complete: bool = True) -> Path:
    name = {"pretrain": "backbone.safetensors", "finetune": "model.safetensors"}[stage]
    folder.mkdir(parents=True, exist_ok=True)
    artifact = folder / name
    artifact.write_bytes(b"weights")
    os.utime(artifact, (mtime, mtime))
    if complete:
        (folder / "run.json").write_text("{}")
    return artifact


def test_resolve_an_artifact_file_as_given(tmp_path: Path) -> None:
    artifact = _stage(tmp_path / "anywhere", "pretrain", 1000, complete=False)
    assert resolve_artifact(artifact, ("pretrain",)) == artifact


def test_resolve_a_stage_folder(tmp_path: Path) -> None:
    artifact = _stage(tmp_path / "run" / "pretrain", "pretrain", 1000)
    assert resolve_artifact(tmp_path / "run" / "pretrain", ("pretrain",)) == artifact


def test_resolve_a_run_folder_by_stage_preference_then_newest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    backbone = _stage(run / "pretrain", "pretrain", 3000)
    _stage(run / "finetune-1pct", "finetune", 1000)
    newest = _stage(run / "finetune-10pct", "finetune", 2000)
    _stage(run / "finetune-unfinished", "finetune", 4000, complete=False)
    assert resolve_artifact(run, ("finetune", "pretrain")) == newest
    assert resolve_artifact(run, ("pretrain", "finetune")) == backbone
    assert resolve_artifact(run, ("pretrain",)) == backbone


def test_resolve_the_latest_run_under_the_runs_root(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _stage(runs / "old" / "pretrain", "pretrain", 1000)
    latest = _stage(runs / "new" / "pretrain", "pretrain", 5000)
    _stage(runs / "newer-but-unfinished" / "pretrain", "pretrain", 9000, complete=False)
    _stage(runs / "only-finetune" / "finetune", "finetune", 9000)
    (runs / "stray-file.txt").write_text("not a run")
    assert resolve_artifact(None, ("pretrain",), runs_root=runs) == latest


def test_resolve_with_nothing_found(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match=r"no pretrain artifact under .*runs/; run that stage first or pass --from"
    ):
        resolve_artifact(None, ("pretrain",), runs_root=tmp_path / "runs")
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    with pytest.raises(UserError, match="no finetune or pretrain artifact under"):
        resolve_artifact(None, ("finetune", "pretrain"), runs_root=tmp_path / "runs")
    with pytest.raises(UserError, match="holds no completed pretrain artifact"):
        resolve_artifact(tmp_path / "runs" / "empty", ("pretrain",))
    with pytest.raises(UserError, match="no such file or folder"):
        resolve_artifact(tmp_path / "absent", ("pretrain",))


# --- the stage registry, find_models and resolve_model ------------------------------------------


def _model(folder: Path, stage: str, mtime: float, scratch: bool = False) -> Path:
    """A small but real artifact of `stage` (a registered name) with its run.json."""
    info = registry.stage_info(stage)
    spec = ModelSpec("test_resnet", 32, True, 96)
    if info.kind == "classifier":
        spec = dataclasses.replace(spec, class_names=("a", "b"), scratch=scratch)
    path = folder / info.file
    digest = save_tensors(path, {"w": torch.ones(2)}, {"stage": stage, **spec.to_metadata()})
    write_run_json(folder, {"stage": stage, "artifacts": {info.file: {"sha256": digest}}})
    os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def distill(monkeypatch: pytest.MonkeyPatch) -> registry.StageInfo:
    """A stage that exists only in this test: registering it is all a new stage module does."""
    info = registry.StageInfo(
        "distill", file="model.safetensors", folder="distill", kind="classifier", label=lambda _: "distilled"
    )
    monkeypatch.setitem(registry._STAGES, "distill", info)
    return info


def test_the_stages_register_themselves() -> None:
    names = [info.name for info in registry.stages()]
    assert names[:2] == ["pretrain", "finetune"]
    assert registry.stage_info("pretrain").file == "backbone.safetensors"
    assert registry.stage_info("finetune").kind == "classifier"
    with pytest.raises(KeyError, match="not registered"):
        registry.stage_info("nonsense")


def test_find_models_lists_every_model_of_a_run_through_the_registry(
    tmp_path: Path, distill: registry.StageInfo
) -> None:
    run = tmp_path / "run"
    backbone = _model(run / "pretrain", "pretrain", 1000)
    head = run / "pretrain" / "head.safetensors"
    save_tensors(head, {"w": torch.ones(1)}, {"stage": "pretrain", "arch": "test_resnet", "part": "head"})
    tuned = _model(run / "finetune-10pc", "finetune", 2000)
    scratch = _model(run / "finetune-scratch-10pc", "finetune", 3000, scratch=True)
    distilled = _model(run / "distill-10pc", "distill", 4000)
    (run / "evaluate").mkdir()
    (run / "evaluate" / "report.json").write_text("{}")
    models, folder, unusable = registry.find_models(run)
    assert unusable == []
    assert folder == run
    assert [model.path for model in models] == [distilled, tuned, scratch, backbone]
    assert [registry.model_label(model) for model in models] == [
        "distilled", "fine-tuned", "fine-tuned (scratch)", "pretrain",
    ]  # fmt: skip
    assert [model.path for model in registry.find_models(run / "finetune-10pc")[0]] == [tuned]
    assert [model.path for model in registry.find_models(scratch)[0]] == [scratch]
    assert registry.find_models(None, runs_root=tmp_path)[1] == run


def test_find_models_finds_a_model_by_what_its_folder_holds_and_names_unusable_folders(
    tmp_path: Path, distill: registry.StageInfo
) -> None:
    """`finetune --out runs/x/ft-auto` was left out (found by the `finetune*` prefix), without a word."""
    run = tmp_path / "run"
    backbone = _model(run / "pretrain", "pretrain", 1000)
    auto = _model(run / "ft-auto", "finetune", 2000)
    student = _model(run / "small-student", "distill", 3000)
    (run / "finetune-unfinished" / "checkpoints").mkdir(parents=True)
    _model(run / "finetune-lost", "finetune", 4000).unlink()
    (run / "notes").mkdir()
    (run / "notes" / "todo.txt").write_text("not a stage")
    models, _, unusable = registry.find_models(run)
    assert [model.path for model in models] == [auto, backbone, student]
    assert [model.stage for model in models] == ["finetune", "pretrain", "distill"]
    assert len(unusable) == 2
    assert "finetune-lost" in unusable[0] and "model.safetensors is missing" in unusable[0]
    assert "finetune-unfinished" in unusable[1] and "no run.json" in unusable[1]
    assert registry.resolve_model(run, ("classifier",)).path == student
    assert resolve_artifact(run, ("finetune",)) == auto


def test_find_models_leaves_out_a_corrupt_model_of_a_run_with_a_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    backbone = _model(run / "pretrain", "pretrain", 1000)
    broken = _model(run / "finetune", "finetune", 2000)
    broken.write_bytes(b"truncated")
    models, _, unusable = registry.find_models(run)
    assert [model.path for model in models] == [backbone]
    assert len(unusable) == 1 and "corrupt" in unusable[0]


def test_resolve_model_prefers_kind_then_a_self_supervised_start_then_newest(
    tmp_path: Path, distill: registry.StageInfo
) -> None:
    run = tmp_path / "run"
    backbone = _model(run / "pretrain", "pretrain", 1000)
    tuned = _model(run / "finetune-10pc", "finetune", 2000)
    scratch = _model(run / "finetune-scratch-10pc", "finetune", 3000, scratch=True)
    assert registry.resolve_model(run, ("classifier",)).path == tuned  # not the newer baseline
    assert registry.resolve_model(run, ("backbone", "classifier")).path == backbone
    assert registry.resolve_model(run / "finetune-scratch-10pc", ("classifier",)).path == scratch
    distilled = _model(run / "distill-10pc", "distill", 4000)
    assert registry.resolve_model(run, ("classifier",)).path == distilled
    assert registry.resolve_model(backbone, ("classifier",)).path == backbone  # a file, as given
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no completed finetune or distill artifact"):
        registry.resolve_model(tmp_path / "empty", ("classifier",))


# --- an artifact written by labelfew before this layout still loads and predicts the same -------

FIXTURES = Path(__file__).parent / "fixtures"


def test_the_v1_fixture_loads_and_predicts_what_it_predicted(monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/fixtures/v1_run was written by the code before ModelSpec (tests/fixtures/write_v1_run.py)."""
    monkeypatch.setattr("labelfew.use.inference.device", lambda: torch.device("cpu"))
    expected = json.loads((FIXTURES / "v1_expected.json").read_text(encoding="utf-8"))
    paths = [FIXTURES / "v1_images" / name for name in expected["paths"]]
    models = registry.find_models(FIXTURES / "v1_run").models
    assert [model.stage for model in models] == ["finetune", "pretrain"]
    tuned, pretrained = models
    logits = run_model(load_model(tuned), paths, tuned.spec, workers=0)
    features = run_model(features_model(load_model(pretrained)), paths, pretrained.spec, workers=0)
    assert logits.kept == features.kept == list(range(len(paths)))
    torch.testing.assert_close(logits.values, torch.tensor(expected["logits"]), rtol=0, atol=1e-4)
    torch.testing.assert_close(features.values, torch.tensor(expected["features"]), rtol=0, atol=1e-4)
    classes = tuned.spec.class_names
    assert classes is not None
    assert [classes[index] for index in logits.values.argmax(dim=1).tolist()] == expected["predicted"]
    assert registry.resolve_model(FIXTURES / "v1_run", ("classifier",)).path == tuned.path
    assert registry.model_label(tuned) == "fine-tuned"
