"""`pretrain --queue` at equal wall-clock time: queue off against queue sizes, at two batch sizes.

Issue 27's comparison on the CPU recipe: every configuration (batch B, queue K) gets the same
pretraining time on the same machine, back to back, then the label part of
`benchmarks/label_efficiency.py` (kNN with all training labels, the linear probe, 1% fine-tuned).

Equal time is given by the number of epochs. First every configuration's step is timed in this
process, in its steady state (the real `pretrain.contrastive_step` with the recipe's model, views,
temperature and LARS, placed and autocast as `pretrain` does, on random 32 px uint8 images, the
queue already full, the momentum update after each step), then each gets ``epochs = round(budget / (seconds per step × steps per epoch))``,
so that its warmup and cosine schedule are those of a whole run of that length (a run cut at a
time limit would end at a high learning rate instead). The budget is the recipe's own pretraining
(its batch, no queue, its epochs) at its measured speed, or ``--minutes``. The real loop
spends a little more per step than the timed step (the loader's batches, the trainer's logging):
`--overhead-ms` adds that, measured from one real run, to every configuration's step. The actual
pretraining time of every run is reported beside the budget, so a wrong estimate shows.

    python benchmarks/queue_equal_time.py                       # the whole comparison (hours)
    python benchmarks/queue_equal_time.py --dry-run             # the timings and commands only
    python benchmarks/queue_equal_time.py --batches 64 --queues 0 4096 --minutes 10 --seeds 0 1 2

Writes the timings, each run's label_efficiency JSON (in `--out/queue-equal-time-<date>/`) and a
markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from labelfew import engine
from labelfew.config import PretrainConfig, build_config, load_recipe
from labelfew.data.batches import Batch
from labelfew.engine import simclr
from labelfew.engine.key_queue import KeyQueue
from labelfew.optim import build_optimizer, parameter_groups
from labelfew.stages.pretrain import build_model, channels_last, contrastive_step
from labelfew.views.simclr import SimCLRViews

REPO = Path(__file__).resolve().parent.parent
METRICS = ("kNN (all train labels)", "linear probe", "fine-tuned (SSL)")


def pretrain_config(recipe: dict[str, Any], batch: int, queue: int, images: int) -> PretrainConfig:
    """The recipe's pretraining at batch `batch` with `queue`, resolved as `pretrain` resolves it
    (the recipe must name its image size: no images are read here)."""
    config = build_config(PretrainConfig, recipe, data=Path("unused"), batch_size=batch, queue=queue)
    if config.image_size is None:
        raise SystemExit("the recipe must set [pretrain] image_size (the timing reads no images)")
    placeholders = [Path("unused")] * images  # counted only: the image size and batch are given
    return simclr.resolve(dataclasses.replace(config, augment_on="device"), placeholders)


def seconds_per_step(config: PretrainConfig, steps: int, warmup: int = 3) -> float:
    """The median of `steps` timed steady-state steps of `pretrain`'s step for `config`, placed and
    autocast as `pretrain` places them (channels-last, its auto precision), on this machine."""
    assert config.batch_size is not None and config.image_size is not None
    torch.manual_seed(0)
    accelerator = engine.make_accelerator(config.precision, seed=0, cpu_bf16=True)
    memory_format = channels_last(accelerator.device)
    model = build_model(config).train()
    if memory_format:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config.optimizer, parameter_groups(model, config.weight_decay),  # type: ignore[arg-type]
                                lr=simclr.learning_rate(config))  # fmt: skip
    model, optimizer = accelerator.prepare(model, optimizer)
    keys = None
    if config.queue:
        keys = KeyQueue(accelerator.unwrap_model(model), config.queue, config.projection_dim,
                        config.key_momentum, autocast=accelerator.autocast)  # fmt: skip
        keys.enqueue(torch.randn(config.queue, config.projection_dim))  # full: the steady state's cost
    views = SimCLRViews(simclr.view_config(config))
    step = contrastive_step(config.temperature, memory_format, views, keys)
    side = config.image_size
    images = torch.randint(0, 256, (config.batch_size, 3, side, side), dtype=torch.uint8)
    sizes = torch.full((config.batch_size, 2), side, dtype=torch.int64)
    times = []
    for index in range(warmup + steps):
        batch = Batch(images, sizes, torch.arange(config.batch_size), seed=index)
        start = time.perf_counter()
        loss, _ = step(model, batch)
        loss.backward()
        optimizer.step()
        if keys is not None:
            keys.update(model)
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def plan(args: argparse.Namespace, recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """Every configuration's measured step time and the epochs that fill the budget."""
    images = int(args.unlabeled_images or recipe.get("benchmark", {}).get("unlabeled_images", 50_000))
    base = recipe.get("pretrain", {})
    if args.minutes:
        budget = 60 * args.minutes
    else:
        reference = pretrain_config(recipe, int(base.get("batch_size", 256)), 0, images)
        assert reference.batch_size is not None and reference.epochs is not None
        steps = reference.epochs * (images // reference.batch_size)
        budget = steps * (seconds_per_step(reference, args.calibration_steps) + args.overhead_ms / 1000)
    print(f"budget {budget / 60:.1f} min ({'--minutes' if args.minutes else 'the recipe without a queue'})")
    rows = []
    for batch in args.batches:
        for queue in args.queues:
            config = pretrain_config(recipe, batch, queue, images)
            step = seconds_per_step(config, args.calibration_steps) + args.overhead_ms / 1000
            steps_per_epoch = images // batch
            epochs = max(1, round(budget / (step * steps_per_epoch)))
            rows.append({"batch": batch, "queue": queue, "seconds_per_step": step, "epochs": epochs,
                         "planned_minutes": epochs * steps_per_epoch * step / 60})  # fmt: skip
            print(f"batch {batch} queue {queue}: {step * 1000:.0f} ms/step, {epochs} epochs", flush=True)
    return rows


def command(args: argparse.Namespace, row: dict[str, Any], out: Path) -> list[str]:
    """The label_efficiency run of one configuration: 1% of the labels, no semi-supervised rows."""
    overrides = {
        "pretrain.batch_size": row["batch"],
        "pretrain.queue": row["queue"],
        "pretrain.epochs": row["epochs"],
    }
    return [
        sys.executable, str(REPO / "benchmarks" / "label_efficiency.py"), "--recipe", str(args.recipe),
        "--fractions", "0.01", "--seeds", *map(str, args.seeds), "--semi", "--quiet", "--out", str(out),
        *(["--cache", str(args.cache)] if args.cache else []),
        *(["--unlabeled-images", str(args.unlabeled_images)] if args.unlabeled_images else []),
        *[part for key, value in overrides.items() for part in ("--override", f"{key}={value}")],
    ]  # fmt: skip


def markdown(rows: list[dict[str, Any]]) -> str:
    """One line per configuration: its time (planned and actual) and the three metrics (mean over seeds)."""
    lines = [
        "| batch | queue | epochs | ms/step | planned min | pretrain min | kNN all labels | linear probe | 1% fine-tuned |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        result = row.get("result", {})
        cells = result.get("results", {}).get("0.01", {})
        metrics = [
            f"{100 * statistics.fmean(cells[name]):.1f}" if cells.get(name) else "-" for name in METRICS
        ]
        actual = f"{result['pretrain_seconds'] / 60:.1f}" if "pretrain_seconds" in result else "-"
        lines.append(f"| {row['batch']} | {row['queue'] or 'off'} | {row['epochs']} | {1000 * row['seconds_per_step']:.0f} "
                     f"| {row['planned_minutes']:.1f} | {actual} | {' | '.join(metrics)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "cifar10-cpu.toml")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--queues", type=int, nargs="+", default=[0, 4096, 16384], help="0: queue off")
    parser.add_argument("--minutes", type=float, help="pretraining budget (default: the recipe's own run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="label subset seeds")
    parser.add_argument("--unlabeled-images", type=int, help="override the recipe's [benchmark] value")
    parser.add_argument("--calibration-steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--overhead-ms", type=float, default=0.0,
                        help="the real loop's time per step beyond the timed step (loader, trainer), added "
                        "to every configuration's: a run's wall seconds / steps - its timed step")  # fmt: skip
    parser.add_argument("--threads", type=int, help="torch threads for the timing (default: torch's)")
    parser.add_argument("--dry-run", action="store_true", help="time the steps and print the commands only")
    parser.add_argument("--cache", type=Path, help="label_efficiency's --cache (the unpacked CIFAR-10)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    rows = plan(args, recipe)
    folder = args.out / f"queue-equal-time-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        out = folder / f"b{row['batch']}-q{row['queue']}"
        row["command"] = " ".join(command(args, row, out))
        print(row["command"], flush=True)
        if not args.dry_run:
            subprocess.run(command(args, row, out), check=True)
            row["result"] = json.loads(next(out.glob("label_efficiency-*.json")).read_text())
        (folder / "queue_equal_time.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = markdown(rows)
    (folder / "queue_equal_time.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
