"""Host syncs per pretraining step: `labelfew pretrain`'s own loop under sync debug mode.

Runs the function behind `labelfew pretrain` (``pretrain.run``) on a seeded sample of a folder,
for ``--epochs`` epochs of ``--steps-per-epoch`` steps, with its step function wrapped so that each
call marks a step boundary. From the first step on, ``torch.cuda.set_sync_debug_mode("warn")``
makes every host-device synchronisation raise a warning; the warnings between two marks belong to
one training iteration (forward, NT-Xent, backward, optimizer and schedule step, the log flush when
it is due, and making the next batch). Each iteration is classed as

  first      the first step (cuDNN autotuning and lazy initialisation may sync once);
  log        a step at which the trainer reads the losses back (every `log_every` steps): target 1;
  epoch_end  the last step of an epoch (epoch loss, checkpoint, the next epoch's first batch);
  last       the last step and everything after it until ``run`` returns (artifacts);
  plain      every other step: target 0.

It also records the seconds of each iteration, so that `gpu_check.sh` can size a run (the
epoch-end overhead and the start-up time until the first step). On a machine without CUDA the
same loop runs and is timed, but there are no CUDA syncs to count: the record says "not
applicable on CPU".

    python benchmarks/sync_check.py --data cifar10_jpg/train --recipe recipes/cifar10-resnet18.toml
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

# labelfew imports: every one is here, so that a module that moves is fixed in one place.
# `pretrain_module` must be the module whose `run` builds the step through its global
# `contrastive_step` (the name is replaced there while the check runs).
from labelfew.config import PretrainConfig, build_config, load_recipe
from labelfew.data.images import find_images
from labelfew.engine import Trainer
from labelfew.stages import pretrain as pretrain_module

SYNC_MESSAGE = "synchroniz"  # "called a synchronizing CUDA operation"
TARGETS = {"plain": 0, "log": 1}
NOT_APPLICABLE = "not applicable on CPU: no CUDA syncs to count (the loop ran and was timed)"


def main() -> None:
    args = parse_arguments()
    record = check(args)
    text = json.dumps(record, indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(summary_line(record))
    if record["status"] == "failed":
        sys.exit(1)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--recipe", type=Path, help="TOML recipe, as for labelfew pretrain")
    parser.add_argument("--arch", help="override the recipe's arch (test_resnet for a CPU smoke run)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps-per-epoch", type=int, default=11)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--out", type=Path, help="JSON record")
    return parser.parse_args()


def check(args: argparse.Namespace) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    recorded: list[warnings.WarningMessage] = []
    marks: list[tuple[float, int]] = []  # (time, warnings recorded so far) at each step call
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        folder = sample_folder(args.data, args.batch_size * args.steps_per_epoch, Path(temporary) / "images")
        images = len(find_images(folder, follow_links=True))  # a folder of links
        config = build_config(
            PretrainConfig,
            load_recipe(args.recipe),
            data=folder,
            follow_links=True,
            out=Path(temporary) / "run",
            arch=args.arch,
            batch_size=args.batch_size,
            epochs=args.epochs,
            warmup_epochs=args.epochs / 10,  # a recipe's 10 warmup epochs exceed a 2-epoch run
            precision=args.precision,
            augment_on="device",
            restart=True,
            quiet=True,
        )
        with warnings.catch_warnings(record=True) as caught, counting_steps(marks, caught, cuda):
            warnings.simplefilter("always")
            pretrain_module.run(config)
            recorded = list(caught)
        finished = time.perf_counter()
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    if not marks:
        return {
            "status": "failed",
            "reason": "the step wrapper was never called: pretrain.run no longer builds its step "
            "through the module's contrastive_step; update benchmarks/sync_check.py",
        }
    return summarise(args, recorded, marks, started, finished, cuda, images)


def sample_folder(source: Path, count: int, target: Path) -> Path:
    """A flat folder of links to a seeded sample of ``count`` images under ``source``."""
    paths = find_images(source)
    if len(paths) > count:
        paths = sorted(random.Random(0).sample(paths, count))
    target.mkdir(parents=True)
    for index, path in enumerate(paths):
        (target / f"{index:06d}{path.suffix.lower()}").symlink_to(path.resolve())
    return target


@contextlib.contextmanager
def counting_steps(
    marks: list[tuple[float, int]], caught: list[warnings.WarningMessage] | None, cuda: bool
) -> Iterator[None]:
    """Replaces the pretrain module's `contrastive_step` with one whose steps mark their start."""
    original: Callable[..., Any] = pretrain_module.contrastive_step
    assert caught is not None

    def wrapped_factory(*args: Any, **kwargs: Any) -> Callable[..., Any]:
        step = original(*args, **kwargs)

        def counted(model: Any, batch: Any) -> Any:
            if not marks:
                warnings.simplefilter("always")  # again: setup code may have added filters since
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("warn")
            marks.append((time.perf_counter(), len(caught)))
            return step(model, batch)

        return counted

    pretrain_module.contrastive_step = wrapped_factory
    try:
        yield
    finally:
        pretrain_module.contrastive_step = original
        if cuda:
            torch.cuda.set_sync_debug_mode(0)


