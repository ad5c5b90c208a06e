"""The training commands' configs: `pretrain` and `finetune` (supervised or FixMatch); `distill`'s
is in `labelfew.config.distill`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from labelfew.config.shared import (
    CHECKPOINT_EVERY,
    FOLLOW_LINKS,
    FROM,
    IMAGE_SIZE,
    INIT,
    INIT_PREFIX,
    LOGGER,
    PRECISION,
    QUIET,
    RESTART,
    SEED,
    SKIP_BAD,
    SMALL_STEM,
    WORKERS,
    Validated,
    as_paths,
    require_init,
)
from labelfew.errors import UserError
from labelfew.options import option, validate

DECODE_PLACES = ("auto", "cpu", "device")
"""``--decode-on`` values (`labelfew.data.device_decode.decode_place` resolves ``auto``)."""


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
    epochs: int = option(100, minimum=1, help="Training epochs.")
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
    precision: str = option("auto", PRECISION)
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
        require_init(self.init, init_prefix=self.init_prefix)


@dataclass(frozen=True)
class FixMatchSettings:
    """What `finetune --method fixmatch` trains with, its unset options resolved to FixMatch's values.

    FixMatch (Sohn et al. 2020, arXiv 2001.07685, section 4 and appendix B.1): μ = 7 unlabeled
    images per labelled one, confidence threshold τ = 0.95, unlabeled loss weight λ_u = 1, and the
    model evaluated is an exponential moving average of the weights with decay 0.999 (BatchNorm
    momentum 1 − decay, `labelfew.engine.ema`); SGD with Nesterov momentum, weight decay 5e-4
    (CIFAR-10) on every weight matrix, the classifier's too, lr 0.03 for a labelled batch of 64
    decayed as cos(7πk / 16K) over the K steps, without warmup (`labelfew.optim.fixmatch_schedule`).
    """

    mu: int = 7
    threshold: float = 0.95
    unlabeled_weight: float = 1.0
    ema: float = 0.999


SUPERVISED_WEIGHT_DECAY, SUPERVISED_WARMUP = 0.0, 0.05
"""Supervised fine-tuning's defaults: no weight decay (SimCLR), a short warmup."""
FIXMATCH_WEIGHT_DECAY, FIXMATCH_WARMUP = 5e-4, 0.0
"""FixMatch's: weight decay 5e-4 (CIFAR-10), no warmup."""


FIXMATCH_OPTIONS = ("unlabeled", "mu", "threshold", "unlabeled_weight", "ema")
"""`FinetuneConfig` fields that only `--method fixmatch` uses; None unless given."""


