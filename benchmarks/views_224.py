"""The batched SimCLR views at 224 px on the CPU against the per-image PIL path, with a per-op profile.

On real photos (e.g. ``../shared/datasets/hymenoptera_data``), in one process on ``--threads``
intra-op threads (1: per core), interleaved rounds (a change of machine load hits all rows alike),
timed in CPU seconds of this process (``time.process_time``), so that other work on a shared
machine, which takes the core away, slows the rows far less than it would in wall time:

- views/s of `labelfew.views.simclr.SimCLRViews` on decoded, stored images (the store's pixels)
  against ``tests/reference/pil_views.TwoViews`` on decoded PIL photos;
- images/s from files: the streaming source (`labelfew.data.stream`, 0 workers: decode + resize
  in this process) plus the batched views, against PIL decode + two views;
- ms per view of each step of `labelfew.views.simclr.make_views` (the functions it calls, timed
  by wrapping them), so a change to one op shows where the time went.

    python benchmarks/views_224.py --data ../shared/datasets/hymenoptera_data --rounds 3

Run it with ``PYTHONPATH`` pointing at another checkout to compare two versions (A/B) in the same
minute; ``--json`` prints one JSON line for scripts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from labelfew.data.batches import EpochOrder
from labelfew.data.images import find_images
from labelfew.data.store import decode_images, stored_side
from labelfew.data.stream import DecodedFiles, StreamBatches
from labelfew.views import simclr
from labelfew.views.config import ViewConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference.pil_views import TwoViews

PROFILED = ("_Plan", "crop_weights", "resample", "color_jitter", "grayscale", "gaussian_blur", "normalize")
"""Names in `labelfew.views.simclr` whose calls the profile times (those present are wrapped)."""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="a folder of photos (searched recursively)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=64, help="photos decoded for the file rows")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = find_images(args.data)[: args.images]
    config = ViewConfig(image_size=args.image_size)
    rows = measure(paths, config, args.batch_size, args.rounds)
    if args.json:
        print(json.dumps(rows))
        return
    for name, value in rows.items():
        print(f"{name:<46} {value:10.3f}")


def measure(paths: list[Path], config: ViewConfig, batch_size: int, rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of each row (views/s, images/s) and of each op's ms per view."""
    store = decode_images(paths, stored_side(config.image_size))
    images, sizes = store.gather(torch.arange(min(batch_size, len(store))))
    views = simclr.SimCLRViews(config, torch.Generator().manual_seed(0))
    pil_views = TwoViews.from_config(config)
    photos = [Image.open(path).convert("RGB") for path in paths[:batch_size]]
    torch.manual_seed(0)

    def stream_and_views() -> None:
        order = EpochOrder(len(paths), batch_size, drop_last=False, shuffle=False)
        for batch in StreamBatches(DecodedFiles(paths, stored_side(config.image_size)), order, "cpu", 0):
            views(batch.images, batch.sizes, batch.generator())

    calls: dict[str, tuple[Callable[[], Any], int]] = {
        "batched views, views/s": (lambda: views(images, sizes), 2 * len(images)),
        "PIL views, views/s": (lambda: [pil_views(photo) for photo in photos], 2 * len(photos)),
        "stream + batched views (1 core), images/s": (stream_and_views, len(paths)),
        "PIL decode + two views (1 core), images/s": (
            lambda: [pil_views(Image.open(path).convert("RGB")) for path in paths],
            len(paths),
        ),
    }
    results: dict[str, list[float]] = defaultdict(list)
    for call, _ in calls.values():
        call()  # warm-up
    for _ in range(rounds):
        for name, (call, count) in calls.items():
            start = time.process_time()
            call()
            results[name].append(count / (time.process_time() - start))
        for name, milliseconds in profile(views, images, sizes).items():
            results[name].append(milliseconds)
    medians = {name: statistics.median(values) for name, values in results.items()}
    medians["batched / PIL views"] = medians["batched views, views/s"] / medians["PIL views, views/s"]
    medians["stream + views / PIL decode + views"] = (
        medians["stream + batched views (1 core), images/s"]
        / medians["PIL decode + two views (1 core), images/s"]
    )
    return medians


def profile(
    views: simclr.SimCLRViews, images: torch.Tensor, sizes: torch.Tensor, calls: int = 3
) -> dict[str, float]:
    """ms per view spent in each of `PROFILED` (and in total) over ``calls`` calls of ``views``."""
    spent: dict[str, float] = defaultdict(float)
    originals = {name: getattr(simclr, name) for name in PROFILED if hasattr(simclr, name)}

    def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] += time.process_time() - start

        return call

    plan = originals.pop("_Plan", None)
    build = None if plan is None else plan.__dict__["build"]  # the classmethod itself
    try:
        for name, function in originals.items():
            setattr(simclr, name, timed(name, function))
        if plan is not None:
            plan.build = classmethod(timed("_Plan", build.__func__))
        start = time.process_time()
        for _ in range(calls):
            views(images, sizes)
        spent["total"] = time.process_time() - start
    finally:
        for name, function in originals.items():
            setattr(simclr, name, function)
        if plan is not None:
            plan.build = build
    view_count = 2 * len(images) * calls
    return {f"ms/view {name}": 1000 * seconds / view_count for name, seconds in spent.items()}


if __name__ == "__main__":
    main()
