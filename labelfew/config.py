"""Frozen per-stage configs: defaults < recipe (TOML) < command-line options.

A recipe lists only what it changes, in `[pretrain]`, `[finetune]` and `[evaluate]` tables
whose keys are the field names below. The resolved config is saved with every artifact, so
it is the recipe to rebuild the model.

Every option of every command is declared here once, as a field with its type, default, help,
choices and range (`labelfew.options.option`); the CLI is built from these fields, and each
config validates itself when it is made, so a bad value exits 2 before any image is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from labelfew.errors import UserError
from labelfew.options import Option, markdown_table, merge, option, read_recipe, validate


class _Validated:
    """Configs check their choices and ranges when they are made (`labelfew.options.validate`)."""

    def __post_init__(self) -> None:
        validate(self)


# Options that several commands share, declared once.
QUIET = Option(toggle=False, help="Log lines instead of progress bars.")
SEED = Option(help="Random seed (model init, data order, augmentations, splits).")
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
INFERENCE_BATCH = Option(minimum=1, help="Images per forward pass (lower it if memory runs out).")
LOGGER = Option(
    choices=("jsonl", "tensorboard", "mlflow"),
    help="Where the loss, lr and speed go while training runs, besides log.jsonl (always written): "
    "tensorboard (RUN/<stage>/tensorboard/, needs labelfew[tensorboard]) or mlflow (MLFLOW_TRACKING_URI "
    "or ./mlruns, needs labelfew[mlflow]); repeat the flag for both.",
)


@dataclass(frozen=True)
class PretrainConfig(_Validated):
    """SimCLR pretraining. Defaults suit a folder of a few thousand images on one GPU."""

    data: Path = option(argument=True, help="Folder of unlabeled images, searched recursively.")
    out: Path | None = option(
        None,
        help="The run folder (rerunning the same command resumes it).",
        shown="`runs/<folder name>`",
    )
    arch: str = option("resnet18", help="Any timm model name, e.g. resnet18, resnet50.")
    small_stem: bool | None = option(
        None, help="3×3 stride-1 stem without max-pool for ResNets.", shown="on at ≤ 64 px"
    )
    image_size: int | None = option(
        None, minimum=8, help="Training side in px.", shown="median side of the images, ≤ 224"
    )
    epochs: int = option(100, minimum=1, help="Training epochs.")
    batch_size: int = option(
        256,
        minimum=2,
        hint="a contrastive batch needs at least 2 images",
        help="The **global** batch (per process × processes).",
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
    quiet: bool = option(False, QUIET)


@dataclass(frozen=True)
class FinetuneConfig(_Validated):
    """Supervised fine-tuning on the labelled subset (SimCLRv2 appendix: SGD, few epochs)."""

    labels: Path = option(help="Label CSV (path,label) or class-per-folder tree to train on.")
    source: Path | None = option(None, FROM, help="Pretrain artifact file, stage folder or run folder.")
    scratch: bool = option(
        False,
        toggle=False,
        help="Random init of the same architecture instead of the pretrain artifact: the baseline.",
    )
    out: Path | None = option(
        None, help="Output folder.", shown="`finetune-<labels>/` in the artifact's run folder"
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
        "lars 0.005×√B) on 4/5 of the labels, keep the best on the other fifth (each fifth in turn, "
        "up to 5, while one holds fewer than 250 labels), then train on all.",
    )
    warmup_fraction: float = option(
        0.05,
        minimum=0,
        below=1,
        help="Linear lr warmup over this part of the steps, then cosine decay (a high first step "
        "wrecks the pretrained features).",
    )
    weight_decay: float = option(0.0, minimum=0, help="Weight decay (none, as SimCLR fine-tuning).")
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
    image_size: int | None = option(
        None, minimum=8, help="Training side in px.", shown="the pretrain artifact's"
    )
    arch: str | None = option(
        None,
        help="Checked against the artifact's; with `--scratch` and no artifact, the arch to train.",
        shown="the artifact's (resnet18 for `--scratch` without one)",
    )
    precision: str = option("auto", PRECISION)
    workers: int | None = option(None, WORKERS)
    seed: int = option(0, SEED)
    logger: tuple[str, ...] = option(("jsonl",), LOGGER)
    checkpoint_every: float = option(10.0, CHECKPOINT_EVERY)
    restart: bool = option(False, RESTART)
    quiet: bool = option(False, QUIET)


@dataclass(frozen=True)
class DistillConfig(_Validated):
    """SimCLRv2 distillation (arXiv 2006.10029, eq. 2): a student learns the fine-tuned teacher's
    softmax on augmented unlabeled images."""

    unlabeled: Path = option(
        help="Folder of unlabeled images (searched recursively), e.g. the pretraining folder."
    )
    source: Path | None = option(
        None, FROM, help="The teacher: a fine-tuned artifact, its stage folder or a run folder."
    )
    arch: str | None = option(
        None,
        help="The student's timm arch; another than the teacher's starts from random init (or `--from-pretrain`).",
        shown="the teacher's, from the run's pretrained backbone",
    )
    from_pretrain: Path | None = option(
        None, help="A pretrain artifact (or its folder) to start a student of another arch from."
    )
    temperature: float = option(
        1.0,
        above=0,
        help="Softmax temperature of teacher and student alike (SimCLRv2: 1.0 big-to-small, 0.1 for "
        "self-distillation).",
    )
    labels: Path | None = option(
        None, help="Label CSV or class-per-folder tree for the labelled loss (with `--alpha`)."
    )
    alpha: float = option(
        0.0,
        minimum=0,
        help="Weight of the labelled cross-entropy added to the distillation loss (0: unlabeled only, "
        "which SimCLRv2 finds almost as good at 1% of the labels).",
    )
    out: Path | None = option(
        None, help="Output folder.", shown="`distill-<labels>/` in the teacher's run folder"
    )
    epochs: int = option(
        50,
        minimum=1,
        help="Training epochs (SimCLRv2 distils for half its pretraining epochs, 400 of 800; half of "
        "pretrain's 100 here).",
    )
    batch_size: int = option(
        256, minimum=2, help="The **global** batch (per process × processes); SimCLRv2 keeps pretraining's."
    )
    optimizer: str = option(
        "lars",
        choices=("lars", "sgd", "adamw"),
        help="lars (SimCLRv2 distils with pretraining's), sgd or adamw.",
    )
    lr: float | None = option(
        None,
        above=0,
        help="Learning rate, after a linear warmup over 10% of the steps, then cosine.",
        shown="pretraining's 0.075·√B (lars), 0.05·B/256 (sgd), 1e-3 (adamw)",
    )
    weight_decay: float = option(1e-6, minimum=0, help="Weight decay (pretraining's); not on the classifier.")
    precision: str = option("auto", PRECISION)
    augment_on: str = option(
        "auto",
        choices=("auto", "device", "workers"),
        help="As `pretrain`: `device` keeps the decoded images in memory, `workers` streams them.",
    )
    memory_budget: float = option(
        4.0, above=0, hint="give a positive size in GiB (default 4)", help="GiB the decoded images may take."
    )
    workers: int | None = option(None, WORKERS)
    seed: int = option(0, SEED)
    logger: tuple[str, ...] = option(("jsonl",), LOGGER)
    checkpoint_every: float = option(10.0, CHECKPOINT_EVERY)
    restart: bool = option(False, RESTART)
    quiet: bool = option(False, QUIET)


@dataclass(frozen=True)
class EvaluateConfig(_Validated):
    """kNN, linear probe and fine-tuned accuracy on a labelled test set."""

    test: Path = option(help="Labelled test images: CSV (path,label) or class-per-folder tree.")
    source: Path | None = option(
        None, FROM, help="Finetune or pretrain artifact, stage folder or run folder."
    )
    bank: Path | None = option(
        None,
        help="Labelled images for kNN and the linear probe (pass all your training labels for the "
        "standard representation metric).",
        shown="the fine-tuning labels",
    )
    out: Path | None = option(None, help="Output folder.", shown="`evaluate/` in the run folder")
    allow_overlap: bool = option(
        False,
        toggle=False,
        help="Evaluate even when test images are also in the kNN bank or a model's fine-tuning labels "
        "(same resolved path or same content); the overlap is printed and stored in report.json.",
    )
    knn_k: int = option(
        20,
        minimum=1,
        help="Neighbours for kNN, capped by the bank size (20: DINO's best, arXiv 2104.14294; "
        "200: the CIFAR protocol, which recipes set).",
    )
    knn_temperature: float = option(
        0.07,
        above=0,
        help="kNN vote temperature: weight exp(similarity / T) (0.07: DINO's eval_knn; 0.1 with "
        "k = 200, Wu et al. 2018, arXiv 1805.01978).",
    )
    probe_holdout: float = option(
        0.2, above=0, below=1, help="Part of the bank held out to choose the linear probe's C."
    )
    random_baseline: bool = option(
        False, help="Add kNN on randomly initialised features of the same architecture."
    )
    plots: bool = option(
        False,
        help="Also write PNG figures and report.html beside report.json (needs matplotlib: "
        "`labelfew[plots]`).",
    )
    batch_size: int = option(256, minimum=1, help="Images per forward pass.")
    workers: int | None = option(None, WORKERS)
    seed: int = option(0, SEED)
    logger: tuple[str, ...] = option(
        ("jsonl",),
        LOGGER,
        help="Also log each row's top-1, top-5 and balanced accuracy to tensorboard (RUN/evaluate/tensorboard/) "
        "or mlflow (a run named <run>/evaluate beside the training stages'); repeat the flag for both.",
    )
    quiet: bool = option(False, QUIET)


@dataclass(frozen=True)
class SubsetConfig(_Validated):
    """`labelfew subset`: a class-balanced, seeded label subset, written as a CSV."""

    labels: Path = option(argument=True, help="Label CSV (path,label) or a class-per-folder tree.")
    out: Path = option(help="CSV to write.")
    fraction: float | None = option(
        None,
        above=0,
        maximum=1,
        hint="out of range; use a value in (0, 1], e.g. 0.01 for 1%",
        help="Fraction of each class to keep, e.g. 0.01 or 0.1.",
    )
    per_class: int | None = option(
        None, minimum=1, help="Images to keep per class (instead of `--fraction`)."
    )
    seed: int = option(0, help="Which images are chosen; the same seed gives the same subset.")
    allow_empty: bool = option(False, help="Allow a fraction that leaves a class with no images.")

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.per_class is None):
            raise UserError("give exactly one of --fraction or --per-class")
        validate(self)


@dataclass(frozen=True)
class DemoConfig(_Validated):
    """`labelfew demo`: the whole pipeline on scikit-learn's bundled digits."""

    out: Path = option(Path("runs/demo"), help="Where the run folder goes.")
    epochs: int = option(30, minimum=1, help="Pretraining epochs.")
    quiet: bool = option(False, QUIET)


