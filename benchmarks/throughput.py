"""Training throughput: labelfew's batched data path against lightly 1.6.0 and the bare model step.

Measures steady-state views/s of one SimCLR training step (forward of both views, NT-Xent,
backward, LARS update), all in one process, on the same model, batch and device:

  (a) labelfew, store: images decoded once into a uint8 store (`labelfew.data.store`), two views
      per image made on the device (`labelfew.views.simclr`), `pretrain.contrastive_step`
      (NT-Xent) and labelfew's LARS;
  (b) lightly 1.6.0 as its examples use it: `SimCLRTransform` in a standard DataLoader over a
      `LightlyDataset`, one forward pass per view, its `NTXentLoss` and its `LARS` (needs
      `pip install .[bench]`);
  (c) the bare step: the same step as (a) on pre-made tensors already on the device (the bound);
  (d) the per-image PIL path (`tests/reference/pil_views.TwoViews` in DataLoader workers), what
      `pretrain --augment-on workers` was before the streaming source;
  (e) labelfew, stream: DataLoader workers that only decode and resize (`labelfew.data.stream`),
      the same views as (a) made on the device: `pretrain --augment-on workers`;
  (f) labelfew, stream + device decode: the workers only read the files' bytes, and the JPEGs of
      each batch are decoded by `torchvision.io.decode_jpeg` on the training device (batched
      nvJPEG on CUDA; `labelfew.data.device_decode`, `pretrain --decode-on device`).

Any row may be measured again with the step changed, as one more row: `NAME+VARIANT[+VARIANT]`
with the variants `channels_last` (model and views in channels-last memory format), `bf16` (bf16
autocast; on a CPU only where it has native bf16 instructions, checked by a try-run, else the row
says why not) and `compile` (`torch.compile` of the model), e.g. for the faster CPU step of issue 27:

    python benchmarks/throughput.py --arch resnet18 --device cpu --rows \
        labelfew,lightly,labelfew+channels_last,labelfew+bf16,labelfew+channels_last+bf16 --skip-data-only

On a GPU every row runs as `pretrain` does there (bf16 autocast, channels-last), lightly's too, so
the rows differ only in their data path, loss, optimizer and lightly's one forward pass per view.
On the CPU the plain rows run float32 in the contiguous format, as lightly's examples do; `pretrain`
itself now runs its CPU step as `labelfew+channels_last`, and as `labelfew+channels_last+bf16` on
CPUs with native bf16 (benchmarks/RESULTS.md, issue 27). Rows are timed in
interleaved rounds (a change of machine load hits all alike) and the median round is reported.
A second table measures the data paths alone (without a model): views/s of the view makers, and
images/s of the streaming source's decoding alone with 1 and 2 workers and with the views made in
the training process. Prints rich tables and
writes JSON into benchmarks/results/.

    python benchmarks/throughput.py --arch resnet18 --image-size 32 --batch-size 512 --data FOLDER
    python benchmarks/throughput.py --arch test_resnet --image-size 32 --batch-size 256 --device cpu

Without --data a synthetic folder is written (JPEGs: 32 px for sizes up to 64, else 500 x 375).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader

from labelfew import engine
from labelfew.config import PretrainConfig
from labelfew.data.batches import Batch, EpochOrder
from labelfew.data.device_decode import DeviceDecodedBatches, RawFiles
from labelfew.data.images import ImageDataset, collate, find_images
from labelfew.data.store import DEFAULT_MEMORY_BUDGET, MemoryBatches, decode_images, store_device, stored_side
from labelfew.data.stream import DecodedFiles, StreamBatches
from labelfew.optim import build_optimizer, parameter_groups, scaled_learning_rate
from labelfew.spec import SMALL_IMAGE_SIDE
from labelfew.stages.pretrain import build_model, contrastive_step
from labelfew.views.config import ViewConfig
from labelfew.views.simclr import PairViews, SimCLRViews

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference.pil_views import TwoViews

console = Console(width=None if sys.stdout.isatty() else 150)
TEMPERATURE = 0.5
RESULTS = Path(__file__).resolve().parent / "results"
ROW_LABELS = {
    "labelfew": "(a) labelfew batched",
    "lightly": "(b) lightly 1.6.0",
    "bare": "(c) bare step",
    "cpu-path": "(d) PIL per image (reference)",
    "stream": "(e) labelfew stream",
    "stream-device": "(f) stream, decode on device",
}
VARIANTS = ("channels_last", "bf16", "compile")
"""What `--rows NAME+VARIANT` changes in a row's step (module docstring)."""


