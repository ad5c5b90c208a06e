"""Checkpoints: atomic folders, pruning, RNG round trips, fingerprints and damaged files."""

from __future__ import annotations

import errno
import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from labelfew import fileio
from labelfew.engine import checkpoint
from labelfew.errors import UserError


def _state(step: int) -> dict:
    return {
        "position": checkpoint.position_state(checkpoint.Position(global_step=step, epoch=1)),
        "extra": [1, 2],
    }


def test_save_load_round_trip(tmp_path: Path) -> None:
    weights = {"layer.weight": torch.randn(3, 2), "layer.bias": torch.zeros(3)}
    folder = checkpoint.save(tmp_path, weights, _state(12), {"arch": "resnet18", "batch_size": 8})
    assert folder.name == "step-00000012"
    model_state, training_state, fingerprint = checkpoint.load(folder)
    assert model_state.keys() == weights.keys()
    assert all(torch.equal(model_state[key], weights[key]) for key in weights)
    assert training_state["extra"] == [1, 2]
    assert checkpoint.position_from(training_state) == checkpoint.Position(global_step=12, epoch=1)
    assert fingerprint == {"arch": "resnet18", "batch_size": 8}


def test_only_the_newest_two_are_kept_and_latest_is_the_newest(tmp_path: Path) -> None:
    for step in (5, 10, 15, 20):
        checkpoint.save(tmp_path, {"w": torch.ones(1) * step}, _state(step), {})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-00000015", "step-00000020"]
    assert checkpoint.latest(tmp_path) == tmp_path / "step-00000020"


def test_a_half_written_checkpoint_is_never_the_latest(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, {"w": torch.ones(1)}, _state(3), {})
    # What a kill leaves mid-write: the temporary folder, and a final-named folder without state.pt.
    (tmp_path / ".step-00000009.abc").mkdir()
    (tmp_path / "step-00000009").mkdir()
    (tmp_path / "step-00000009" / "model.safetensors").write_bytes(b"partial")
    assert checkpoint.latest(tmp_path) == tmp_path / "step-00000003"
    assert checkpoint.latest(tmp_path / "absent") is None


def test_a_failed_write_leaves_no_folder(tmp_path: Path) -> None:
    class Unsaveable:
        def __reduce__(self) -> tuple:
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        checkpoint.save(tmp_path, {"w": torch.ones(1)}, {**_state(4), "bad": Unsaveable()}, {})
    assert list(tmp_path.iterdir()) == []


def test_remove_all_clears_complete_and_temporary_folders(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, {"w": torch.ones(1)}, _state(1), {})
    (tmp_path / ".step-00000002.tmp").mkdir()
    (tmp_path / "log.jsonl").write_text("{}\n")
    checkpoint.remove_all(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["log.jsonl"]


def test_rng_state_round_trip_restores_every_generator() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    saved = checkpoint.rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(10)
    np.random.seed(20)
    torch.manual_seed(30)
    checkpoint.set_rng_state(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_changed_settings_are_named_with_old_and_new_values(tmp_path: Path) -> None:
    saved = {"temperature": 0.5, "epochs": 10, "arch": "resnet18"}
    current = {"temperature": 0.2, "epochs": 10, "arch": "resnet18", "blur": False}
    with pytest.raises(UserError) as error:
        checkpoint.check_fingerprint(tmp_path / "step-00000001", saved, current)
    message = str(error.value)
    assert "temperature 0.5 → 0.2" in message and "blur None → False" in message
    assert "epochs" not in message and "--restart" in message
    checkpoint.check_fingerprint(tmp_path, saved, dict(saved))  # the same settings pass


@pytest.mark.parametrize("damaged", ["model.safetensors", "state.pt", "fingerprint.json"])
def test_a_damaged_file_is_one_line_naming_the_checkpoint(tmp_path: Path, damaged: str) -> None:
    folder = checkpoint.save(tmp_path, {"w": torch.ones(1)}, _state(7), {})
    (folder / damaged).write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match=r"step-00000007: damaged checkpoint .*--restart"):
        checkpoint.load(folder)


def test_a_crafted_pickle_in_state_pt_is_refused_without_running(tmp_path: Path) -> None:
    folder = checkpoint.save(tmp_path, {"w": torch.ones(1)}, _state(8), {})
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    (folder / "state.pt").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError, match="damaged checkpoint"):
        checkpoint.load(folder)
    assert not marker.exists()


def test_save_and_restore_training_restore_model_optimizer_scheduler_and_position(tmp_path: Path) -> None:
    accelerator = SimpleNamespace(
        num_processes=1, is_main_process=True, process_index=0, scaler=None,
        unwrap_model=lambda model: model, wait_for_everyone=lambda: None,
    )  # fmt: skip

    def build() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return model, optimizer, scheduler

    model, optimizer, scheduler = build()
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    position = checkpoint.Position(epoch=1, step_in_epoch=2, global_step=3, epoch_losses=[0.5])
    checkpoint.save_training(
        accelerator, tmp_path, model, optimizer, scheduler, position, {"a": 1}, [{"val": 0.1}]
    )

    fresh, fresh_optimizer, fresh_scheduler = build()
    assert (
        checkpoint.restore_training(
            accelerator, tmp_path / "none", fresh, fresh_optimizer, fresh_scheduler, {}
        )
        is None
    )
    folder, restored, metrics = checkpoint.restore_training(
        accelerator, tmp_path, fresh, fresh_optimizer, fresh_scheduler, {"a": 1}
    )  # type: ignore[misc]
    assert folder == tmp_path / "step-00000003"
    assert restored == position and metrics == [{"val": 0.1}]
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    momentum = optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["momentum_buffer"], momentum)
    with pytest.raises(UserError, match="a checkpoint of a different run"):
        checkpoint.restore_training(accelerator, tmp_path, fresh, fresh_optimizer, fresh_scheduler, {"a": 2})


