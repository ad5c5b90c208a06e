"""What every command's config shares: validation when it is made, and the options several commands take."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from labelfew.errors import UserError
from labelfew.options import Option, validate


class Validated:
    """Configs check their choices and ranges when they are made (`labelfew.options.validate`)."""

    def __post_init__(self) -> None:
        validate(self)


def as_paths(value: str | Path | Iterable[str | Path] | None) -> tuple[Path, ...]:
    """A repeatable path option as a tuple of paths: one path (a recipe's string, a caller's `Path`
    from before the option repeated) is one file, so every reader sees the same type."""
    if value is None:
        return ()
    if isinstance(value, str | Path):
        return (Path(value),)
    return tuple(Path(each) for each in value)


def require_init(init: str | None, **flags: str | None) -> None:
    """Refuses a flag that describes `--init`'s weights (`--init-prefix`, `--arch`) without `--init`."""
    for name, value in flags.items():
        if value is not None and init is None:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {value}: only with --init (it describes the --init weights)")


MAX_CHANNELS = 64
"""The most input channels `--channels` takes (a multi-channel microscope TIFF has a handful; more is
a hyperspectral cube, which a 2-D conv backbone is not the model for)."""


def parse_channels(value: str) -> int | None:
    """`--channels`: None for ``auto``, else the count.

    Raises:
        UserError: not ``auto`` nor a count from 1 to `MAX_CHANNELS`.
    """
    if value == "auto":
        return None
    count = int(value) if value.isdigit() else 0
    if not 1 <= count <= MAX_CHANNELS:
        raise UserError(
            f"--channels {value}: use auto, 1 (grayscale), 3 (RGB) or a channel count up to {MAX_CHANNELS}"
        )
    return count


def parse_window(value: str | None) -> tuple[float, float] | None:
    """`--window LOW,HIGH` as two finite floats with LOW < HIGH (None when not given: auto).

    Raises:
        UserError: not two finite numbers in increasing order.
    """
    if value is None:
        return None
    parts = value.split(",")
    try:
        low, high = (float(part) for part in parts)
    except ValueError:
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UserError(
            f"--window {value}: give LOW,HIGH, two numbers with LOW < HIGH in the images' own units "
            "(e.g. --window 0,4095 for 12-bit images)"
        )
    return low, high


# Options that several commands share, declared once.
QUIET = Option(toggle=False, help="Log lines instead of progress bars.")
FOLLOW_LINKS = Option(
    toggle=False,
    help="Follow links to folders out of the image folder (each folder is read once, so link loops "
    "end); without it they are skipped and counted. Links to image files are always followed.",
)
SKIP_BAD = Option(
    toggle=False,
    help="Leave out labelled images that cannot be decoded (counted and named) instead of stopping.",
)
LABEL_DELIMITER = Option(
    help="Separates the classes of a multi-label CSV's `path,labels` rows (``scratch|dent``); a `label` "
    "value holding it makes the file multi-label too (README: Multi-label images).",
)
SEED = Option(
    minimum=0,
    below=2**32,
    hint="use a value from 0 to 4294967295 (numpy's and torch's seed range)",
    help="Random seed (model init, data order, augmentations, splits).",
)
MAX_IMAGE_SIDE = 1024
"""The largest `--image-size`: 21× the pixels of SimCLR's 224, past what a contrastive batch fits in
GPU memory (activations grow with the side squared); a larger value is a typo that would otherwise
try to allocate terabytes after the images are read."""
IMAGE_SIZE = Option(
    minimum=8,
    maximum=MAX_IMAGE_SIDE,
    hint=f"use a side from 8 to {MAX_IMAGE_SIDE} px (a larger one does not fit a batch in GPU memory)",
    help="Training side in px.",
)
SMALL_STEM = Option(
    help="3×3 stride-1 stem without max-pool for ResNets (other archs have no such stem: pass "
    "`--no-small-stem` for them at ≤ 64 px).",
)
WORKERS = Option(
    minimum=0,
    help="DataLoader worker processes.",
    shown="up to 8 with a GPU; half the cores without (0 on 2 cores)",
)
PRECISION = Option(
    choices=("auto", "bf16", "fp16", "no"),
    help="bf16, fp16 or no (float32); auto: bf16 on GPUs that support it, else no.",
)
CHECKPOINT_EVERY = Option(
    above=0, help="Minutes between checkpoints (one is also written at every epoch end)."
)
RESTART = Option(
    toggle=False, help="Start over instead of resuming from this run's checkpoints (deletes them)."
)
FROM = Option(
    flag="--from", help="Artifact file, stage folder or run folder.", shown="the latest run under ./runs"
)
INIT = Option(
    help="Start the backbone from weights that already exist: `timm:NAME.TAG` (timm's pretrained "
    "weights through the Hugging Face hub cache, e.g. `timm:resnet50.a1_in1k`), a `.safetensors` or "
    "`.pth`/`.pt`/`.bin` file (read with torch.load(weights_only=True)), a folder written by "
    "`labelfew export`, or a labelfew run or artifact. The backbone is loaded strictly, the rest "
    "(classifier, head) skipped and counted; the init's mean/std and stem come with it.",
    shown="random init",
)
INIT_PREFIX = Option(
    help="The key prefix of the backbone inside an `--init` checkpoint of another tool (e.g. "
    "`module.encoder_q.`); found automatically when exactly one prefix holds a whole backbone.",
    shown="found automatically",
)
INFERENCE_BATCH = Option(minimum=1, help="Images per forward pass (lower it if memory runs out).")
LOGGER = Option(
    choices=("jsonl", "tensorboard", "mlflow"),
    help="Where the loss, lr and speed go while training runs, besides log.jsonl (always written): "
    "tensorboard (RUN/<stage>/tensorboard/, needs labelfew[tensorboard]) or mlflow (MLFLOW_TRACKING_URI "
    "or ./mlruns, needs labelfew[mlflow]); repeat the flag for both.",
)
CHANNELS = Option(
    help="Input channels: auto (1 when every sampled image is single-channel, else 3), 1 (grayscale: "
    "colour images become their luma; the views jitter brightness and contrast only, no hue or "
    "saturation), 3 (RGB) or N (multi-channel TIFFs of N channels: per-channel brightness and "
    "contrast). Recorded in the model; every later stage, predict and export follow it.",
)
WINDOW = Option(
    help="LOW,HIGH: the values of 12/16-bit and float images that become black and white (8 bits "
    "between). auto: the 0.5 and 99.5 percentiles of a seeded sample of the images, where a DICOM "
    "file's own window (WindowCenter/Width) wins; a window given here applies to every file. Recorded "
    "in the model; predict uses the same. 8-bit images are never windowed.",
    shown="auto",
)