def main() -> None:
    args = parse_arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    precision = resolve_precision(args.precision, device)
    with contextlib.ExitStack() as stack:
        folder = args.data or write_synthetic_folder(
            Path(stack.enter_context(tempfile.TemporaryDirectory())), args.image_size, args.synthetic_count
        )
        paths = choose_paths(folder, args.limit)
        flat = link_flat_folder(paths, Path(stack.enter_context(tempfile.TemporaryDirectory())))
        bench = Bench(args, device, precision, paths, flat)
        rows = bench.measure({name: bench.prepare_row(name) for name in args.rows})
        data_rows = [] if args.skip_data_only else bench.data_only_rows()
    report(args, device, precision, len(paths), rows, data_rows)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch", default="resnet18", help="timm model name (test_resnet for a quick CPU run)"
    )
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256, help="images per step (two views each)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row and round")
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds over all rows, interleaved; the median round counts"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (workers, cuDNN autotune)")
    parser.add_argument(
        "--data", type=Path, help="folder of images (searched recursively); default: synthetic"
    )
    parser.add_argument("--limit", type=int, help="use this many images of --data, a seeded random sample")
    parser.add_argument("--synthetic-count", type=int, default=2048)
    parser.add_argument(
        "--workers", type=int, help="DataLoader workers for (b) and (d); default: as pretrain"
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "no"])
    parser.add_argument("--memory-budget", type=float, default=DEFAULT_MEMORY_BUDGET / 2**30, help="GiB")
    parser.add_argument(
        "--rows",
        default="labelfew,lightly,bare,cpu-path,stream",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        help="comma-separated subset of labelfew, lightly, bare, cpu-path, stream, stream-device; each may "
        f"take variants as NAME+VARIANT (variants: {', '.join(VARIANTS)})",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile every row's model (pretrain --compile)"
    )
    parser.add_argument("--skip-data-only", action="store_true", help="skip the data-path-only table")
    parser.add_argument("--stream-images", type=int, default=128, help="files the streaming rows decode")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    unknown = {row for row in args.rows if row.split("+")[0] not in ROW_LABELS}
    unknown |= {row for row in args.rows if not set(row.split("+")[1:]) <= set(VARIANTS)}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}")
    return args


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return precision


