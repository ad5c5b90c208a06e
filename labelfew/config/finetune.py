"""`finetune`'s config: supervised fine-tuning or FixMatch on the labelled subset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from labelfew.config.shared import (
    CHANNELS,
    CHECKPOINT_EVERY,
    FOLLOW_LINKS,
    FROM,
    IMAGE_SIZE,
    INIT,
    INIT_PREFIX,
    LABEL_DELIMITER,
    LOGGER,
    PRECISION,
    QUIET,
    RESTART,
    SEED,
    SKIP_BAD,
    WINDOW,
    WORKERS,
    Validated,
    as_paths,
    parse_channels,
    parse_window,
)
from labelfew.errors import UserError
from labelfew.options import option, validate


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
    channels: str = option(
        "auto",
        CHANNELS,
        help=CHANNELS.help + " Only for a start without a pretrain run (`--init`, or `--scratch` "
        "with no backbone); a pretrained backbone brings its own.",
    )
    window: str | None = option(
        None,
        WINDOW,
        help=WINDOW.help + " Only for a start without a pretrain run; a pretrained backbone brings its own.",
    )
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
        shown=f"{SUPERVISED_WARMUP:g}; {FIXMATCH_WARMUP:g} for fixmatch (FixMatch's) and linear (SimCLR's)",
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
        help="Hold out this fraction of each class, validated after every epoch: the epoch with the best "
        "balanced accuracy is saved as model.safetensors, the last one as model-last.safetensors. "
        "Without it (0) the last epoch is the model.",
    )
    early_stop: int | None = option(
        None,
        minimum=1,
        help="Stop after this many validations in a row without a better balanced accuracy (needs "
        "--val-fraction); the best epoch is the model.",
        shown="off",
    )
    class_weights: str = option(
        "none",
        help="Weights of the classes in the cross-entropy (every method, FixMatch's labelled part): none; "
        "auto: N / (C · n_c), inverse class frequency with a mean weight of 1 per image (sklearn's "
        "'balanced'); or a CSV file class,weight with a positive weight for every class.",
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
        choices=("supervised", "fixmatch", "linear"),
        help="supervised: cross-entropy on the labels; fixmatch: plus each `--unlabeled` image's strong "
        "view (RandAugment + Cutout) trained towards the weak view's confident prediction "
        "(arXiv 2001.07685), and the weights' moving average saved; linear: the backbone frozen, "
        "a linear head on its features (SimCLR's linear evaluation; `--lr auto` trains a grid of lrs "
        "in one pass and keeps the best on held-out labels).",
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
    label_delimiter: str = option("|", LABEL_DELIMITER)
    quiet: bool = option(False, QUIET)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", as_paths(self.labels))
        if not self.labels:
            raise UserError(
                "--labels: pass a label CSV or class-per-folder tree (repeat it to merge several)"
            )
        validate(self)
        parse_channels(self.channels)
        parse_window(self.window)
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
        if self.method == "linear":
            _check_linear(self)
        if self.early_stop is not None and self.val_fraction <= 0:
            raise UserError(
                f"--early-stop {self.early_stop}: needs --val-fraction (the held-out labels it validates on)"
            )
        if self.class_weights not in ("none", "auto") and not Path(self.class_weights).is_file():
            raise UserError(
                f"--class-weights {self.class_weights}: use none, auto or a CSV file class,weight (no such file)"
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
        return FIXMATCH_WARMUP if self.method in ("fixmatch", "linear") else SUPERVISED_WARMUP

    @property
    def fixmatch(self) -> FixMatchSettings | None:
        """The resolved FixMatch settings, or None for supervised fine-tuning."""
        if self.method != "fixmatch":
            return None
        given = {
            name: getattr(self, name) for name in FIXMATCH_OPTIONS[1:] if getattr(self, name) is not None
        }
        return FixMatchSettings(**given)


def _check_linear(config: FinetuneConfig) -> None:
    """`--method linear`'s refusals: a frozen random backbone, another optimizer than its SGD, early
    stopping (its lr is chosen on held-out folds, not per epoch)."""
    if config.scratch:
        raise UserError(
            "--scratch with --method linear: a frozen random backbone learns nothing; drop --scratch "
            "(or use --method supervised for the baseline)"
        )
    if config.optimizer != "sgd":
        raise UserError(
            f"--optimizer {config.optimizer}: --method linear trains its heads with SGD (Nesterov, "
            "SimCLR's linear evaluation); drop --optimizer"
        )
    if config.early_stop is not None:
        raise UserError(
            f"--early-stop {config.early_stop} with --method linear: the heads are chosen on --lr auto's "
            "held-out folds, not per epoch; drop --early-stop"
        )