@dataclass(frozen=True)
class PredictConfig(_Validated):
    """`labelfew predict`: classify every image of a folder."""

    images: Path = option(argument=True, help="Folder of images to classify, searched recursively.")
    out: Path = option(
        Path("predictions.csv"), help="CSV to write: path, label, confidence, the next classes, error."
    )
    source: Path | None = option(None, FROM, help="Fine-tuned artifact, its stage folder, or a run folder.")
    top_k: int = option(3, short="-k", minimum=1, help="How many classes to list per image.")
    batch_size: int = option(256, INFERENCE_BATCH)
    workers: int | None = option(None, WORKERS)
    quiet: bool = option(False, QUIET)


@dataclass(frozen=True)
class EmbedConfig(_Validated):
    """`labelfew embed`: backbone features of every image of a folder."""

    images: Path = option(argument=True, help="Folder of images to embed, searched recursively.")
    out: Path = option(
        Path("embeddings.safetensors"),
        help="Embeddings file (*.safetensors); the index CSV goes beside it.",
    )
    source: Path | None = option(
        None, FROM, help="Pretrain or fine-tuned artifact, or a run folder (its pretrain backbone)."
    )
    batch_size: int = option(256, INFERENCE_BATCH)
    workers: int | None = option(None, WORKERS)
    quiet: bool = option(False, QUIET)