def write_synthetic_folder(root: Path, image_size: int, count: int) -> Path:
    """Smooth random colour images as JPEG files: CIFAR-like at <= 64 px, photo-sized above."""
    width, height = (32, 32) if image_size <= SMALL_IMAGE_SIDE else (500, 375)
    rng = np.random.default_rng(0)
    for index in range(count):
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, size=(height, width, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{index:06d}.jpg", quality=90)
    return root


def choose_paths(folder: Path, limit: int | None) -> list[Path]:
    paths = find_images(folder)
    if limit is not None and limit < len(paths):
        paths = sorted(random.Random(0).sample(paths, limit))
    return paths


def link_flat_folder(paths: list[Path], root: Path) -> Path:
    """A flat folder of symlinks to `paths`: what lightly's LightlyDataset reads."""
    for index, path in enumerate(paths):
        (root / f"{index:06d}{path.suffix.lower()}").symlink_to(path.resolve())
    return root


class Runner(NamedTuple):
    """One row ready to time: endless batches, a training step on one batch, notes for the table."""

    batches: Iterator[Any]
    train: Callable[[Any], torch.Tensor]
    notes: dict[str, Any]


class Bench:
    """Builds each row's model, data and step, and times it."""

    def __init__(
        self, args: argparse.Namespace, device: torch.device, precision: str, paths: list[Path], flat: Path
    ):
        self.args = args
        self.device = device
        self.precision = precision
        self.paths = paths
        self.flat = flat
        size = args.image_size
        self.view = ViewConfig(image_size=size, color_strength=0.5 if size <= SMALL_IMAGE_SIDE else 1.0)
        self.channels_last = device.type == "cuda"
        self.workers = engine.default_workers(args.workers)

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        config = PretrainConfig(
            data=self.flat,
            arch=self.args.arch,
            image_size=self.args.image_size,
            small_stem=self.args.image_size <= SMALL_IMAGE_SIDE,
        )
        model = build_model(config).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.args.compile:  # as `labelfew pretrain --compile`; every row, lightly's too
            model.compile()
        return model

    def autocast(self, precision: str | None = None) -> contextlib.AbstractContextManager[Any]:
        enabled = (precision or self.precision) == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def prepare_row(self, name: str) -> Runner | dict[str, Any]:
        """The row's batches, training step and notes; a status dict when it cannot run."""
        console.print(f"[bold]{name}[/] ...")
        base, *variants = name.split("+")
        refused = self.bf16_refusal() if "bf16" in variants else None
        if refused:
            return {"status": refused}
        try:
            with self.variant(variants):
                runner: Runner = getattr(self, f"row_{base.replace('-', '_')}")()
        except ModuleNotFoundError as error:
            if base != "lightly":
                raise
            return {"status": f"lightly not installed (pip install .[bench]): no module {error.name}"}
        if variants:
            runner.notes["variant"] = "+".join(variants)
        for _ in range(self.args.warmup):
            runner.train(next(runner.batches))
        return runner

    @contextlib.contextmanager
    def variant(self, variants: list[str]) -> Iterator[None]:
        """The row built inside takes channels-last, bf16 autocast and `torch.compile` from `variants`
        (on top of the run's settings); each row's step keeps what it was built with."""
        saved = self.channels_last, self.precision, self.args.compile
        self.channels_last = self.channels_last or "channels_last" in variants
        self.precision = "bf16" if "bf16" in variants else self.precision
        self.args.compile = self.args.compile or "compile" in variants
        try:
            yield
        finally:
            self.channels_last, self.precision, self.args.compile = saved

    def bf16_refusal(self) -> str | None:
        """Why bf16 autocast is not measured here (None: it is): on a CPU, without native bf16
        instructions (AVX512-BF16 or AMX, `engine.native_cpu_bf16`, pretrain's check) it would be
        emulated and slow, and a bf16 convolution must run (try-run)."""
        if self.device.type != "cpu":
            return None
        capability = torch.backends.cpu.get_cpu_capability()
        if not engine.native_cpu_bf16():
            return f"no native bf16 on this CPU ({capability}): not measured"
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                nn.Conv2d(3, 8, 3)(torch.rand(2, 3, 8, 8)).sum().item()
        except RuntimeError as error:
            return f"bf16 autocast failed on this CPU ({capability}): {str(error).splitlines()[0]}"
        return None

    def measure(self, runners: dict[str, Runner | dict[str, Any]]) -> list[dict[str, Any]]:
        """Times every row for `--steps` steps, `--repeats` times round-robin, so that a change of
        machine load hits every row alike; reports the median round."""
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in runners}
        for _ in range(self.args.repeats):
            for name, runner in runners.items():
                if isinstance(runner, Runner):
                    rounds[name].append(self.time_steps(runner))
        rows = []
        for name, runner in runners.items():
            if not isinstance(runner, Runner):
                rows.append({"row": name, **runner})
                continue
            rates = sorted(result["views_per_second"] for result in rounds[name])
            rows.append(
                {
                    "row": name,
                    "views_per_second": statistics.median(rates),
                    "rounds_views_per_second": [result["views_per_second"] for result in rounds[name]],
                    "final_loss": rounds[name][-1]["final_loss"],
                    "peak_memory_gib": max(result["peak_memory_gib"] for result in rounds[name]),
                    **runner.notes,
                }
            )
        return rows

    def labelfew_step(
        self, model: nn.Module, views: PairViews | None = None
    ) -> Callable[[Batch], torch.Tensor]:
        """`pretrain.contrastive_step` with labelfew's LARS; ``views`` None takes premade views from
        ``batch.images`` (two stacked float batches), for the rows whose views are made elsewhere."""
        lr = scaled_learning_rate(None, self.args.batch_size, "sqrt")
        optimizer = build_optimizer("lars", parameter_groups(model, 1e-6), lr=lr)
        step = contrastive_step(TEMPERATURE, self.channels_last, views or premade_views)
        precision = self.precision  # the row's (`variant`)

        def train(batch: Batch) -> torch.Tensor:
            with self.autocast(precision):
                loss, _ = step(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        return train

    def row_labelfew(self) -> Runner:
        start = time.perf_counter()
        store = decode_images(
            self.paths, stored_side(self.args.image_size), budget=int(self.args.memory_budget * 2**30)
        )
        decode_seconds = time.perf_counter() - start
        store = store.to(store_device(store.nbytes, self.device))
        batches = MemoryBatches(store, EpochOrder(len(store), self.args.batch_size), self.device)
        notes = {"decode_seconds": decode_seconds, "store_device": str(store.pixels.device)}
        return Runner(cycle(batches), self.labelfew_step(self.model(), SimCLRViews(self.view)), notes)

    def row_stream(self) -> Runner:
        files = DecodedFiles(self.paths, stored_side(self.args.image_size))
        batches = StreamBatches(
            files, EpochOrder(len(self.paths), self.args.batch_size), self.device, self.workers
        )
        return Runner(
            cycle(batches),
            self.labelfew_step(self.model(), SimCLRViews(self.view)),
            {"workers": self.workers},
        )

    def row_stream_device(self) -> Runner:
        files = RawFiles(self.paths, stored_side(self.args.image_size))
        batches = DeviceDecodedBatches(
            files, EpochOrder(len(self.paths), self.args.batch_size), self.device, self.workers
        )
        return Runner(
            cycle(batches),
            self.labelfew_step(self.model(), SimCLRViews(self.view)),
            {"workers": self.workers, "decode": f"on {self.device.type}"},
        )

    def row_bare(self) -> Runner:
        shape = (self.args.batch_size, 3, self.args.image_size, self.args.image_size)
        generator = torch.Generator(device=self.device).manual_seed(0)
        views = torch.randn((2, *shape), device=self.device, generator=generator)
        return Runner(itertools.repeat(premade_batch(views)), self.labelfew_step(self.model()), {})

    def row_cpu_path(self) -> Runner:
        loader = DataLoader(
            ImageDataset(self.paths, TwoViews.from_config(self.view)),
            batch_size=self.args.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.workers > 0,
        )
        batches = (
            premade_batch(torch.stack([v.to(self.device, non_blocking=True) for v in b["images"]]))
            for b in cycle(loader)
        )
        return Runner(batches, self.labelfew_step(self.model()), {"workers": self.workers})

    def row_lightly(self) -> Runner:
        import lightly
        from lightly.data import LightlyDataset
        from lightly.loss import NTXentLoss
        from lightly.transforms import SimCLRTransform
        from lightly.utils.lars import LARS

        transform = SimCLRTransform(
            input_size=self.args.image_size,
            cj_strength=self.view.color_strength,
            min_scale=self.view.min_scale,
            gaussian_blur=self.view.blur_prob if self.view.blur_enabled else 0.0,
        )
        dataset = LightlyDataset(input_dir=str(self.flat), transform=transform)
        loader = DataLoader(
            dataset,
            batch_size=self.args.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.workers > 0,
        )
        model = self.model()
        criterion = NTXentLoss(temperature=TEMPERATURE)
        lr = scaled_learning_rate(None, self.args.batch_size, "sqrt")
        optimizer = LARS(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-6)
        channels_last, precision = self.channels_last, self.precision  # the row's (`variant`)

        def train(batch: Any) -> torch.Tensor:
            first, second = (view.to(self.device, non_blocking=True) for view in batch[0])
            if channels_last:
                first = first.contiguous(memory_format=torch.channels_last)
                second = second.contiguous(memory_format=torch.channels_last)
            with self.autocast(precision):
                loss = criterion(model(first).float(), model(second).float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            return loss.detach()

        return Runner(cycle(loader), train, {"workers": self.workers, "lightly": lightly.__version__})

    def time_steps(self, runner: Runner) -> dict[str, Any]:
        """Views/s over `--steps` steps; losses stay on the device until the end."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.synchronize()
        start = time.perf_counter()
        losses = [runner.train(next(runner.batches)) for _ in range(self.args.steps)]
        self.synchronize()
        seconds = time.perf_counter() - start
        views = 2 * self.args.batch_size * self.args.steps
        return {
            "views_per_second": views / seconds,
            "final_loss": float(losses[-1]),
            "peak_memory_gib": self.peak_memory(),
        }

    def data_only_rows(self) -> list[dict[str, Any]]:
        """Each data path alone: the view makers (views/s) and the streaming source (images/s)."""
        rows = []
        count = max(self.args.batch_size, 64)
        store = decode_images(self.paths[:count], stored_side(self.args.image_size))
        images, sizes = store.gather(torch.arange(min(self.args.batch_size, len(store))))
        images = images.to(self.device)
        views = SimCLRViews(self.view, torch.Generator().manual_seed(0))
        rows.append(
            {
                "path": "labelfew batched views",
                **self.time_calls(lambda: views(images, sizes), 2 * len(images)),
            }
        )
        with contextlib.suppress(ModuleNotFoundError):
            kornia_views = kornia_two_views(self.view)
            rows.append(
                {
                    "path": "kornia 0.9 AugmentationSequential (on the padded batch)",
                    **self.time_calls(lambda: kornia_views(images), 2 * len(images)),
                }
            )
        photos = [Image.open(path).convert("RGB") for path in self.paths[:64]]
        two_views = TwoViews.from_config(self.view)
        rows.append(
            {
                "path": "PIL per image (decoded photos, 1 process)",
                **self.time_calls(lambda: [two_views(p) for p in photos], 2 * len(photos)),
            }
        )
        with contextlib.suppress(ModuleNotFoundError):
            from lightly.transforms import SimCLRTransform

            blur = self.view.blur_prob if self.view.blur_enabled else 0.0
            lightly_views = SimCLRTransform(
                input_size=self.args.image_size, cj_strength=self.view.color_strength, gaussian_blur=blur
            )
            rows.append(
                {
                    "path": "lightly SimCLRTransform (PIL, 1 process)",
                    **self.time_calls(lambda: [lightly_views(p) for p in photos], 2 * len(photos)),
                }
            )
        return rows + self.stream_rows()

    def stream_rows(self) -> list[dict[str, Any]]:
        """Images/s from files: PIL decode + two views per image in one process, the streaming
        source's decode + resize alone with 1 and 2 workers, and with the batched views made in the
        training process (0 workers: everything on one core)."""
        paths = self.paths[: self.args.stream_images]
        view_pil = TwoViews.from_config(self.view)
        rows = [{"path": "PIL decode + two views (1 process)", "unit": "images/s", "cores": 1,
                 **self.time_calls(lambda: [view_pil(Image.open(p).convert("RGB")) for p in paths], len(paths), 3)}]  # fmt: skip
        simclr = SimCLRViews(self.view)
        for workers, make_views in ((1, False), (2, False), (0, True), (1, True)):
            order = EpochOrder(len(paths), self.args.batch_size, drop_last=False, shuffle=False)
            batches = StreamBatches(
                DecodedFiles(paths, stored_side(self.args.image_size)), order, self.device, workers
            )

            def run(batches: StreamBatches = batches, make_views: bool = make_views) -> None:
                for batch in batches:
                    if make_views:
                        simclr(batch.images, batch.sizes, batch.generator())

            name = "stream decode + resize" + (" + batched views" if make_views else "")
            cores = workers + (1 if make_views else 0) or 1
            rows.append({"path": f"{name}, {workers} workers", "unit": "images/s", "cores": cores,
                         **self.time_calls(run, len(paths), 3)})  # fmt: skip
        return rows

    def time_calls(self, call: Callable[[], Any], views: int, repeats: int = 5) -> dict[str, Any]:
        call()
        self.synchronize()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            self.synchronize()
            seconds.append(time.perf_counter() - start)
        return {
            "views_per_second": views / sorted(seconds)[repeats // 2],
            "seconds_median": sorted(seconds)[repeats // 2],
        }

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_memory(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS so far


def kornia_two_views(config: ViewConfig) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The same view recipe from kornia.augmentation (measured only; kornia is not a dependency)."""
    import kornia.augmentation as augmentation

    strength = config.color_strength
    steps: list[nn.Module] = [
        augmentation.RandomResizedCrop((config.image_size, config.image_size), scale=(config.min_scale, 1.0)),
        augmentation.RandomHorizontalFlip(p=config.flip_prob),
        augmentation.ColorJitter(
            0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength, p=config.color_jitter_prob
        ),
        augmentation.RandomGrayscale(p=config.grayscale_prob),
    ]
    if config.blur_enabled:
        kernel = config.blur_kernel_size
        steps.append(augmentation.RandomGaussianBlur((kernel, kernel), config.blur_sigma, p=config.blur_prob))
    steps.append(augmentation.Normalize(mean=torch.tensor(config.mean), std=torch.tensor(config.std)))
    pipeline = augmentation.AugmentationSequential(*steps)

    def two_views(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = images.float() / 255
        return pipeline(pixels), pipeline(pixels)

    return two_views


def premade_views(
    images: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views a premade batch carries (see `premade_batch`)."""
    return images[0], images[1]


def premade_batch(views: torch.Tensor) -> Batch:
    """A batch whose ``images`` are two stacked float view batches, read by `premade_views`."""
    count = views.shape[1]
    return Batch(views, torch.zeros(count, 2, dtype=torch.int64), torch.arange(count))


def cycle(iterable: Iterable[Any]) -> Iterator[Any]:
    """Endless iteration over a re-iterable (a DataLoader or EpochBatches: a new epoch each pass)."""
    epoch = 0
    while True:
        if hasattr(iterable, "set_epoch"):
            iterable.set_epoch(epoch)
        yield from iterable
        epoch += 1


def report(
    args: argparse.Namespace,
    device: torch.device,
    precision: str,
    image_count: int,
    rows: list[dict[str, Any]],
    data_rows: list[dict[str, Any]],
) -> None:
    rates = {row["row"]: row.get("views_per_second") for row in rows}
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    )
    title = (
        f"{args.arch} @ {args.image_size} px, batch {args.batch_size}, {device_name}, precision {precision}, "
        f"{image_count} images, median of {args.repeats} interleaved rounds of {args.steps} steps"
    )
    table = Table(title=title)
    for column in ("row", "views/s", "vs lightly (b)", "vs bare step (c)", "peak memory GiB", "notes"):
        table.add_column(column, justify="left" if column in ("row", "notes") else "right")
    for row in rows:
        rate = row.get("views_per_second")
        notes = row.get("status") or ", ".join(
            f"{k} {v}" for k, v in row.items() if k in ("workers", "store_device", "decode")
        )
        base, *variants = row["row"].split("+")
        table.add_row(
            " + ".join([ROW_LABELS[base], *variants]),
            f"{rate:,.0f}" if rate else "-",
            ratio(rate, rates.get("lightly")),
            ratio(rate, rates.get("bare")),
            f"{row['peak_memory_gib']:.2f}" if "peak_memory_gib" in row else "-",
            escape(notes),
        )
    console.print(table)
    if data_rows:
        data_table = Table(title=f"data path alone, {args.image_size} px, batch {args.batch_size}")
        data_table.add_column("path")
        data_table.add_column("rate", justify="right")
        data_table.add_column("unit")
        data_table.add_column("per core", justify="right")
        for row in data_rows:
            rate, cores = row["views_per_second"], row.get("cores")
            per_core = f"{rate / cores:,.0f}" if cores else "-"
            data_table.add_row(row["path"], f"{rate:,.0f}", row.get("unit", "views/s"), per_core)
        console.print(data_table)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = (
        args.out / f"throughput-{device.type}-{args.arch}-{args.image_size}px-b{args.batch_size}-{stamp}.json"
    )
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": device_name,
        "precision": precision,
        "images": image_count,
        "settings": settings,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": os.getloadavg(),
        "rows": rows,
        "data_only": data_rows,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    console.print(f"wrote {path}")


def ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if value and reference else "-"


if __name__ == "__main__":
    main()
