"""Distillation stage: the step against the plain loss, the teacher left untouched (trap 11), the
artifact as every command reads it, and bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from conftest import TinyRun, copy_tiny_run
from safetensors.torch import save_file

from labelfew import engine
from labelfew.artifacts import load_artifact
from labelfew.config import DistillConfig, EvaluateConfig, FinetuneConfig
from labelfew.data.batches import Batch, LabelledPairBatch
from labelfew.engine.checkpoint import check_fingerprint
from labelfew.errors import UserError
from labelfew.fileio import sha256_file
from labelfew.losses import distillation_loss
from labelfew.models import load_model
from labelfew.optim import parameter_groups
from labelfew.registry import find_models, model_label
from labelfew.stages import distill, evaluate, finetune
from labelfew.views.finetune import CropFlipViews

LABELFEW = str(Path(sys.executable).parent / "labelfew")


@pytest.fixture(scope="module")
def tiny(tiny_pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """The shared 1-epoch pretrain on 60 digits of 3 classes, fine-tuned on its 5 labels of each."""
    tiny = copy_tiny_run(tiny_pretrained, tmp_path_factory.mktemp("distill"))
    finetune.run(FinetuneConfig(labels=tiny["labels"], source=tiny["run"], out=tiny["run"] / "finetune-labels",
                                epochs=2, batch_size=15, lr=0.05, workers=0, quiet=True))  # fmt: skip
    return tiny


def _config(tiny: TinyRun, **options: Any) -> DistillConfig:
    values: dict[str, Any] = {"unlabeled": tiny["unlabeled"], "source": tiny["run"], "epochs": 1, "batch_size": 20,
                              "workers": 0, "quiet": True, **options}  # fmt: skip
    return DistillConfig(**values)


def test_the_step_is_the_distillation_loss_of_the_teacher_and_student_on_the_same_views(
    tiny: TinyRun,
) -> None:
    teacher_artifact = distill.find_teacher(tiny["run"])
    teacher = load_model(teacher_artifact).eval()
    student = distill.build_student(
        distill.student_start(_config(tiny), teacher_artifact), teacher_artifact.spec
    )
    # not the zero start: the loss must depend on the student
    torch.nn.init.normal_(student.classifier.weight)
    views = CropFlipViews(32)
    images = torch.randint(0, 256, (6, 3, 40, 36), dtype=torch.uint8)
    batch = LabelledPairBatch(images, torch.tensor([[40, 36]] * 6), torch.arange(6), seed=7)
    accelerator = engine.make_accelerator("no", seed=0)
    agreement = distill.Agreement(torch.device("cpu"), has_labels=False)
    step = distill.distillation_step(teacher, views, 2.0, 0.0, accelerator, agreement)
    loss, count = step(student, batch)
    same_views = views(images, batch.sizes, Batch(images, batch.sizes, batch.indices, seed=7).generator())
    with torch.no_grad():
        expected = 2.0**2 * distillation_loss(student(same_views), teacher(same_views), temperature=2.0)
    assert count == 6 and torch.allclose(loss, expected)
    loss.backward()
    assert all(param.grad is None for param in teacher.parameters())  # no gradient reaches the teacher
    assert set(agreement.epoch_metrics(accelerator)) == {"agreement", "teacher_confidence"}


@pytest.fixture(scope="module")
def distilled(tiny: TinyRun) -> Path:
    return distill.run(_config(tiny, epochs=2))


def test_the_teacher_stays_in_eval_mode_and_unchanged(tiny: TinyRun, monkeypatch: pytest.MonkeyPatch) -> None:
    """DESIGN.md trap 11: in train mode its BN running statistics would drift with the student's batches."""
    teacher_artifact = distill.find_teacher(tiny["run"])
    before = {key: value.clone() for key, value in teacher_artifact.tensors.items()}
    seen: list[torch.nn.Module] = []
    original = distill.distillation_step

    def spy(teacher: torch.nn.Module, *args: Any) -> Any:
        seen.append(teacher)
        inner = original(teacher, *args)

        def step(model: torch.nn.Module, batch: Batch) -> Any:
            assert not teacher.training and model.training
            return inner(model, batch)

        return step

    monkeypatch.setattr(distill, "distillation_step", spy)
    distill.run(_config(tiny, out=tiny["work"] / "spy"))
    (teacher,) = seen
    state = teacher.state_dict()
    assert any("running_mean" in key for key in state)
    for key, value in before.items():
        assert torch.equal(state[key], value), key  # weights and BN buffers (running mean, var, count)
    assert all(not param.requires_grad for param in teacher.parameters())