@dataclass(frozen=True)
class FinetuneConfig(Validated):
    """Fine-tuning on the labelled subset: supervised (SimCLRv2 appendix: SGD, few epochs) or
    FixMatch with the unlabeled images too (arXiv 2001.07685; from the SimCLR start as SelfMatch)."""

    labels: tuple[Path, ...] = option(
        help="Label CSV (path,label) or class-per-folder tree to train on; repeat the flag to merge "
        "several (the rounds of labelling), a path labelled differently in two of them is an error.",
    )
    source: Path | None = option(None, FROM, help="Pretrain artifact file, stage folder or run folder.")
    init: str | None = option(
        None,
        INIT,
        help="Fine-tune weights that already exist instead of a pretrain artifact (no self-supervised "
        "step: the transfer baseline): `timm:NAME.TAG`, a `.safetensors`/`.pth` file, an exported "
        "folder or a labelfew run; their mean/std and stem come with them. Not with --from or --scratch.",
    )
    init_prefix: str | None = option(None, INIT_PREFIX)
    scratch: bool = option(
        False,
        toggle=False,
        help="Random init of the same architecture instead of the pretrain artifact: the baseline.",
    )
    out: Path | None = option(
        None,
        help="Output folder.",
        shown="`finetune-<labels>/` in the artifact's run folder (without one: in "
        "`runs/<labels>[-init-<name>]-<hash>/`)",
    )
    epochs: int = option(
        60, minimum=1, help="Training epochs (SimCLRv2: 60 for 1% of the labels, 30 for 10%)."
    )
    batch_size: int = option(64, minimum=1, help="Global batch size (per process × processes).")
    optimizer: str = option(
        "sgd", choices=("sgd", "lars", "adamw"), help="sgd (momentum 0.9, as SimCLRv2), lars or adamw."
    )
    lr: float | str = option(
        "auto",
        choices=("auto",),
        above=0,
        help="Learning rate, or auto: fine-tune briefly at ×1, ×2, ×4 and ×8 the rule (sgd 0.05×B/256, "
        "lars 0.005×√B) on 4/5 of the labels, keep the best on the other fifth (further fifths for the "
        "candidates still close, while one holds fewer than 250 labels), then train on all. The search "
        "takes at most as many steps as the fine-tuning (at least an epoch a candidate); a rerun "
        "continues it.",
    )
    warmup_fraction: float | None = option(
        None,
        minimum=0,
        below=1,
        help="Linear lr warmup over this part of the steps, then cosine decay (a high first step "
        "wrecks the pretrained features).",
        shown=f"{SUPERVISED_WARMUP:g}; {FIXMATCH_WARMUP:g} for fixmatch (FixMatch's)",
    )
    weight_decay: float | None = option(
        None,
        minimum=0,
        help="Weight decay of the weight matrices (never biases or normalisation weights); the "
        "classifier's only with fixmatch, as FixMatch (SimCLR's fine-tuning leaves it out).",
        shown=f"{SUPERVISED_WEIGHT_DECAY:g} (SimCLR fine-tuning); {FIXMATCH_WEIGHT_DECAY:g} for "
        "fixmatch (FixMatch, CIFAR-10)",
    )
    from_head_layer: int = option(
        0,
        minimum=0,
        help="0: classifier on the backbone; 1: on the first projection layer (SimCLRv2, 3-layer head).",
    )
    balanced: bool = option(False, help="Sample every class equally often.")
    label_smoothing: float = option(0.0, minimum=0, below=1, help="Label smoothing.")
    val_fraction: float = option(
        0.0,
        minimum=0,
        below=1,
        help="Hold out this fraction of each class to report validation accuracy per epoch.",
    )
    image_size: int | None = option(None, IMAGE_SIZE, shown="the pretrain artifact's")
    arch: str | None = option(
        None,
        help="Checked against the artifact's (or `--init`'s; the arch of an `--init` file that records "
        "none); with `--scratch` and no artifact, the arch to train.",
        shown="the artifact's (resnet18 for `--scratch` without one)",
    )
    method: str = option(
        "supervised",
        choices=("supervised", "fixmatch"),
        help="supervised: cross-entropy on the labels; fixmatch: plus each `--unlabeled` image's strong "
        "view (RandAugment + Cutout) trained towards the weak view's confident prediction "
        "(arXiv 2001.07685), and the weights' moving average saved.",
    )
    unlabeled: Path | None = option(
        None,
        help="fixmatch: folder of unlabeled images (searched recursively), e.g. the pretraining folder; "
        "an epoch is one pass over them.",
    )
    mu: int | None = option(
        None,
        minimum=1,
        help="fixmatch: unlabeled images per labelled image in a step (FixMatch's μ).",
        shown=f"{FixMatchSettings.mu}",
    )
    threshold: float | None = option(
        None,
        minimum=0,
        maximum=1,
        help="fixmatch: confidence the weak view's prediction needs to be a pseudo-label.",
        shown=f"{FixMatchSettings.threshold:g}",
    )
    unlabeled_weight: float | None = option(
        None,
        minimum=0,
        help="fixmatch: weight λ_u of the unlabeled loss.",
        shown=f"{FixMatchSettings.unlabeled_weight:g}",
    )
    ema: float | None = option(
        None,
        minimum=0,
        below=1,
        help="fixmatch: decay of the weights' moving average, which is validated and saved (warmed up "
        "as min(decay, (1 + n) / (10 + n)) after n steps, so short runs are not the initial weights).",
        shown=f"{FixMatchSettings.ema:g}",
    )
    precision: str = option("auto", PRECISION)
    workers: int | None = option(None, WORKERS)
    seed: int = option(0, SEED)
    logger: tuple[str, ...] = option(("jsonl",), LOGGER)
    checkpoint_every: float = option(10.0, CHECKPOINT_EVERY)
    restart: bool = option(False, RESTART)
    follow_links: bool = option(False, FOLLOW_LINKS)
    skip_bad: bool = option(False, SKIP_BAD)
    quiet: bool = option(False, QUIET)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", as_paths(self.labels))
        if not self.labels:
            raise UserError(
                "--labels: pass a label CSV or class-per-folder tree (repeat it to merge several)"
            )
        validate(self)
        if self.init is not None:
            other = "--from" if self.source is not None else "--scratch" if self.scratch else None
            if other is not None:
                raise UserError(
                    f"--init {self.init}: not with {other} (the weights start from one of them); drop one"
                )
            if self.from_head_layer > 0:
                raise UserError(
                    "--from-head-layer: the head's layers come from a pretrain artifact, not --init"
                )
        elif self.init_prefix is not None:
            raise UserError(
                f"--init-prefix {self.init_prefix}: only with --init (it describes the --init weights)"
            )
        given = [name for name in FIXMATCH_OPTIONS if getattr(self, name) is not None]
        if self.method == "fixmatch" and self.unlabeled is None:
            raise UserError(
                "--method fixmatch needs --unlabeled FOLDER (the unlabeled images, e.g. the pretraining folder)"
            )
        if self.method != "fixmatch" and given:
            shown = ", ".join("--" + name.replace("_", "-") for name in given)
            raise UserError(f"{shown}: only for --method fixmatch; add --method fixmatch or drop them")

    @property
    def decay(self) -> float:
        """`--weight-decay`, or the method's default (`SUPERVISED_WEIGHT_DECAY`, FixMatch's)."""
        if self.weight_decay is not None:
            return self.weight_decay
        return FIXMATCH_WEIGHT_DECAY if self.method == "fixmatch" else SUPERVISED_WEIGHT_DECAY

    @property
    def warmup(self) -> float:
        """`--warmup-fraction`, or the method's default (`SUPERVISED_WARMUP`, FixMatch's none)."""
        if self.warmup_fraction is not None:
            return self.warmup_fraction
        return FIXMATCH_WARMUP if self.method == "fixmatch" else SUPERVISED_WARMUP

    @property
    def fixmatch(self) -> FixMatchSettings | None:
        """The resolved FixMatch settings, or None for supervised fine-tuning."""
        if self.method != "fixmatch":
            return None
        given = {
            name: getattr(self, name) for name in FIXMATCH_OPTIONS[1:] if getattr(self, name) is not None
        }
        return FixMatchSettings(**given)