@dataclass(frozen=True)
class SimilarConfig(_Validated):
    """`labelfew similar`: nearest indexed images to a query image."""

    query: Path = option(argument=True, help="The image to search with.")
    index: Path = option(Path("embeddings.safetensors"), help="Embeddings written by `labelfew embed`.")
    top_k: int = option(10, short="-k", minimum=1, help="How many similar images to list.")
    source: Path | None = option(
        None,
        flag="--from",
        help="The model the index was built with, if it has moved since.",
        shown="the model recorded in the index",
    )


@dataclass(frozen=True)
class ExportConfig(_Validated):
    """`labelfew export`: which model, where to, in which formats."""

    source: Path | None = option(
        None, FROM, help="Fine-tuned or pretrain artifact, or a run folder (its fine-tuned model)."
    )
    out: Path | None = option(None, help="Folder to write.", shown="`export/` beside the artifact")
    format: str = option(
        "both",
        choices=("safetensors", "onnx", "both"),
        help="safetensors (timm-loadable + config.json), onnx, or both.",
    )
    quiet: bool = option(False, QUIET)


@dataclass(frozen=True)
class SelectConfig(_Validated):
    """`labelfew select`: which images to label first (TypiClust, arXiv 2202.02794)."""

    folder: Path = option(argument=True, help="Folder of unlabeled images, searched recursively.")
    budget: int = option(minimum=1, help="How many images to choose (e.g. 200: an afternoon of labelling).")
    out: Path = option(
        Path("to-label.csv"),
        help="CSV to write (path,label with empty labels); the page goes beside it as .html.",
    )
    source: Path | None = option(
        None, FROM, help="Pretrain or fine-tuned artifact, or a run folder (its pretrained backbone embeds)."
    )
    labels: Path | None = option(
        None,
        help="Images already labelled (path,label CSV of images in the folder): their clusters are skipped.",
    )
    strategy: str | None = option(
        None,
        choices=("typical", "uncertain", "mixed"),
        help="typical: the most typical image of each uncovered k-means cluster (best at a few labels "
        "per class); uncertain: the fine-tuned model's smallest top-1 − top-2 margin, one per cluster a "
        "round; mixed: typical until the labels reach 5 per class of the model, uncertain after.",
        shown="mixed with a fine-tuned --from and --labels, else typical",
    )
    classes: str | None = option(
        None,
        help="Comma-separated class names the page offers (digits 1–9 pick them); new ones can be typed.",
        shown="the fine-tuned model's or the --labels classes",
    )
    seed: int = option(0, SEED, help="Random seed (k-means, sampling in very large clusters).")
    batch_size: int = option(256, INFERENCE_BATCH)
    workers: int | None = option(None, WORKERS)
    quiet: bool = option(False, QUIET)


