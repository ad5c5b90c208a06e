"""`pretrain`'s config (SimCLR); `finetune`'s is in `labelfew.config.finetune`, `distill`'s in
`labelfew.config.distill`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from labelfew.config.shared import (
    CHANNELS,
    CHECKPOINT_EVERY,
    FOLLOW_LINKS,
    IMAGE_SIZE,
    INIT,
    INIT_PREFIX,
    LOGGER,
    PRECISION,
    QUIET,
    RESTART,
    SEED,
    SMALL_STEM,
    WINDOW,
    WORKERS,
    Validated,
    parse_channels,
    parse_window,
    require_init,
)
from labelfew.errors import UserError
from labelfew.options import option, validate

DECODE_PLACES = ("auto", "cpu", "device")
"""``--decode-on`` values (`labelfew.data.device_decode.decode_place` resolves ``auto``)."""
DEFAULT_EPOCHS, INIT_EPOCHS = 100, 5
"""`--epochs`: from random init; continuing from `--init`'s weights (the best of 5, 15 and 30 on
hymenoptera and on digits, with the random-init lr rule and warmup, which a quarter of the lr or no
warmup did not beat: benchmarks/init_ladder.sh and init_defaults.sh, RESULTS.md)."""
KEY_MOMENTUM = 0.999
"""`--key-momentum`'s default: MoCo v1/v2's."""


@dataclass(frozen=True)
class PretrainConfig(Validated):
    """SimCLR pretraining. Defaults suit a folder of a few thousand images on one GPU."""

    data: Path = option(argument=True, help="Folder of unlabeled images, searched recursively.")
    out: Path | None = option(
        None,
        help="The run folder (rerunning the same command resumes it).",
        shown="`runs/<folder name>-<hash of its path>`",
    )
    arch: str | None = option(
        None, help="Any timm model name, e.g. resnet18, resnet50.", shown="resnet18; `--init`'s own"
    )
    init: str | None = option(
        None,
        INIT,
        help="Continue SimCLR pretraining from weights that already exist (the head starts random): "
        "`timm:NAME.TAG`, a `.safetensors`/`.pth` file, an exported folder or a labelfew run; their "
        "arch, mean/std and stem come with them (`--small-stem` makes the first conv start random).",
    )
    init_prefix: str | None = option(None, INIT_PREFIX)
    small_stem: bool | None = option(None, SMALL_STEM, shown="on at ≤ 64 px; off with `--init`")
    image_size: int | None = option(None, IMAGE_SIZE, shown="median side of the images, ≤ 224")
    channels: str = option("auto", CHANNELS)
    window: str | None = option(None, WINDOW)
    epochs: int | None = option(
        None,
        minimum=1,
        help="Training epochs. With --init, continued pretraining's default (fewer: most of HPT's gain "
        "comes early; benchmarks/RESULTS.md, 'Starting from pretrained weights').",
        shown=f"{DEFAULT_EPOCHS}; {INIT_EPOCHS} with `--init`",
    )
    batch_size: int | None = option(
        None,
        minimum=2,
        hint="a contrastive batch needs at least 2 images",
        help="The **global** batch (per process × processes).",
        shown="256, or every image of a smaller folder",
    )
    optimizer: str = option(
        "lars", choices=("lars", "sgd", "adamw"), help="lars (as the paper), sgd or adamw."
    )
    lr_rule: str = option(
        "sqrt",
        choices=("sqrt", "linear"),
        help="LARS lr scaling: lr = 0.075·√B (sqrt; paper appendix B.1, best below B = 4096) "
        "or 0.3·B/256 (linear).",
    )
    base_lr: float | None = option(
        None,
        above=0,
        help="Base of the lr rule (for sgd and adamw, the lr itself).",
        shown="0.075 (sqrt) / 0.3 (linear)",
    )
    weight_decay: float = option(
        1e-6,
        minimum=0,
        help="Weight decay (the paper's); biases and normalisation weights are excluded "
        "(and from LARS adaptation).",
    )
    warmup_epochs: float | None = option(
        None,
        minimum=0,
        help="Linear warmup epochs, then cosine decay per step.",
        shown="10 (10% for short runs)",
    )
    temperature: float = option(
        0.5, above=0, help="NT-Xent temperature: 0.5 for batches ≤ 1024, 0.1 for batches of 4096."
    )
    projection_dim: int = option(128, minimum=1, help="Projection output size (128 as the paper).")
    projection_depth: int = option(
        2,
        minimum=2,
        maximum=3,
        hint="use 2 (SimCLR v1) or 3 (SimCLR v2)",
        help="Projection head layers: 2 = SimCLR v1 head, 3 = v2.",
    )
    projection_hidden: int | None = option(
        None, minimum=1, help="Hidden width of the projection head.", shown="the backbone's num_features"
    )
    queue: int = option(
        0,
        minimum=0,
        help="Contrast against the last K keys of a momentum copy of the encoder too (SimCLRv2's use of "
        "MoCo's memory: positive and negatives are the copy's keys); 0: plain SimCLR. Costs K × "
        "--projection-dim floats and one more forward pass per step. For long runs of large models at "
        "small batches; on the CPU recipe it lost 1.6–5.6 kNN points at equal time and was even at equal "
        "epochs (benchmarks/RESULTS.md). At most 2 × the folder's images.",
    )
    key_momentum: float = option(
        KEY_MOMENTUM,
        minimum=0,
        below=1,
        help="With --queue: the momentum encoder follows the trained weights as m·key + (1 − m)·online "
        "after every step (0.999 as MoCo v1/v2; 0.99 for runs of ~10,000 steps or fewer).",
    )
    key_momentum_ramp: bool = option(
        False,
        help="With --queue: raise --key-momentum to 1 along a half cosine over the run (BYOL, MoCo v3) "
        "instead of keeping it constant (MoCo v2).",
    )
    color_strength: float | None = option(
        None,
        minimum=0,
        help="Colour jitter strength s (0.5 for CIFAR-size images, 1.0 for ImageNet-size).",
        shown="0.5 at ≤ 64 px, else 1.0",
    )
    min_scale: float = option(
        0.08, above=0, maximum=1, help="Smallest crop, as a fraction of the image area (the paper's)."
    )
    blur: bool | None = option(
        None,
        help="Gaussian blur, p = 0.5, σ ∈ [0.1, 2], kernel ≈ 10% of the side (the paper drops it for CIFAR).",
        shown="off at ≤ 32 px",
    )
    precision: str = option(
        "auto",
        PRECISION,
        help="bf16, fp16 or no (float32); auto: bf16 on GPUs that support it and on CPUs with native "
        "bf16 (AVX512-BF16 or AMX), else no.",
    )
    augment_on: str = option(
        "auto",
        choices=("auto", "device", "workers"),
        help="`device`: images decoded once into memory, both views of a batch made in a few tensor "
        "operations on the GPU (or CPU) that trains; `workers`: one PIL image at a time in DataLoader "
        "workers; `auto`: `device` when the decoded images fit in `--memory-budget`.",
    )
    decode_on: str = option(
        "auto",
        choices=DECODE_PLACES,
        help="Where streamed JPEGs are decoded: `device` decodes the JPEGs of each batch with nvJPEG on "
        "the GPU (workers only read the files; other formats are decoded on the CPU); `cpu`: in the "
        "workers; `auto`: `device` on CUDA when the images are streamed (over `--memory-budget`), else "
        "`cpu`. `device` on a CPU-only machine is an error.",
    )
    memory_budget: float = option(
        4.0,
        above=0,
        hint="give a positive size in GiB (default 4)",
        help="GiB the decoded images may take with `--augment-on device` (images ≤ 64 px are kept at "
        "the training size, larger ones at S / 0.875, e.g. 256 px for 224; 4 GiB ≈ 21,000 photos at "
        "256 px or all of CIFAR-10 26 times).",
    )
    compile: bool = option(
        False,
        help="`torch.compile` the model (faster GPU steps after a minute or two of compiling; "
        "checkpoints and artifacts are unchanged).",
    )
    workers: int | None = option(None, WORKERS)
    seed: int = option(0, SEED)
    max_bad_fraction: float = option(
        0.01,
        minimum=0,
        maximum=1,
        help="Fail if more than this fraction of the images cannot be decoded.",
    )
    sync_bn: bool | None = option(
        None,
        help="SyncBatchNorm: BN statistics over the global batch (GPU-only; `--sync-bn` on the CPU is "
        "an error).",
        shown="on with > 1 CUDA process",
    )
    logger: tuple[str, ...] = option(("jsonl",), LOGGER)
    checkpoint_every: float = option(10.0, CHECKPOINT_EVERY)
    restart: bool = option(False, RESTART)
    follow_links: bool = option(False, FOLLOW_LINKS)
    quiet: bool = option(False, QUIET)

    def __post_init__(self) -> None:
        validate(self)
        parse_channels(self.channels)
        parse_window(self.window)
        require_init(self.init, init_prefix=self.init_prefix)
        if self.queue == 0 and (self.key_momentum != KEY_MOMENTUM or self.key_momentum_ramp):
            shown = "--key-momentum" if self.key_momentum != KEY_MOMENTUM else "--key-momentum-ramp"
            raise UserError(
                f"{shown}: only with --queue K (the momentum encoder feeds the queue); add --queue or drop it"
            )