def summarise(
    args: argparse.Namespace,
    recorded: list[warnings.WarningMessage],
    marks: list[tuple[float, int]],
    started: float,
    finished: float,
    cuda: bool,
    images: int,
) -> dict[str, Any]:
    log_every = int(getattr(Trainer, "log_every", 10))
    steps_per_epoch = max(1, images // args.batch_size)
    bounds = [*marks, (finished, len(recorded))]
    steps: list[dict[str, Any]] = []
    everywhere: collections.Counter[str] = collections.Counter()
    for index in range(len(marks)):
        (begin, first), (end, last) = bounds[index], bounds[index + 1]
        number = index + 1
        if number == len(marks):
            kind = "last"
        elif number == 1:
            kind = "first"
        elif number % steps_per_epoch == 0:
            kind = "epoch_end"
        elif number % log_every == 0:
            kind = "log"
        else:
            kind = "plain"
        places = collections.Counter(
            f"{Path(w.filename).name}:{w.lineno}" for w in recorded[first:last] if is_sync(w)
        )
        everywhere.update(places)
        steps.append(
            {
                "step": number,
                "kind": kind,
                "syncs": sum(places.values()),
                "seconds": end - begin,
                "where": dict(places.most_common()),
            }
        )
    by_kind: dict[str, list[int]] = collections.defaultdict(list)
    for step in steps:
        by_kind[step["kind"]].append(step["syncs"])
    plain_seconds = [s["seconds"] for s in steps if s["kind"] in ("plain", "log")] or [float("nan")]
    median = statistics.median(plain_seconds)
    epoch_end = [s["seconds"] - median for s in steps if s["kind"] == "epoch_end"]
    met = all(max(by_kind.get(kind, [0]), default=0) <= target for kind, target in TARGETS.items())
    record: dict[str, Any] = {
        "status": "ok" if cuda else "not applicable",
        "applicable": cuda,
        "reason": None if cuda else NOT_APPLICABLE,
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "settings": {
            key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
        },
        "images": images,
        "steps_per_epoch": steps_per_epoch,
        "log_every": log_every,
        "targets": TARGETS,
        "target_met": met if cuda else None,
        "syncs_by_kind": dict(by_kind),
        "syncs_total": sum(s["syncs"] for s in steps),
        "where": dict(everywhere.most_common(20)),
        "other_warnings": sorted({str(w.message)[:200] for w in recorded if not is_sync(w)})[:10],
        "step_seconds_median": median,
        "epoch_end_overhead_seconds": statistics.mean(epoch_end) if epoch_end else None,
        "startup_seconds": process_age(marks[0][0]),
        "check_seconds": finished - started,
        "steps": steps,
    }
    return record


def is_sync(warning: warnings.WarningMessage) -> bool:
    return SYNC_MESSAGE in str(warning.message)


def process_age(at: float) -> float:
    """Seconds from this process's start (Linux /proc; else from this script's main) to ``at``."""
    now = time.perf_counter()
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age_now = uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")
    return age_now - (now - at)


def summary_line(record: dict[str, Any]) -> str:
    if record["status"] == "failed":
        return f"sync check failed: {record['reason']}"
    counts = {kind: values for kind, values in record["syncs_by_kind"].items()}
    verdict = (
        record["reason"]
        if not record["applicable"]
        else f"target (plain 0, log 1) {'met' if record['target_met'] else 'MISSED'}"
    )
    return (
        f"sync check: {len(record['steps'])} steps, syncs by kind {counts}, median step "
        f"{record['step_seconds_median'] * 1000:.1f} ms; {verdict}; where: {record['where']}"
    )


if __name__ == "__main__":
    main()
