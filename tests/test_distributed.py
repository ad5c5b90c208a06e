"""Several processes train the same objective as one: parity of losses and gradients, and real launches.

The parity test runs the real training loop (`engine.Trainer` with `pretrain.contrastive_step`,
NT-Xent with gathered negatives, LARS over `parameter_groups`, the warmup-cosine schedule, and a
streaming source sharded by `EpochOrder`) once in 1 process with batch 2N and once in 2 processes (gloo on
the CPU) with batch N each, from the same weights on the same images. Every BatchNorm of the
test_resnet backbone and of the projection head is replaced by GroupNorm (8 groups): BN
statistics are per process on the CPU (SyncBatchNorm is GPU-only), which is a real difference
between the runs, while GroupNorm normalises each image alone, so that the two runs must agree
up to float32 summation order.

The launch tests start `torchrun` as a user does and chain pretrain, finetune and evaluate.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as torch_distributed
import torch.multiprocessing as torch_multiprocessing
from reference.losses_reference import global_mean
from torch import Tensor, nn
from typer.testing import CliRunner

from labelfew import engine
from labelfew.cli import app
from labelfew.config import PretrainConfig
from labelfew.data.batches import Batch, EpochOrder
from labelfew.data.images import find_images
from labelfew.data.stream import DecodedFiles, StreamBatches
from labelfew.engine.key_queue import KeyQueue
from labelfew.errors import UserError
from labelfew.optim import build_optimizer, parameter_groups, scaled_learning_rate, warmup_cosine
from labelfew.stages import pretrain

PER_PROCESS_BATCH = 4
STEPS = 3
TEMPERATURE = 0.5
DTYPES = (torch.float64, torch.float32)
TOLERANCE = 1e-5  # relative, as the issue asks
FLOAT32_GRADIENT_TOLERANCE = 1e-4  # float32 rounding of nearly cancelling sums; see the parity test


def _loopback_interface() -> str:
    """Name of the loopback interface ('lo' on Linux, 'lo0' on macOS), for gloo's transport."""
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return names[0] if names else "lo"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- Parity: 2 processes × batch N against 1 process × batch 2N -------------------------------


class TwoFixedViews:
    """Deterministic stand-in for the random SimCLR views: the image, and its mirror darkened.

    Random views would differ between the runs (each process draws its own, seeded by its rank);
    fixed views keep the comparison about the objective alone.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, images: Tensor, sizes: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        first = images.to(self.dtype) / 255
        second = images.flip(-1).to(self.dtype) / 255 * 0.8
        return first, second


def _group_norm_everywhere(module: nn.Module) -> None:
    """Replaces every BatchNorm (1d and 2d) by GroupNorm with 8 groups, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.GroupNorm(math.gcd(8, child.num_features), child.num_features))
        else:
            _group_norm_everywhere(child)


def _parity_model(dtype: torch.dtype) -> nn.Module:
    config = PretrainConfig(
        data=Path("unused"), arch="test_resnet", small_stem=True, image_size=32, projection_dim=32
    )
    torch.manual_seed(0)
    model = pretrain.build_model(config)
    _group_norm_everywhere(model)
    return model.to(dtype)