def test_a_changed_file_list_names_up_to_three_files_that_appeared_or_vanished(tmp_path: Path) -> None:
    # the refusal named only two hashes (issue 22, item 13)
    saved = {"image_list_sha256": "aaa", "_image_list_sha256": ["a.png", "b.png", "c.png"]}
    new = [f"new{i}.png" for i in range(5)]
    current = {"image_list_sha256": "bbb", "_image_list_sha256": ["b.png", "c.png", *new]}
    with pytest.raises(UserError) as error:
        checkpoint.check_fingerprint(tmp_path / "step-00000001", saved, current)
    message = str(error.value)
    assert "'aaa' → 'bbb' (5 file(s) appeared: new0.png, new1.png, new2.png and 2 more; " in message
    assert "1 file(s) vanished: a.png)" in message and "_image_list" not in message and "b.png" not in message
    old = {"image_list_sha256": "aaa"}  # a checkpoint written before the lists were kept: the hashes only
    with pytest.raises(UserError, match=r"\(image_list_sha256 'aaa' → 'bbb'\); rerun"):
        checkpoint.check_fingerprint(tmp_path / "step-00000001", old, current)
    # a list alone is no change
    checkpoint.check_fingerprint(tmp_path, old, {**old, "_image_list_sha256": ["a.png"]})


TORCH_DISK_FULL = RuntimeError(
    "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed"
)


@pytest.mark.parametrize("failure", ["oserror", "torch"])
def test_a_full_disk_is_one_line_with_the_size_needed_and_the_earlier_checkpoints_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    weights = {"w": torch.ones(1000)}
    checkpoint.save(tmp_path, weights, _state(5), {"a": 1})

    def full_disk(value: object, path: Path) -> None:
        Path(path).write_bytes(b"part of it")
        if failure == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise TORCH_DISK_FULL

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    monkeypatch.setattr(fileio, "free_bytes", lambda folder: 0)
    with pytest.raises(UserError) as caught:
        checkpoint.save(tmp_path, weights, _state(10), {"a": 1})
    message = str(caught.value)
    assert message.startswith(f"{tmp_path}: the disk holding it is full (0 bytes left, the next checkpoint needs about 4 kB)")  # fmt: skip
    assert "a training run resumes from its last checkpoint" in message and "\n" not in message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-00000005"]  # no partial folder
    model_state, _, _ = checkpoint.load(checkpoint.latest(tmp_path))  # type: ignore[arg-type]
    assert torch.equal(model_state["w"], weights["w"])


def test_an_unrelated_write_error_is_not_called_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(value: object, path: Path) -> None:
        raise TORCH_DISK_FULL  # the same words, but the disk has room: not a full disk

    monkeypatch.setattr(checkpoint.torch, "save", broken)
    monkeypatch.setattr(fileio, "free_bytes", lambda folder: 10**12)
    with pytest.raises(RuntimeError, match="file write failed"):
        checkpoint.save(tmp_path, {"w": torch.ones(1)}, _state(1), {})


def test_save_clears_the_temporary_folders_of_killed_writes(tmp_path: Path) -> None:
    (tmp_path / ".step-00000009.abc").mkdir(parents=True)
    (tmp_path / ".step-00000009.abc" / "model.safetensors").write_bytes(b"partial")
    checkpoint.save(tmp_path, {"w": torch.ones(1)}, _state(12), {})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-00000012"]


def test_the_size_estimate_counts_weights_average_and_optimizer_buffers() -> None:
    model = nn.Linear(100, 10)  # 1010 float32 parameters: 4040 bytes
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    adamw = torch.optim.AdamW(model.parameters())
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    assert checkpoint.estimated_bytes(model, sgd) == 4040 + 4040 + (1 << 20)
    assert checkpoint.estimated_bytes(model, adamw) == 4040 + 2 * 4040 + (1 << 20)
    assert checkpoint.estimated_bytes(model, plain) == 4040 + (1 << 20)
    model(torch.randn(2, 100)).sum().backward()
    adamw.step()  # now the buffers exist (and a step count): at least the estimate
    saved = checkpoint._tensor_bytes(adamw.state_dict()["state"])
    assert checkpoint.estimated_bytes(model, adamw) - (1 << 20) - 4040 >= 2 * 4040
    assert saved >= 2 * 4040


def test_require_space_refuses_a_run_whose_checkpoint_does_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accelerator = SimpleNamespace(num_processes=1, is_main_process=True, unwrap_model=lambda model: model)
    model = nn.Linear(100, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    needed = checkpoint.estimated_bytes(model, optimizer)
    monkeypatch.setattr(fileio, "free_bytes", lambda folder: needed)
    checkpoint.require_space(accelerator, tmp_path / "checkpoints", model, optimizer)
    monkeypatch.setattr(fileio, "free_bytes", lambda folder: needed - 1)
    with pytest.raises(UserError, match=r"checkpoints: the disk holding it has 1.1 MB free but a checkpoint of this run needs about 1.1 MB"):  # fmt: skip
        checkpoint.require_space(accelerator, tmp_path / "checkpoints", model, optimizer)
