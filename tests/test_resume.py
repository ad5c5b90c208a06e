"""Kill -9 a run in the middle of an epoch, rerun the same command: the same model, bit for bit.

On the CPU with no loader workers every step is deterministic, and the views come from a
generator seeded per step by (seed, epoch, step, process) (`labelfew.data.batches.EpochOrder`),
whichever image source delivers the batches (the in-memory store or the streaming workers), so a
resumed run must reproduce the uninterrupted run's tensors exactly, not just closely.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import CopyPerClass
from safetensors.torch import load_file

LABELFEW = str(Path(sys.executable).parent / "labelfew")
IMAGES, BATCH = 416, 32  # 13 steps per epoch: checkpoints at steps 10 and 20 fall inside epochs 1 and 2
EVERY_LOG_POINT = "1e-6"  # minutes between checkpoints: one at every log point (every 10 steps)
LR = "2"  # a fine-tuning lr too high to improve on its first epoch (val 0.1, 0.1, 0.1, 0.04): the best-epoch test


def _command(stage: str, data: Path, out: Path, *extra: str) -> list[str]:
    common = [
        "--epochs",
        "2",
        "--batch-size",
        str(BATCH),
        "--workers",
        "0",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]
    if stage == "pretrain":
        return [LABELFEW, "pretrain", str(data), "--arch", "test_resnet", "--no-small-stem", *common]
    return [LABELFEW, "finetune", "--labels", str(data), *common]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _kill_after_checkpoint(command: list[str], checkpoints: Path, step: int, cwd: Path, kill: int) -> int:
    """Starts `command`, waits for the checkpoint of `step`, sends `kill`; returns the exit code."""
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (checkpoints / f"step-{step:08d}" / "state.pt").is_file():
        assert process.poll() is None, (
            f"finished before the kill: {process.stdout.read() if process.stdout else ''}"
        )
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    process.send_signal(kill)
    return process.wait(timeout=120)


def _assert_same_tensors(first: Path, second: Path) -> None:
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _whole_then_killed_and_resumed(
    command: Callable[[Path], list[str]], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """Runs `command(out)` whole, then again SIGKILLed after step 20's checkpoint and resumed; the two
    give the same model and the same log (no step logged twice). Returns the resumed run."""
    _run(command(tmp_path / "whole"), tmp_path)
    _kill_after_checkpoint(
        command(tmp_path / "killed"), tmp_path / "killed" / "checkpoints", 20, tmp_path, signal.SIGKILL
    )
    resumed = _run(command(tmp_path / "killed"), tmp_path)
    _assert_same_tensors(tmp_path / "whole" / "model.safetensors", tmp_path / "killed" / "model.safetensors")
    assert (tmp_path / "killed" / "log.jsonl").read_text() == (tmp_path / "whole" / "log.jsonl").read_text()
    return resumed


@pytest.fixture(scope="module")
def small_digits(digits_folder: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first IMAGES training digits (every class), as a class-per-folder tree."""
    root = tmp_path_factory.mktemp("small-digits")
    for path in sorted(digits_folder[0].rglob("*.png"))[:: 1347 // IMAGES][:IMAGES]:
        (root / path.parent.name).mkdir(exist_ok=True)
        shutil.copy(path, root / path.parent.name / path.name)
    return root


@pytest.fixture(scope="module")
def reference(small_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted pretrain and finetune (2 epochs each)."""
    train = small_digits
    work = tmp_path_factory.mktemp("reference")
    _run(_command("pretrain", train, work / "run"), work)  # auto: the device path for 416 digits
    _run(_command("pretrain", train, work / "run-workers", "--augment-on", "workers"), work)
    _run(_command("finetune", train, work / "run" / "finetune", "--from", str(work / "run")), work)
    return work


@pytest.mark.parametrize("place", ["device", "workers"])
def test_pretrain_killed_mid_epoch_resumes_to_the_same_model(small_digits: Path, reference: Path, tmp_path: Path, place: str) -> None:  # fmt: skip
    train = small_digits
    command = _command(
        "pretrain", train, tmp_path / "run", "--checkpoint-every", EVERY_LOG_POINT, "--augment-on", place
    )
    _kill_after_checkpoint(
        command, tmp_path / "run" / "pretrain" / "checkpoints", 20, tmp_path, signal.SIGKILL
    )
    assert not (tmp_path / "run" / "pretrain" / "backbone.safetensors").exists()
    resumed = _run(command, tmp_path)
    assert "resuming pretrain" in resumed.stderr and "epoch 2" in resumed.stderr
    expected = reference / ("run" if place == "device" else "run-workers") / "pretrain"
    assert json.loads((expected / "run.json").read_text())["config"]["augment_on"] == place
    for name in ("backbone.safetensors", "head.safetensors"):
        _assert_same_tensors(expected / name, tmp_path / "run" / "pretrain" / name)
    reference_log = (expected / "log.jsonl").read_text()
    assert (tmp_path / "run" / "pretrain" / "log.jsonl").read_text() == reference_log  # no step logged twice
    assert len(list((tmp_path / "run" / "pretrain" / "checkpoints").iterdir())) == 2  # the last two are kept


def _every_other_digit(small_digits: Path, folder: Path) -> Path:
    """208 digits: 13 steps of 16 per epoch, so the kill still lands inside epoch 2, at half the cost."""
    for path in sorted(small_digits.rglob("*.png"))[::2]:
        (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.parent.name / path.name)
    return folder


def test_pretrain_with_a_key_queue_killed_mid_epoch_resumes_to_the_same_model_and_queue(
    small_digits: Path, tmp_path: Path
) -> None:
    """`--queue` (issue 27): the momentum encoder, the queue and its pointer come back from the
    checkpoint. 100 keys: not a multiple of the 32 keys a step makes, so the pointer wraps mid-step."""
    half = _every_other_digit(small_digits, tmp_path / "digits")

    def command(out: Path) -> list[str]:
        return _command("pretrain", half, out, "--batch-size", "16", "--queue", "100", "--key-momentum", "0.9",
                        "--checkpoint-every", EVERY_LOG_POINT)  # fmt: skip

    _run(command(tmp_path / "whole"), tmp_path)
    checkpoints = tmp_path / "killed" / "pretrain" / "checkpoints"
    _kill_after_checkpoint(command(tmp_path / "killed"), checkpoints, 20, tmp_path, signal.SIGKILL)
    resumed = _run(command(tmp_path / "killed"), tmp_path)
    assert "resuming pretrain" in resumed.stderr and "epoch 2" in resumed.stderr
    whole, killed = tmp_path / "whole" / "pretrain", tmp_path / "killed" / "pretrain"
    for name in ("backbone.safetensors", "head.safetensors", "checkpoints/step-00000026/ema.safetensors"):
        _assert_same_tensors(whole / name, killed / name)
    assert (killed / "log.jsonl").read_text() == (whole / "log.jsonl").read_text()
    queue = load_file(str(killed / "checkpoints" / "step-00000026" / "ema.safetensors"))
    assert int(queue["_queue.pointer"]) == 26 * 32 % 100 and int(queue["_queue.filled"]) == 100
    saved = json.loads((checkpoints / "step-00000026" / "fingerprint.json").read_text())
    assert (saved["queue"], saved["key_momentum"], saved["key_momentum_ramp"]) == (100, 0.9, False)
    changed = subprocess.run([*command(tmp_path / "killed"), "--queue", "64"], capture_output=True, text=True,
                             cwd=tmp_path, timeout=300, check=False)  # fmt: skip
    assert changed.returncode == 2 and "queue 100 → 64" in changed.stderr


def test_pretrain_from_an_init_killed_mid_epoch_resumes_to_the_same_model(small_digits: Path, tmp_path: Path) -> None:  # fmt: skip
    """`--init` (issue 24): the resumed run takes the checkpoint's weights, not the init's again."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)  # weights that no run's own seed would draw
    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(tmp_path / "init.safetensors"),
              metadata={"architecture": "test_resnet"})  # fmt: skip
    half = _every_other_digit(small_digits, tmp_path / "digits")

    def command(out: Path) -> list[str]:
        return _command("pretrain", half, out, "--batch-size", "16", "--init", str(tmp_path / "init.safetensors"),
                        "--checkpoint-every", EVERY_LOG_POINT)  # fmt: skip

    _run(command(tmp_path / "whole"), tmp_path)
    checkpoints = tmp_path / "killed" / "pretrain" / "checkpoints"
    _kill_after_checkpoint(command(tmp_path / "killed"), checkpoints, 20, tmp_path, signal.SIGKILL)
    resumed = _run(command(tmp_path / "killed"), tmp_path)
    assert "resuming pretrain" in resumed.stderr and "epoch 2" in resumed.stderr
    whole, killed = tmp_path / "whole" / "pretrain", tmp_path / "killed" / "pretrain"
    for name in ("backbone.safetensors", "head.safetensors"):
        _assert_same_tensors(whole / name, killed / name)
    assert (killed / "log.jsonl").read_text() == (whole / "log.jsonl").read_text()
    record = json.loads((killed / "run.json").read_text())
    assert record["init"]["sha256"] == json.loads((whole / "run.json").read_text())["init"]["sha256"]


def test_finetune_killed_mid_epoch_resumes_to_the_same_model(small_digits: Path, reference: Path, tmp_path: Path) -> None:  # fmt: skip
    train = small_digits
    out = tmp_path / "finetune"
    command = _command(
        "finetune", train, out, "--from", str(reference / "run"), "--checkpoint-every", EVERY_LOG_POINT
    )
    _kill_after_checkpoint(command, out / "checkpoints", 20, tmp_path, signal.SIGKILL)
    _run(command, tmp_path)
    _assert_same_tensors(reference / "run" / "finetune" / "model.safetensors", out / "model.safetensors")


def test_sigterm_writes_a_checkpoint_and_exits_143(small_digits: Path, tmp_path: Path) -> None:
    """The signal path itself writes the checkpoint: SIGTERM arrives once step 10 is logged, with no
    checkpoint on disk, the epoch's end 42 steps away and the periodic one 10 minutes away."""
    stage = tmp_path / "run" / "pretrain"
    # One epoch of 52 steps (click keeps the last of a repeated option); checkpoints every 10 minutes.
    command = _command("pretrain", small_digits, tmp_path / "run", "--batch-size", "8", "--epochs", "1")
    process = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 300
    while not ((stage / "log.jsonl").is_file() and (stage / "log.jsonl").read_text().endswith("\n")):
        assert process.poll() is None and time.monotonic() < deadline, "step 10 was never logged"
        time.sleep(0.01)
    assert not list(stage.glob("checkpoints/*/state.pt"))  # nothing on disk yet: the signal must write it
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    (saved,) = stage.glob("checkpoints/*/state.pt")
    position = torch.load(saved, weights_only=True)["position"]
    assert 10 <= position["global_step"] < 52 and position["step_in_epoch"] == position["global_step"]
    resumed = _run(command, tmp_path)  # and a rerun continues from it
    assert f"(epoch 1, step {position['step_in_epoch']} of the epoch)" in resumed.stderr
    steps = [json.loads(line)["step"] for line in (stage / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 52 and (stage / "backbone.safetensors").is_file()


def test_changed_settings_refuse_to_resume_and_restart_starts_over(small_digits: Path, tmp_path: Path) -> None:  # fmt: skip
    train = small_digits
    command = _command("pretrain", train, tmp_path / "run", "--checkpoint-every", EVERY_LOG_POINT)
    _kill_after_checkpoint(
        command, tmp_path / "run" / "pretrain" / "checkpoints", 10, tmp_path, signal.SIGKILL
    )
    changed = [*command, "--temperature", "0.2"]
    result = subprocess.run(changed, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 2
    assert "temperature 0.5 → 0.2" in result.stderr and "--restart" in result.stderr
    fresh = _run([*changed, "--restart", "--epochs", "1"], tmp_path)
    assert "resuming" not in fresh.stderr
    record = json.loads((tmp_path / "run" / "pretrain" / "run.json").read_text())
    assert record["config"]["temperature"] == 0.2


def test_a_checkpoint_never_unpickles_code(tmp_path: Path) -> None:
    from labelfew.engine import checkpoint
    from labelfew.errors import UserError

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(tmp_path / "pwned"),))  # type: ignore[return-value]

    folder = tmp_path / "checkpoints" / "step-00000001"
    folder.mkdir(parents=True)
    torch.save({"evil": Payload()}, folder / "state.pt")
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "fingerprint.json").write_text("{}")
    with pytest.raises(UserError, match="damaged checkpoint"):
        checkpoint.load(folder)
    assert not (tmp_path / "pwned").exists()


def test_distill_killed_mid_epoch_resumes_to_the_same_model(small_digits: Path, reference: Path, tmp_path: Path) -> None:  # fmt: skip
    def command(out: Path) -> list[str]:
        return [LABELFEW, "distill", "--unlabeled", str(small_digits), "--from", str(reference / "run" / "finetune"),
                "--epochs", "2", "--batch-size", str(BATCH), "--workers", "0", "--quiet", "--out", str(out),
                "--checkpoint-every", EVERY_LOG_POINT]  # fmt: skip

    resumed = _whole_then_killed_and_resumed(command, tmp_path)
    assert "resuming distill" in resumed.stderr and "epoch 2" in resumed.stderr


def test_fixmatch_killed_mid_epoch_resumes_to_the_same_average_and_weights(
    small_digits: Path, reference: Path, tmp_path: Path, copy_per_class: CopyPerClass
) -> None:
    labels = copy_per_class(small_digits, tmp_path / "labels", 10)  # 3 labelled steps an epoch, 13 unlabeled

    def command(out: Path) -> list[str]:
        return [LABELFEW, "finetune", "--labels", str(labels), "--from", str(reference / "run"), "--method", "fixmatch",
                "--unlabeled", str(small_digits), "--mu", "1", "--threshold", "0.5", "--epochs", "2", "--batch-size",
                str(BATCH), "--workers", "0", "--quiet", "--out", str(out), "--checkpoint-every", EVERY_LOG_POINT]  # fmt: skip

    resumed = _whole_then_killed_and_resumed(command, tmp_path)
    assert "resuming finetune (fixmatch)" in resumed.stderr and "epoch 2" in resumed.stderr
    last = "step-00000026"  # the end of epoch 2: the weights trained, besides their average
    for name in ("model.safetensors", "ema.safetensors"):
        whole, killed = (tmp_path / run / "checkpoints" / last / name for run in ("whole", "killed"))
        _assert_same_tensors(whole, killed)


def test_finetune_from_init_killed_mid_epoch_resumes_to_the_same_model(
    small_digits: Path, tmp_path: Path
) -> None:
    """`finetune --init`: the resume fingerprint holds the init's sha256, and the resumed run the same tensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    state = timm.create_model("test_resnet", num_classes=0).state_dict()
    init = tmp_path / "init.safetensors"
    save_file(
        {key: value.contiguous() for key, value in state.items()}, str(init), metadata={"arch": "test_resnet"}
    )

    def command(out: Path) -> list[str]:
        return _command("finetune", small_digits, out, "--init", str(init), "--lr", "0.01",
                        "--checkpoint-every", EVERY_LOG_POINT)  # fmt: skip

    resumed = _whole_then_killed_and_resumed(command, tmp_path)
    assert "resuming finetune" in resumed.stderr and "epoch 2" in resumed.stderr
    saved = json.loads(next((tmp_path / "killed" / "checkpoints").glob("*/fingerprint.json")).read_text())
    record = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert saved["init_sha256"] == record["init"]["sha256"]


def test_finetune_keeps_the_best_epoch_and_the_early_stop_count_across_a_kill(
    small_digits: Path, reference: Path, tmp_path: Path
) -> None:
    """The best epoch's weights and the validations since it live in the checkpoint: killed in
    epoch 3 (step 20, 9 steps an epoch) with epoch 1 the best and 1 validation without improvement, the
    resumed run stops after epoch 3 as the whole one did, with the same best and last models."""

    half = tmp_path / "digits"  # 208 digits, 156 to train on: 9 steps of 16 an epoch, at half the cost
    for path in sorted(small_digits.rglob("*.png"))[::2]:
        (half / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, half / path.parent.name / path.name)

    def command(out: Path) -> list[str]:
        return _command("finetune", half, out, "--from", str(reference / "run"), "--epochs", "6",
                        "--batch-size", "16", "--val-fraction", "0.25", "--early-stop", "2", "--lr", LR,
                        "--checkpoint-every", EVERY_LOG_POINT)  # fmt: skip

    resumed = _whole_then_killed_and_resumed(command, tmp_path)
    assert "resuming finetune" in resumed.stderr and "epoch 3" in resumed.stderr
    whole, killed = (json.loads((tmp_path / run / "run.json").read_text()) for run in ("whole", "killed"))
    assert (
        whole["best"]["epoch"] == 1
        and whole["best"]["stopped_early"]
        and whole["best"]["epochs_trained"] == 3
    )
    assert killed["best"] == whole["best"] and killed["metrics"]["val_score"] == whole["metrics"]["val_score"]
    _assert_same_tensors(
        tmp_path / "whole" / "model-last.safetensors", tmp_path / "killed" / "model-last.safetensors"
    )
    assert "early stop after epoch 3/6" in resumed.stderr