def _parity_run(accelerator: Any, dtype: torch.dtype, image_folder: Path, queue: int = 0) -> dict[str, Any]:
    """STEPS steps of the real loop (with a key queue of `queue` keys, momentum 0.9, when not 0);
    returns losses, gradients, weights, the data order seen and the queue."""
    global_batch = PER_PROCESS_BATCH * 2
    model = _parity_model(dtype)
    named = list(model.named_parameters())
    initial = {name: param.detach().clone() for name, param in named}
    optimizer = build_optimizer(
        "lars",
        parameter_groups(model, weight_decay=1e-6),
        lr=scaled_learning_rate(None, global_batch, "sqrt"),
    )
    gradients: list[dict[str, Tensor]] = []
    # Runs inside optimizer.step(): after DDP has averaged the gradients over the processes.
    optimizer.register_step_pre_hook(
        lambda *_: gradients.append({name: param.grad.detach().clone() for name, param in named})  # type: ignore[union-attr]
    )
    paths = find_images(image_folder)
    order = EpochOrder(len(paths), engine.per_process_batch(global_batch, accelerator), seed=0,
                       rank=accelerator.process_index, world_size=accelerator.num_processes)  # fmt: skip
    loader = StreamBatches(DecodedFiles(paths, side=32), order, accelerator.device, workers=0)
    model, optimizer = accelerator.prepare(model, optimizer)
    keys = KeyQueue(accelerator.unwrap_model(model), queue, 32, momentum=0.9) if queue else None
    contrastive = pretrain.contrastive_step(
        TEMPERATURE, channels_last=False, views=TwoFixedViews(dtype), keys=keys
    )
    losses: list[Tensor] = []
    indices: list[list[int]] = []

    def step(model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        indices.append(batch.indices.tolist())
        loss, views = contrastive(model, batch)
        losses.append(global_mean(loss))
        return loss, views

    trainer = engine.Trainer(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=warmup_cosine(optimizer, warmup_steps=1, total_steps=STEPS),
        loader=loader,
        step=step,
        epochs=1,
        description="parity",
        quiet=True,
        ema=keys,
    )
    result = trainer.fit()
    epochs = []
    for epoch in (0, 1):  # the order of each epoch, replayed through set_epoch
        loader.set_epoch(epoch)
        epochs.append([batch.indices.tolist() for batch in loader])
    return {
        "initial": initial,
        "losses": torch.stack(losses),
        "epoch_loss": result.epoch_losses[0],
        "gradients": gradients,
        "final": {name: param.detach().clone() for name, param in named},
        "indices": indices,
        "epochs": epochs,
        **({"queue": keys.keys.clone(), "pointer": keys.pointer, "filled": keys.filled} if keys else {}),
    }


def _parity_worker(
    rank: int, world_size: int, init_file: str, image_folder: str, out_dir: str, queue: int = 0
) -> None:
    """One process of a parity run, in float64 and then in float32 (with a key queue: float64
    only); saves what it measured."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if world_size > 1:
        # What torchrun would set; make_accelerator must turn it into a gloo group on the CPU.
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world_size),
            GLOO_SOCKET_IFNAME=_loopback_interface(),
        )
        torch_distributed.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=60),
        )
    accelerator = engine.make_accelerator("no", seed=0)
    assert accelerator.num_processes == world_size
    dtypes = DTYPES[:1] if queue else DTYPES
    runs: dict[str, Any] = {
        str(dtype): _parity_run(accelerator, dtype, Path(image_folder), queue) for dtype in dtypes
    }
    # A write that fails on the main process fails on every process, instead of leaving them waiting.
    runs["shared_result"] = str(engine.on_main_process(accelerator, lambda: Path(out_dir) / "made-by-main"))
    try:
        engine.on_main_process(accelerator, _fail_on_main)
    except UserError as error:
        runs["shared_error"] = str(error)
    torch.save(runs, Path(out_dir) / f"world{world_size}-rank{rank}.pt")
    if world_size > 1:
        torch_distributed.destroy_process_group()


def _fail_on_main() -> None:
    raise UserError("disk full on the main process")


def _relative(measured: Tensor, reference: Tensor) -> float:
    """||measured - reference|| / ||reference||, in float64."""
    difference = torch.linalg.vector_norm((measured - reference).double())
    return float(difference / torch.linalg.vector_norm(reference.double()).clamp(min=1e-30))


def _differences(single: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Checks what must be identical and returns the largest relative differences to one process."""
    # Same starting weights, and the same global batches: rank 0 holds the first half of the
    # one-process batch and rank 1 the second (so the gathered order is the same too).
    for name, weight in single["initial"].items():
        assert torch.equal(ranks[0]["initial"][name], weight), name
    assert len(single["indices"]) == STEPS
    for step in range(STEPS):
        assert ranks[0]["indices"][step] + ranks[1]["indices"][step] == single["indices"][step]
    # Each epoch: the processes split one permutation, disjointly, and it changes with the epoch.
    for epoch in (0, 1):
        shards = [[index for batch in rank["epochs"][epoch] for index in batch] for rank in ranks]
        assert not set(shards[0]) & set(shards[1])
        merged = [
            first + second for first, second in zip(*(rank["epochs"][epoch] for rank in ranks), strict=True)
        ]
        assert merged == single["epochs"][epoch]
    assert single["epochs"][0] == single["indices"]
    assert single["epochs"][0] != single["epochs"][1]

    # The loss logged on every process is the mean of the per-process losses.
    assert torch.equal(ranks[0]["losses"], ranks[1]["losses"])
    loss = max(
        abs(float(two) - float(one)) / abs(float(one))
        for two, one in zip(ranks[0]["losses"], single["losses"], strict=True)
    )
    assert len(single["gradients"]) == STEPS
    names = list(single["gradients"][0])
    assert names == list(ranks[0]["gradients"][0])
    gradient, worst = 0.0, ""
    for step in range(STEPS):
        for name in names:
            # DDP averages the gradients, so both processes apply the same update.
            assert torch.equal(ranks[0]["gradients"][step][name], ranks[1]["gradients"][step][name])
            difference = _relative(ranks[0]["gradients"][step][name], single["gradients"][step][name])
            if difference > gradient:
                gradient, worst = difference, f"{name} at step {step + 1}"
    return {
        "loss": loss,
        "epoch_loss": abs(ranks[0]["epoch_loss"] - single["epoch_loss"]) / single["epoch_loss"],
        "gradient": gradient,
        "gradient_worst": worst,
        "weights": max(
            _relative(ranks[0]["final"][name], weight) for name, weight in single["final"].items()
        ),
        "parameter_tensors": len(names),
    }


@pytest.fixture(scope="module")
def parity_images(digits_folder: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """STEPS global batches of real 32 px digits (links to the shared fixture's files)."""
    folder = tmp_path_factory.mktemp("parity-images")
    for source in find_images(digits_folder[0])[: STEPS * 2 * PER_PROCESS_BATCH]:
        (folder / source.name).symlink_to(source)
    return folder


def test_two_processes_train_exactly_as_one_with_the_global_batch(
    parity_images: Path, tmp_path: Path, record_property: Any
) -> None:
    """Loss and the gradient of every parameter tensor, step by step, within 1e-5 (relative).

    Relative means ||two processes - one process|| / ||one process|| per parameter tensor. In
    float64 the objective is compared with rounding out of the way; in float32 (how labelfew
    trains on the CPU) summation order differs between the runs (each process sums its own
    views, then DDP averages), and gradients that are sums of nearly cancelling per-image terms,
    such as the last projection layer's bias, differ by up to about 2e-5 after 3 steps, so
    float32 gradients get FLOAT32_GRADIENT_TOLERANCE. A wrong gather or wrong positive
    indices move the loss and gradients by 1e-2 or more.
    """
    for world_size in (1, 2):
        torch_multiprocessing.spawn(
            _parity_worker,
            args=(world_size, str(tmp_path / f"init{world_size}"), str(parity_images), str(tmp_path)),
            nprocs=world_size,
            join=True,
        )
    single = torch.load(tmp_path / "world1-rank0.pt")
    ranks = [torch.load(tmp_path / f"world2-rank{rank}.pt") for rank in (0, 1)]
    measured = {
        dtype: _differences(single[dtype], [rank[dtype] for rank in ranks]) for dtype in map(str, DTYPES)
    }
    summary = json.dumps(measured, indent=1)
    print(
        f"\nparity, 2 processes × batch {PER_PROCESS_BATCH} vs 1 × {2 * PER_PROCESS_BATCH}, {STEPS} LARS steps, max relative differences: {summary}"
    )
    record_property("parity_max_relative_difference", json.dumps(measured))
    for rank in ranks:
        assert rank["shared_result"] == str(tmp_path / "made-by-main")
        assert rank["shared_error"] == "disk full on the main process"
    exact = measured[str(torch.float64)]
    for key in ("loss", "epoch_loss", "gradient", "weights"):
        assert exact[key] < TOLERANCE, (key, summary)
    rounded = measured[str(torch.float32)]
    assert rounded["loss"] < TOLERANCE, summary
    assert rounded["epoch_loss"] < TOLERANCE, summary
    assert rounded["gradient"] < FLOAT32_GRADIENT_TOLERANCE, summary
    assert rounded["weights"] < FLOAT32_GRADIENT_TOLERANCE, summary


def test_two_processes_queue_the_same_keys_and_train_as_one_with_the_global_batch(
    parity_images: Path, tmp_path: Path
) -> None:
    """`--queue` (issue 27): the keys are gathered before they are queued, so the queue after every
    step, and the losses and gradients that use it, are those of one process with the global batch.
    40 keys: 16 a step, so the third step's keys wrap around; float64, so that only the objective
    is compared."""
    for world_size in (1, 2):
        torch_multiprocessing.spawn(
            _parity_worker,
            args=(world_size, str(tmp_path / f"init{world_size}"), str(parity_images), str(tmp_path), 40),
            nprocs=world_size,
            join=True,
        )
    dtype = str(torch.float64)
    single = torch.load(tmp_path / "world1-rank0.pt")[dtype]
    ranks = [torch.load(tmp_path / f"world2-rank{rank}.pt")[dtype] for rank in (0, 1)]
    assert (single["pointer"], single["filled"]) == (3 * 16 % 40, 40)
    for rank in ranks:
        assert (rank["pointer"], rank["filled"]) == (single["pointer"], single["filled"])
        torch.testing.assert_close(rank["queue"], single["queue"], rtol=0, atol=1e-12)
    measured = _differences(single, ranks)
    for key in ("loss", "epoch_loss", "gradient", "weights"):
        assert measured[key] < TOLERANCE, (key, measured)


# --- Real launches: torchrun, as a user runs it -----------------------------------------------


def _torchrun(arguments: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "labelfew",
        *arguments,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": _loopback_interface()}
    return subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout, check=False
    )


def _linked_subset(source: Path, target: Path, per_class: int) -> Path:
    """A class-per-folder tree of links to the first `per_class` images of each class of `source`."""
    for class_folder in sorted(path for path in source.iterdir() if path.is_dir()):
        (target / class_folder.name).mkdir(parents=True)
        for image in find_images(class_folder)[:per_class]:
            (target / class_folder.name / image.name).symlink_to(image)
    return target


def test_torchrun_pretrain_artifact_feeds_finetune_fixmatch_distill_and_evaluate(
    digits_folder: tuple[Path, Path], tmp_path: Path
) -> None:
    train = _linked_subset(digits_folder[0], tmp_path / "train", per_class=20)
    test = _linked_subset(digits_folder[1], tmp_path / "test", per_class=5)
    run = tmp_path / "run"
    common = ["--epochs", "1", "--quiet"]

    pretrained = _torchrun(
        ["pretrain", str(train), "--arch", "test_resnet", "--batch-size", "32", "--out", str(run), *common],
        cwd=tmp_path,
    )
    assert pretrained.returncode == 0, pretrained.stdout + pretrained.stderr
    # Only the main process prints: one summary line for the epoch, not one per process.
    assert pretrained.stderr.count("pretrain epoch 1/1") == 1, pretrained.stderr
    record = json.loads((run / "pretrain" / "run.json").read_text())
    assert record["distributed"] == {
        "processes": 2,
        "per_process_batch": 16,
        "batchnorm": "per-process BatchNorm (SyncBatchNorm is GPU-only)",
    }
    assert record["steps"] == 200 // 32  # one shared epoch: the processes split it
    log_lines = (run / "pretrain" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log_lines] == list(range(1, record["steps"] + 1))

    finetuned = _torchrun(
        ["finetune", "--labels", str(train), "--from", str(run), "--batch-size", "16", *common],
        cwd=tmp_path,
    )
    assert finetuned.returncode == 0, finetuned.stdout + finetuned.stderr
    finetune_record = json.loads((run / "finetune-train" / "run.json").read_text())
    assert finetune_record["device"].startswith("cpu × 2 processes")
    assert finetune_record["steps"] == 200 // 16  # the last incomplete global batch is dropped

    # The stages that use the unlabeled images again, on the same 2 processes.
    fixmatch = _torchrun(
        ["finetune", "--labels", str(train), "--from", str(run), "--method", "fixmatch", "--unlabeled", str(train),
         "--mu", "2", "--batch-size", "16", *common],
        cwd=tmp_path,
    )  # fmt: skip
    assert fixmatch.returncode == 0, fixmatch.stdout + fixmatch.stderr
    assert fixmatch.stderr.count("finetune (fixmatch) epoch 1/1") == 1, fixmatch.stderr
    fixmatch_record = json.loads((run / "finetune-fixmatch-train" / "run.json").read_text())
    assert fixmatch_record["device"].startswith("cpu × 2 processes")
    assert fixmatch_record["steps"] == 200 // 32  # a pass over the unlabeled images, μ × 16 a step, split
    distilled = _torchrun(
        ["distill", "--unlabeled", str(train), "--from", str(run / "finetune-train"), "--batch-size", "32", *common],
        cwd=tmp_path,
    )  # fmt: skip
    assert distilled.returncode == 0, distilled.stdout + distilled.stderr
    distill_record = json.loads((run / "distill-train" / "run.json").read_text())
    assert distill_record["device"].startswith("cpu × 2 processes") and distill_record["steps"] == 200 // 32

    # evaluate runs in one process; in this one, to spare the start-up of another.
    evaluated = CliRunner().invoke(app, ["evaluate", "--test", str(test), "--from", str(run), "--quiet"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((run / "evaluate" / "report.json").read_text())
    assert {"fine-tuned", "fine-tuned (fixmatch)", "distilled"} <= {
        row["method"] for row in report["rows"]
    }, report


@pytest.mark.slow  # 20 torchrun launches, ~3 minutes on 2 cores
def test_finished_torchrun_jobs_exit_zero_every_time(
    digits_folder: tuple[Path, Path], tmp_path: Path
) -> None:
    """A finished 2-process job exits 0, ten times in a row (it used to die with SIGABRT at exit,
    "terminate called without an active exception", in about 3 runs of 8: the process group was
    never destroyed)."""
    train = _linked_subset(digits_folder[0], tmp_path / "train", per_class=10)
    failures = []
    for attempt in range(10):
        run = tmp_path / f"run-{attempt}"
        pretrained = _torchrun(
            ["pretrain", str(train), "--arch", "test_resnet", "--batch-size", "32", "--epochs", "1",
             "--out", str(run), "--quiet"],
            cwd=tmp_path,
        )  # fmt: skip
        finetuned = _torchrun(
            ["finetune", "--labels", str(train), "--from", str(run), "--batch-size", "16", "--epochs", "1",
             "--quiet"],
            cwd=tmp_path,
        )  # fmt: skip
        for name, result in (("pretrain", pretrained), ("finetune", finetuned)):
            if result.returncode != 0:
                failures.append(
                    f"attempt {attempt} {name}: exit {result.returncode}\n{result.stderr[-2000:]}"
                )
    assert not failures, "\n".join(failures)


@pytest.mark.slow  # another torchrun launch (~15 s on 2 cores); the parity test covers on_main_process
def test_a_failure_on_the_main_process_ends_every_process_with_its_message(
    digits_folder: tuple[Path, Path], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    failed = _torchrun(
        ["pretrain", str(digits_folder[0]), "--arch", "test_resnet", "--epochs", "1", "--out", str(blocker)],
        cwd=tmp_path,
        timeout=60,
    )
    assert failed.returncode != 0
    lines = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 2, failed.stderr  # the main process's error, raised on both processes
    assert all("cannot create" in line and str(blocker) in line for line in lines)


def test_gradient_accumulation_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # What `accelerate launch --gradient_accumulation_steps 4` sets for DeepSpeed runs, or a user by hand.
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(UserError, match=r"gradient accumulation \(4 steps.*--batch-size \(the global"):
        engine.make_accelerator("no", seed=0)


# --- SyncBatchNorm choice and main-process helper, without processes ---------------------------


def _fake_accelerator(device: str, processes: int) -> Any:
    return SimpleNamespace(
        device=torch.device(device), num_processes=processes, is_main_process=True, process_index=0
    )


@pytest.mark.parametrize(
    ("device", "processes", "requested", "expected"),
    [
        ("cuda", 2, None, True),
        ("cuda", 1, None, False),
        ("cuda", 1, True, True),  # forced on one GPU: the SyncBatchNorm code path runs
        ("cuda", 4, False, False),
        ("cpu", 2, None, False),
        ("cpu", 2, False, False),
    ],
)
def test_sync_batchnorm_choice(device: str, processes: int, requested: bool | None, expected: bool) -> None:
    accelerator = _fake_accelerator(device, processes)
    assert pretrain.use_sync_batchnorm(requested, accelerator) is expected
    description = pretrain.batchnorm_description(expected, accelerator)
    assert description.startswith("SyncBatchNorm" if expected else ("BatchNorm", "per-process"))


def test_sync_batchnorm_forced_on_the_cpu_is_a_user_error() -> None:
    with pytest.raises(UserError, match="--sync-bn: PyTorch's SyncBatchNorm runs on CUDA GPUs only"):
        pretrain.use_sync_batchnorm(True, _fake_accelerator("cpu", 1))


def test_on_main_process_returns_the_result_and_raises_the_error() -> None:
    accelerator = _fake_accelerator("cpu", 1)
    assert engine.on_main_process(accelerator, lambda: Path("out")) == Path("out")

    def fail() -> None:
        raise UserError("no room")

    with pytest.raises(UserError, match="no room"):
        engine.on_main_process(accelerator, fail)


@pytest.mark.parametrize(
    ("environment", "expected"),
    [({}, 1), ({"WORLD_SIZE": "4"}, 4), ({"PMI_SIZE": "2"}, 2), ({"WORLD_SIZE": ""}, 1)],
)
def test_launched_processes(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], expected: int
) -> None:
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert engine.launched_processes() == expected


@pytest.mark.slow  # 2 torchrun launches, ~1 minute on 2 cores
def test_torchrun_linear_head_equals_one_process_and_a_weighted_best_epoch_run_finishes(
    digits_folder: tuple[Path, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    train = _linked_subset(digits_folder[0], tmp_path / "train", per_class=12)
    run = tmp_path / "run"
    pretrained = CliRunner().invoke(app, ["pretrain", str(train), "--arch", "test_resnet", "--batch-size", "30",
                                          "--epochs", "1", "--out", str(run), "--workers", "0", "--quiet"])  # fmt: skip
    assert pretrained.exit_code == 0, pretrained.output
    linear = ["finetune", "--labels", str(train), "--from", str(run), "--method", "linear", "--epochs", "5",
              "--batch-size", "16", "--quiet"]  # fmt: skip
    alone = CliRunner().invoke(app, [*linear, "--workers", "0", "--out", str(tmp_path / "one")])
    assert alone.exit_code == 0, alone.output
    two = _torchrun([*linear, "--out", str(tmp_path / "two")], cwd=tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    one_model, two_model = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    assert one_model.keys() == two_model.keys()
    for name, tensor in one_model.items():  # the same features, folds and grid on every process
        torch.testing.assert_close(two_model[name], tensor, rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["lr"] == json.loads(
        (tmp_path / "one" / "run.json").read_text())["lr"]  # fmt: skip

    weighted = _torchrun(
        ["finetune", "--labels", str(train), "--from", str(run), "--class-weights", "auto", "--val-fraction", "0.25",
         "--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--quiet", "--out", str(tmp_path / "weighted")],
        cwd=tmp_path,
    )  # fmt: skip
    assert weighted.returncode == 0, weighted.stdout + weighted.stderr
    record = json.loads((tmp_path / "weighted" / "run.json").read_text())
    assert record["device"].startswith("cpu × 2 processes") and record["class_weights"] is not None
    assert record["best"]["epoch"] in (1, 2) and (tmp_path / "weighted" / "model-last.safetensors").is_file()