def test_the_artifact_loads_predicts_and_is_evaluated_as_distilled(tiny: TinyRun, distilled: Path) -> None:
    assert distilled == tiny["run"] / "distill-labels" / "model.safetensors"
    artifact = load_artifact(distilled, "distill")
    teacher = distill.find_teacher(tiny["run"])
    assert artifact.spec.class_names == teacher.spec.class_names and model_label(artifact) == "distilled"
    model = load_model(artifact).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    record = json.loads((distilled.parent / "run.json").read_text())
    assert record["parent"]["path"] == str(teacher.path.resolve()) and record["student"]["start"] == "self"
    assert record["config"]["temperature"] == 0.1  # auto: SimCLRv2's self-distillation temperature
    assert record["labels"]["content_sha256"] == teacher.run_info()["labels"]["content_sha256"]
    # the unlabeled folder is a tree of the teacher's classes: its accuracy is logged
    assert len(record["metrics"]["teacher_top1"]) == 2
    assert {artifact.path for artifact in find_models(tiny["run"])[0]} >= {distilled, teacher.path}
    result = evaluate.run(EvaluateConfig(test=tiny["test"], source=tiny["run"], bank=tiny["labels"],
                                         out=tiny["work"] / "evaluate", workers=0, quiet=True))  # fmt: skip
    names = [row["method"] for row in result["rows"]]
    assert "distilled" in names and "fine-tuned" in names


def test_a_smaller_student_from_random_init_and_the_labelled_loss(tiny: TinyRun, distilled: Path) -> None:
    out = distill.run(_config(tiny, arch="resnet10t", labels=tiny["labels"], alpha=1.0))
    assert out.parent.name == "distill-labels-resnet10t"
    artifact = load_artifact(out, "distill")
    assert artifact.arch == "resnet10t" and model_label(artifact) == "distilled (resnet10t, random init)"
    record = json.loads((out.parent / "run.json").read_text())
    assert record["distill_labels"]["images"] == 15
    assert record["config"]["temperature"] == 1.0  # auto: SimCLRv2's big-to-small temperature
    assert distill.find_teacher(tiny["run"]).stage == "finetune"  # a distilled model is never a teacher