Config = TypeVar("Config")

_SECTIONS: dict[type, str] = {
    PretrainConfig: "pretrain",
    FinetuneConfig: "finetune",
    DistillConfig: "distill",
    EvaluateConfig: "evaluate",
}

COMMAND_CONFIGS: dict[str, type] = {
    "pretrain": PretrainConfig,
    "subset": SubsetConfig,
    "select": SelectConfig,
    "finetune": FinetuneConfig,
    "distill": DistillConfig,
    "evaluate": EvaluateConfig,
    "demo": DemoConfig,
    "predict": PredictConfig,
    "embed": EmbedConfig,
    "similar": SimilarConfig,
    "export": ExportConfig,
}  # every command's config; the CLI and README's option tables are built from these


def takes_recipe(config_class: type) -> bool:
    """Whether a command reads a recipe section (`--recipe`): pretrain, finetune, evaluate."""
    return config_class in _SECTIONS


def command_tables() -> dict[str, str]:
    """README's option table of every command, by command name."""
    return {
        name: markdown_table(config_class, recipe=takes_recipe(config_class))
        for name, config_class in COMMAND_CONFIGS.items()
    }


def load_recipe(path: Path | None) -> dict[str, dict[str, Any]]:
    """Reads a recipe TOML file into {section: {field: value}}.

    Raises:
        UserError: missing file, TOML syntax error, or an unknown section.
    """
    return read_recipe(path, tuple(_SECTIONS.values()))


def build_config(config_class: type[Config], recipe: dict[str, dict[str, Any]], **options: Any) -> Config:
    """Defaults < the recipe's section < options that are not None; validated (see `_Validated`).

    Raises:
        UserError: an unknown recipe key, a recipe value of the wrong type, or a bad value
            (a choice or range of `labelfew.options.Option`), before any work is done.
    """
    return merge(config_class, _SECTIONS.get(config_class), recipe, options)


def to_json(config: Any) -> dict[str, Any]:
    """A config as JSON-ready values (paths as strings)."""
    return {
        key: str(value) if isinstance(value, Path) else value
        for key, value in dataclasses.asdict(config).items()
    }
