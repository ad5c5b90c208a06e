"""The configs of the commands that use models and data: `evaluate`, `subset`, `select`, `demo`,
`predict`, `embed`, `similar` and `export`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from labelfew.config.shared import (
    FOLLOW_LINKS,
    FROM,
    INFERENCE_BATCH,
    INIT,
    INIT_PREFIX,
    LABEL_DELIMITER,
    LOGGER,
    QUIET,
    SEED,
    WORKERS,
    Validated,
    as_paths,
    require_init,
)
from labelfew.errors import UserError
from labelfew.options import Option, option, validate

INIT_ARCH = Option(
    help="The timm architecture of an `--init` weights file that does not record one (a bare state dict).",
    shown="the one --init records",
)


class WithInit(Validated):
    """A command that can read features from `--init`'s weights: `--arch` and `--init-prefix` need it."""

    init: str | None
    init_prefix: str | None
    arch: str | None

    def __post_init__(self) -> None:
        require_init(self.init, arch=self.arch, init_prefix=self.init_prefix)
        validate(self)


@dataclass(frozen=True)
class EvaluateConfig(WithInit):
    """kNN, linear probe and fine-tuned accuracy on a labelled test set."""

    test: Path = option(help="Labelled test images: CSV (path,label) or class-per-folder tree.")
    source: Path | None = option(
        None, FROM, help="Finetune or pretrain artifact, stage folder or run folder."
    )
    init: str | None = option(
        None,
        INIT,
        help="Also score these weights' own frozen features (kNN and linear probe rows named `init NAME`): "
        "`timm:NAME.TAG`, a `.safetensors`/`.pth` file, an exported folder or a labelfew run. Alone (no "
        "--from) only they are evaluated, at their recorded image size, else the test images' typical side.",
        shown="none",
    )
    init_prefix: str | None = option(None, INIT_PREFIX)
    arch: str | None = option(None, INIT_ARCH)
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
        help="Evaluate even when a model saw test images (in the kNN bank, its labels, the pretraining "
        "folder or an --unlabeled folder; same path, same bytes, or a re-encoded or resized copy): "
        "transductive use; each row's count is a column of the table and in report.json.",
    )
    knn_k: int = option(
        20,
        minimum=1,
        help="Neighbours for kNN, capped by the smallest class of the bank (more is a majority vote) "
        "(20: DINO's best, arXiv 2104.14294; 200: the CIFAR protocol, which recipes set).",
    )
    knn_temperature: float = option(
        0.07,
        above=0,
        help="kNN vote temperature: weight exp(similarity / T) (0.07: DINO's eval_knn; 0.1 with "
        "k = 200, Wu et al. 2018, arXiv 1805.01978).",
    )
    label_delimiter: str = option("|", LABEL_DELIMITER)
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
class SubsetConfig(Validated):
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
    seed: int = option(0, SEED, help="Which images are chosen; the same seed gives the same subset.")
    allow_empty: bool = option(False, help="Allow a fraction that leaves a class with no images.")
    label_delimiter: str = option("|", LABEL_DELIMITER)

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.per_class is None):
            raise UserError("give exactly one of --fraction or --per-class")
        validate(self)


@dataclass(frozen=True)
class DemoConfig(Validated):
    """`labelfew demo`: the whole pipeline on scikit-learn's bundled digits."""

    out: Path = option(Path("runs/demo"), help="Where the run folder goes.")
    epochs: int = option(30, minimum=1, help="Pretraining epochs.")
    quiet: bool = option(False, QUIET)


@dataclass(frozen=True)
class PredictConfig(Validated):
    """`labelfew predict`: classify every image of a folder."""

    images: Path = option(argument=True, help="Folder of images to classify, searched recursively.")
    out: Path = option(
        Path("predictions.csv"), help="CSV to write: path, label, confidence, the next classes, error."
    )
    source: Path | None = option(None, FROM, help="Fine-tuned artifact, its stage folder, or a run folder.")
    top_k: int = option(3, short="-k", minimum=1, help="How many classes to list per image.")
    batch_size: int = option(256, INFERENCE_BATCH)
    workers: int | None = option(None, WORKERS)
    follow_links: bool = option(False, FOLLOW_LINKS)
    quiet: bool = option(False, QUIET)


@dataclass(frozen=True)
class EmbedConfig(WithInit):
    """`labelfew embed`: backbone features of every image of a folder."""

    images: Path = option(argument=True, help="Folder of images to embed, searched recursively.")
    out: Path = option(
        Path("embeddings.safetensors"),
        help="Embeddings file (*.safetensors); the index CSV goes beside it.",
    )
    source: Path | None = option(
        None, FROM, help="Pretrain or fine-tuned artifact, or a run folder (its pretrain backbone)."
    )
    init: str | None = option(
        None,
        INIT,
        help="Embed with these weights' backbone instead of a labelfew model: `timm:NAME.TAG`, a "
        "`.safetensors`/`.pth` file, an exported folder or a labelfew run (at their recorded image size, "
        "else the images' typical side).",
        shown="none: --from's model",
    )
    init_prefix: str | None = option(None, INIT_PREFIX)
    arch: str | None = option(None, INIT_ARCH)
    batch_size: int = option(256, INFERENCE_BATCH)
    workers: int | None = option(None, WORKERS)
    follow_links: bool = option(False, FOLLOW_LINKS)
    quiet: bool = option(False, QUIET)


@dataclass(frozen=True)
class SimilarConfig(Validated):
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
class ExportConfig(Validated):
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
class SelectConfig(WithInit):
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
    init: str | None = option(
        None,
        INIT,
        help="Cluster these weights' features instead of a pretrain run's: `timm:NAME.TAG`, a "
        "`.safetensors`/`.pth` file, an exported folder or a labelfew run (at their recorded image size, "
        "else the images' typical side); --from then only gives the fine-tuned model of uncertain/mixed.",
        shown="none: --from's backbone",
    )
    init_prefix: str | None = option(None, INIT_PREFIX)
    arch: str | None = option(None, INIT_ARCH)
    labels: tuple[Path, ...] = option(
        (),
        help="Images already labelled (path,label CSV or tree of images in the folder; repeat to merge "
        "several): their clusters are skipped and the page shows their labels, editable.",
        shown="—",
    )
    strategy: str | None = option(
        None,
        choices=("typical", "uncertain", "mixed"),
        help="typical: the most typical image of each uncovered k-means cluster, clusters of ≤ 5 images "
        "left out as outliers (TypiClust; best at a few labels per class); uncertain: the fine-tuned model's smallest top-1 − top-2 margin, one per cluster a "
        "round; mixed: typical until the labels reach 5 per class of the model, uncertain after (that "
        "switch is labelfew's heuristic, not TypiClust's).",
        shown="mixed with a fine-tuned --from and --labels, else typical",
    )
    classes: str | None = option(
        None,
        help="Comma-separated class names the page offers (digits 1–9 pick them when no class name is a "
        "number); new ones can be typed.",
        shown="the fine-tuned model's or the --labels classes",
    )
    seed: int = option(0, SEED, help="Random seed (k-means, sampling in very large clusters).")
    batch_size: int = option(256, INFERENCE_BATCH)
    workers: int | None = option(None, WORKERS)
    force: bool = option(
        False, toggle=False, help="Overwrite an --out CSV whose labels are (partly) filled in."
    )
    follow_links: bool = option(False, FOLLOW_LINKS)
    quiet: bool = option(False, QUIET)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", as_paths(self.labels))
        super().__post_init__()  # WithInit's checks, then validate