def _bad(tiny: TinyRun, *arguments: str) -> str:
    result = subprocess.run([LABELFEW, "distill", "--workers", "0", "--quiet", *arguments], cwd=tiny["work"],
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bad_input_exits_2_with_one_line(tiny: TinyRun) -> None:
    only_pretrain = tiny["work"] / "only-pretrain"
    shutil.copytree(tiny["run"] / "pretrain", only_pretrain / "pretrain")
    empty = tiny["work"] / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    unlabeled = str(tiny["unlabeled"])
    assert "holds no completed finetune artifact" in _bad(
        tiny, "--unlabeled", unlabeled, "--from", str(only_pretrain)
    )
    assert "no image files" in _bad(tiny, "--unlabeled", str(empty), "--from", str(tiny["run"]))
    assert "not a timm model" in _bad(
        tiny, "--unlabeled", unlabeled, "--from", str(tiny["run"]), "--arch", "resnet81"
    )
    with pytest.raises(UserError, match="--labels and --alpha go together"):
        distill.run(_config(tiny, alpha=0.5))


def test_auto_temperature_is_simclr_v2s_and_a_given_one_is_kept(tiny: TinyRun) -> None:
    """SimCLRv2 (section 3): T = 0.1 for self-distillation, 1.0 from a big teacher to a small student."""
    teacher = distill.find_teacher(tiny["run"])
    same = distill.student_start(_config(tiny), teacher)
    other = distill.student_start(_config(tiny, arch="resnet10t"), teacher)
    assert distill.distill_temperature(_config(tiny), teacher, same) == 0.1
    assert distill.distill_temperature(_config(tiny), teacher, other) == 1.0
    assert distill.distill_temperature(_config(tiny, temperature=0.5), teacher, same) == 0.5


def _with_small_stem(artifact: Any) -> Any:
    """The same teacher as if it had been trained with the small-image stem (as at <= 64 px)."""
    return dataclasses.replace(artifact, metadata={**artifact.metadata, "small_stem": "true"})


def test_a_non_resnet_student_of_a_small_stem_teacher_needs_no_small_stem(tiny: TinyRun) -> None:
    """The message names `--no-small-stem`, which distill must then have (issue 22, item 11)."""
    teacher = _with_small_stem(distill.find_teacher(tiny["run"]))
    with pytest.raises(UserError, match="pass --no-small-stem"):
        distill.student_start(_config(tiny, arch="test_efficientnet"), teacher)
    student = distill.student_start(_config(tiny, arch="test_efficientnet", small_stem=False), teacher)
    assert student.kind == "random" and not student.small_stem
    model = distill.build_student(student, teacher.spec)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert distill.student_start(_config(tiny, arch="resnet10t"), teacher).small_stem  # the teacher's stem


def test_small_stem_flags_exist_and_refuse_to_change_a_pretrained_start(tiny: TinyRun) -> None:
    line = _bad(tiny, "--unlabeled", str(tiny["unlabeled"]), "--from", str(tiny["run"]), "--small-stem")
    assert "--small-stem" in line and "leave the flag out" in line
    student = distill.student_start(_config(tiny, small_stem=False), distill.find_teacher(tiny["run"]))
    assert student.kind == "self" and not student.small_stem  # the pretrained backbone's own stem


def test_t_squared_keeps_the_unadapted_layers_gradients_at_their_t_1_size(tiny: TinyRun) -> None:
    """LARS steps the classifier, biases and BN weights by lr × gradient: at T = 0.1 the plain eq. 2 loss
    gives them many times T = 1's gradient, the step's T² factor brings it back under T = 1's."""
    teacher_artifact = distill.find_teacher(tiny["run"])
    teacher = load_model(teacher_artifact).eval()
    teacher.classifier.weight.data *= 20  # a confident teacher, as a fine-tuned one becomes
    images = torch.randint(0, 256, (16, 3, 40, 36), dtype=torch.uint8)
    batch = LabelledPairBatch(images, torch.tensor([[40, 36]] * 16), torch.arange(16), seed=3)
    accelerator = engine.make_accelerator("no", seed=0)

    def unadapted_gradient_norm(temperature: float, plain: bool = False) -> float:
        student = distill.build_student(
            distill.student_start(_config(tiny), teacher_artifact), teacher_artifact.spec
        )
        agreement = distill.Agreement(torch.device("cpu"), has_labels=False)
        loss, _ = distill.distillation_step(
            teacher, CropFlipViews(32), temperature, 0.0, accelerator, agreement
        )(student, batch)
        (loss / (temperature**2 if plain else 1.0)).backward()
        groups = parameter_groups(student, 1e-6, exclude=[student.classifier])
        unadapted = next(group for group in groups if not group["lars_adapt"])["params"]
        return float(torch.sqrt(sum((param.grad**2).sum() for param in unadapted)))

    at_one = unadapted_gradient_norm(1.0)
    assert unadapted_gradient_norm(0.1, plain=True) > 5 * at_one  # why the factor is there
    assert unadapted_gradient_norm(0.1) < at_one


# --- --init students, --restart's data, resume lists, teachers found by what folders hold ------


def test_a_student_from_init_starts_from_exactly_its_tensors_and_records_them(
    tiny: TinyRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(9)
    state = timm.create_model("test_resnet", num_classes=5).state_dict()
    init = tiny["work"] / "student-init" / "w.safetensors"
    init.parent.mkdir()
    save_file(
        {key: value.contiguous() for key, value in state.items()}, str(init), metadata={"arch": "test_resnet"}
    )
    seen: dict[str, torch.Tensor] = {}
    original = distill.distillation_step

    def spy(*args: Any) -> Any:
        inner = original(*args)

        def step(model: torch.nn.Module, batch: Batch) -> Any:
            if not seen:
                backbone = getattr(model, "module", model).backbone
                seen.update({key: value.clone() for key, value in backbone.state_dict().items()})
            return inner(model, batch)

        return step

    monkeypatch.setattr(distill, "distillation_step", spy)
    out = distill.run(_config(tiny, init=str(init)))
    assert seen and set(seen) == {key for key in state if not key.startswith("fc.")}
    for key, value in seen.items():
        assert torch.equal(value, state[key]), key
    assert out.parent.name == "distill-labels-test_resnet-init-w.safetensors"  # not the self student's folder
    artifact = load_artifact(out, "distill")
    assert model_label(artifact) == "distilled (test_resnet, init w.safetensors)"
    assert (artifact.spec.init, artifact.spec.init_sha256) == (str(init), sha256_file(init))
    record = json.loads((out.parent / "run.json").read_text())
    assert record["student"]["start"] == "init" and record["student"]["init"]["sha256"] == sha256_file(init)
    with pytest.raises(UserError, match="not with --from-pretrain"):
        _config(tiny, init=str(init), from_pretrain=tiny["run"])
    with pytest.raises(UserError, match=r"weights of test_resnet, but --arch resnet10t"):
        distill.student_start(
            _config(tiny, init=str(init), arch="resnet10t"), distill.find_teacher(tiny["run"])
        )


def test_restart_deletes_only_a_run_of_the_same_unlabeled_folder(tiny: TinyRun, distilled: Path) -> None:
    """Issue 22: distill's `--restart` was unchecked; the unlabeled folder is the run's data."""
    with pytest.raises(UserError, match=r"holds a run made from .*unlabeled, not .*labels"):
        distill.run(_config(tiny, unlabeled=tiny["labels"], out=distilled.parent, restart=True))
    assert distilled.is_file()


def test_a_refused_resume_names_the_images_that_changed(tiny: TinyRun, tmp_path: Path) -> None:
    teacher = distill.find_teacher(tiny["run"])
    config = _config(tiny)
    student = distill.student_start(config, teacher)
    paths = sorted(tiny["unlabeled"].rglob("*.png"))
    saved = distill.fingerprint(config, teacher, student, paths, None, "device")
    current = distill.fingerprint(config, teacher, student, paths[1:], None, "device")
    gone = str(paths[0].relative_to(tiny["unlabeled"]))
    with pytest.raises(UserError, match=rf"image_list_sha256 .*1 file\(s\) vanished: {gone}"):
        check_fingerprint(tmp_path / "checkpoints" / "step-1", saved, current)


def test_the_teacher_is_found_by_what_its_folder_holds(tiny: TinyRun, tmp_path: Path) -> None:
    """`finetune --out runs/x/ft-auto` is the teacher even beside a newer `--scratch` baseline."""
    run = tmp_path / "run"
    shutil.copytree(tiny["run"] / "pretrain", run / "pretrain")
    shutil.copytree(tiny["run"] / "finetune-labels", run / "ft-auto")
    finetune.run(FinetuneConfig(labels=tiny["labels"], source=run, scratch=True, out=run / "finetune-scratch-labels",
                                epochs=1, batch_size=15, lr=0.05, workers=0, quiet=True))  # fmt: skip
    teacher = distill.find_teacher(run)
    assert teacher.path == run / "ft-auto" / "model.safetensors"
    student = distill.student_start(_config(tiny), teacher)
    assert distill.default_out(teacher, student) == run / "distill-ft-auto"
