"""The `labelfew` command: each command builds a config and calls `<stage>.run(config)`.

Exit codes: 0 success, 2 bad input (one line saying what and what to do), 1 internal error,
130 interrupted. `--debug` shows full tracebacks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from labelfew import __version__
from labelfew.errors import Interrupted, UserError

app = typer.Typer(
    name="labelfew",
    help="Many images, few labels: SimCLR pretraining, fine-tuning on a label subset, evaluation.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")

# Options shared between commands, declared once.
Recipe = Annotated[
    Path | None, typer.Option("--recipe", help="TOML recipe (see recipes/); options given here override it.")
]
Out = Annotated[
    Path | None, typer.Option("--out", help="Output folder (default: a run folder under ./runs).")
]
From = Annotated[
    Path | None,
    typer.Option(
        "--from", help="Artifact file, stage folder or run folder (default: the latest run under ./runs)."
    ),
]
Epochs = Annotated[int | None, typer.Option("--epochs", help="Training epochs.")]
BatchSize = Annotated[
    int | None, typer.Option("--batch-size", help="Global batch size (per process × processes).")
]
Precision = Annotated[
    str | None, typer.Option("--precision", help="bf16, fp16, no, or auto (bf16 on GPUs that support it).")
]
Workers = Annotated[
    int | None, typer.Option("--workers", help="Data-loader worker processes (default: by machine).")
]
Seed = Annotated[
    int | None, typer.Option("--seed", help="Random seed (model init, data order, augmentations).")
]
Quiet = Annotated[bool, typer.Option("--quiet", help="Log lines instead of progress bars.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")]
CheckpointEvery = Annotated[
    float | None,
    typer.Option(
        "--checkpoint-every",
        help="Minutes between checkpoints (default 10; one is also written at every epoch end).",
    ),
]
Restart = Annotated[
    bool,
    typer.Option(
        "--restart", help="Start over instead of resuming from this run's checkpoints (deletes them)."
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"labelfew {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Many images, few labels: SimCLR pretraining, fine-tuning on a label subset, evaluation."""


def guarded(action: Callable[[], T], debug: bool) -> T:
    """Runs a command body; turns errors into one line and an exit code."""
    try:
        return action()
    except UserError as error:
        if debug:
            raise
        typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    except Interrupted as error:
        typer.secho(f"interrupted: {error}", err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(130) from None
    except Exception as error:
        if debug:
            raise
        typer.secho(
            f"internal error: {type(error).__name__}: {error} (rerun with --debug for the traceback)",
            err=True,
            fg=typer.colors.RED,
        )
        raise typer.Exit(1) from None
    finally:
        from labelfew import engine

        engine.shutdown()


def _options(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


@app.command()
def pretrain(
    data: Annotated[Path, typer.Argument(help="Folder of unlabeled images, searched recursively.")],
    recipe: Recipe = None,
    arch: Annotated[
        str | None, typer.Option(help="Any timm model name, e.g. resnet18 (default), resnet50.")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Training side in px (default: the images' median side, ≤ 224).")
    ] = None,
    small_stem: Annotated[
        bool | None,
        typer.Option(
            "--small-stem/--no-small-stem",
            help="3×3 stride-1 stem without max-pool (default: on for images ≤ 64 px).",
        ),
    ] = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    optimizer: Annotated[str | None, typer.Option(help="lars (default, as the paper), sgd or adamw.")] = None,
    lr_rule: Annotated[
        str | None,
        typer.Option(
            help="LARS lr scaling: sqrt (0.075×√B, default, best below B=4096) or linear (0.3×B/256)."
        ),
    ] = None,
    base_lr: Annotated[
        float | None, typer.Option(help="Base of the lr rule (or the lr itself for sgd/adamw).")
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="Weight decay (1e-6 as the paper; biases and norms are excluded).")
    ] = None,
    warmup_epochs: Annotated[
        float | None, typer.Option(help="Linear warmup epochs (default 10, or 10% of short runs).")
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(help="NT-Xent temperature: 0.5 for batches ≤ 1024 (default), 0.1 for 4096."),
    ] = None,
    projection_depth: Annotated[
        int | None, typer.Option(help="Projection head layers: 2 (SimCLR v1, default) or 3 (v2).")
    ] = None,
    projection_dim: Annotated[
        int | None, typer.Option(help="Projection output size (128 as the paper).")
    ] = None,
    color_strength: Annotated[
        float | None,
        typer.Option(
            help="Colour jitter strength s: 0.5 for CIFAR-size, 1.0 for ImageNet-size (default by image size)."
        ),
    ] = None,
    blur: Annotated[
        bool | None,
        typer.Option(
            "--blur/--no-blur", help="Gaussian blur (default: off at ≤ 32 px, as the paper for CIFAR)."
        ),
    ] = None,
    max_bad_fraction: Annotated[
        float | None,
        typer.Option(help="Fail if more than this fraction of images cannot be decoded (default 0.01)."),
    ] = None,
    sync_bn: Annotated[
        bool | None,
        typer.Option(
            "--sync-bn/--no-sync-bn",
            help="SyncBatchNorm: BN statistics over the global batch (default: on with more than one "
            "CUDA process; GPU-only, so an error on the CPU).",
        ),
    ] = None,
    precision: Precision = None,
    augment_on: Annotated[
        str | None,
        typer.Option(
            help="Where views are made: device (images decoded once into memory, both views of a batch "
            "made on the GPU/CPU that trains), workers (one PIL image at a time in DataLoader workers), "
            "auto (default: device when the decoded images fit in --memory-budget)."
        ),
    ] = None,
    memory_budget: Annotated[
        float | None,
        typer.Option(help="GiB the decoded images may take with --augment-on device (default 4)."),
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the model (faster steps on GPUs after a "
            "minute or two of compiling; default off).",
        ),
    ] = None,
    workers: Workers = None,
    seed: Seed = None,
    out: Out = None,
    checkpoint_every: CheckpointEvery = None,
    restart: Restart = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """SimCLR pretraining on a folder of unlabeled images."""
    from labelfew.config import PretrainConfig, build_config, load_recipe
    from labelfew.stages import pretrain as stage

    def action() -> Path:
        config = build_config(
            PretrainConfig,
            load_recipe(recipe),
            data=data,
            **_options(
                arch=arch,
                image_size=image_size,
                small_stem=small_stem,
                epochs=epochs,
                batch_size=batch_size,
                optimizer=optimizer,
                lr_rule=lr_rule,
                base_lr=base_lr,
                weight_decay=weight_decay,
                warmup_epochs=warmup_epochs,
                temperature=temperature,
                projection_depth=projection_depth,
                projection_dim=projection_dim,
                color_strength=color_strength,
                blur=blur,
                max_bad_fraction=max_bad_fraction,
                sync_bn=sync_bn,
                precision=precision,
                augment_on=augment_on,
                memory_budget=memory_budget,
                compile=compile,
                workers=workers,
                seed=seed,
                out=out,
                checkpoint_every=checkpoint_every,
                restart=restart or None,
                quiet=quiet or None,
            ),
        )
        return stage.run(config)

    guarded(action, debug)


@app.command()
def subset(
    labels: Annotated[Path, typer.Argument(help="Label CSV (path,label) or a class-per-folder tree.")],
    out: Annotated[Path, typer.Option("--out", help="CSV to write.")],
    fraction: Annotated[
        float | None, typer.Option(help="Fraction of each class to keep, e.g. 0.01 or 0.1.")
    ] = None,
    per_class: Annotated[
        int | None, typer.Option(help="Images to keep per class (instead of --fraction).")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Which images are chosen; the same seed gives the same subset.")
    ] = 0,
    allow_empty: Annotated[
        bool, typer.Option(help="Allow a fraction that leaves a class with no images.")
    ] = False,
    debug: Debug = False,
) -> None:
    """A class-balanced, seeded label subset (1% / 10%), written as a CSV."""
    from labelfew.data.labels import read_labels, write_labels
    from labelfew.data.subsets import balanced_subset

    def action() -> None:
        full = read_labels(labels)
        chosen = balanced_subset(
            full, fraction=fraction, per_class=per_class, seed=seed, allow_empty=allow_empty
        )
        write_labels(chosen, out)
        typer.echo(
            f"wrote {out}: {len(chosen)} of {len(full)} images, {len(chosen.class_names)} classes "
            f"({min(chosen.counts().values())}–{max(chosen.counts().values())} per class)"
        )

    guarded(action, debug)


@app.command()
def finetune(
    labels: Annotated[
        Path, typer.Option("--labels", help="Label CSV (path,label) or class-per-folder tree to train on.")
    ],
    source: From = None,
    scratch: Annotated[
        bool, typer.Option("--scratch", help="Random init instead of the pretrain artifact: the baseline.")
    ] = False,
    recipe: Recipe = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Learning rate (default 0.05 for batch 64, SGD momentum 0.9, cosine)."),
    ] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd (default), lars or adamw.")] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="Weight decay (default 0, as SimCLR fine-tuning).")
    ] = None,
    from_head_layer: Annotated[
        int | None,
        typer.Option(help="0: classifier on the backbone; 1: on the first projection layer (SimCLRv2)."),
    ] = None,
    balanced: Annotated[
        bool | None, typer.Option("--balanced/--no-balanced", help="Sample every class equally often.")
    ] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Label smoothing (default 0).")] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Hold out this fraction of each class to report validation accuracy.")
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(help="Check the artifact's arch; with --scratch and no artifact, the arch to train."),
    ] = None,
    precision: Precision = None,
    workers: Workers = None,
    seed: Seed = None,
    out: Out = None,
    checkpoint_every: CheckpointEvery = None,
    restart: Restart = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Fine-tune the pretrained backbone (or a random one, --scratch) on labelled images."""
    from labelfew.config import FinetuneConfig, build_config, load_recipe
    from labelfew.stages import finetune as stage

    def action() -> Path:
        config = build_config(
            FinetuneConfig,
            load_recipe(recipe),
            labels=labels,
            **_options(
                source=source,
                scratch=scratch or None,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                optimizer=optimizer,
                weight_decay=weight_decay,
                from_head_layer=from_head_layer,
                balanced=balanced,
                label_smoothing=label_smoothing,
                val_fraction=val_fraction,
                arch=arch,
                precision=precision,
                workers=workers,
                seed=seed,
                out=out,
                checkpoint_every=checkpoint_every,
                restart=restart or None,
                quiet=quiet or None,
            ),
        )
        return stage.run(config)

    guarded(action, debug)


@app.command()
def evaluate(
    test: Annotated[
        Path, typer.Option("--test", help="Labelled test images: CSV (path,label) or class-per-folder tree.")
    ],
    source: From = None,
    bank: Annotated[
        Path | None,
        typer.Option(help="Labelled images for kNN and the linear probe (default: the fine-tuning labels)."),
    ] = None,
    recipe: Recipe = None,
    knn_k: Annotated[
        int | None, typer.Option(help="Neighbours for kNN (200, capped by the bank size).")
    ] = None,
    knn_temperature: Annotated[float | None, typer.Option(help="kNN vote temperature (0.1).")] = None,
    random_baseline: Annotated[
        bool | None,
        typer.Option(
            "--random-baseline/--no-random-baseline", help="Add kNN on randomly initialised features."
        ),
    ] = None,
    plots: Annotated[
        bool | None,
        typer.Option(
            "--plots/--no-plots",
            help="Also write PNG figures and report.html beside report.json (needs matplotlib: labelfew[plots]).",
        ),
    ] = None,
    batch_size: BatchSize = None,
    workers: Workers = None,
    out: Out = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """kNN, linear probe and fine-tuned accuracy on a labelled test set."""
    from labelfew.config import EvaluateConfig, build_config, load_recipe
    from labelfew.stages import evaluate as stage

    def action() -> Any:
        config = build_config(
            EvaluateConfig,
            load_recipe(recipe),
            test=test,
            **_options(
                source=source,
                bank=bank,
                knn_k=knn_k,
                knn_temperature=knn_temperature,
                random_baseline=random_baseline,
                plots=plots,
                batch_size=batch_size,
                workers=workers,
                out=out,
                quiet=quiet or None,
            ),
        )
        return stage.run(config)

    guarded(action, debug)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Where the run folder goes.")] = Path("runs/demo"),
    epochs: Annotated[int, typer.Option(help="Pretraining epochs.")] = 30,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """The whole pipeline on scikit-learn's bundled digits images (real data, no download)."""
    from labelfew import demo as stage

    guarded(lambda: stage.run(out=out, epochs=epochs, quiet=quiet), debug)


InferenceBatch = Annotated[
    int, typer.Option("--batch-size", help="Images per forward pass (256; lower it if memory runs out).")
]
TopK = Annotated[int, typer.Option("-k", "--top-k", help="How many results to list per image.")]


@app.command()
def predict(
    images: Annotated[Path, typer.Argument(help="Folder of images to classify, searched recursively.")],
    out: Annotated[
        Path,
        typer.Option("--out", help="CSV to write: path, label, confidence, the next classes, error."),
    ] = Path("predictions.csv"),
    source: Annotated[
        Path | None,
        typer.Option(
            "--from", help="Fine-tuned artifact, its folder, or a run folder (default: the latest run)."
        ),
    ] = None,
    top_k: TopK = 3,
    batch_size: InferenceBatch = 256,
    workers: Workers = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Classify every image of a folder with the fine-tuned model; writes a CSV."""
    from labelfew.use import predict as stage

    config = stage.PredictConfig(
        images=images,
        out=out,
        source=source,
        top_k=top_k,
        batch_size=batch_size,
        workers=workers,
        quiet=quiet,
    )
    guarded(lambda: stage.predict(config), debug)


@app.command()
def embed(
    images: Annotated[Path, typer.Argument(help="Folder of images to embed, searched recursively.")],
    out: Annotated[
        Path, typer.Option("--out", help="Embeddings file (*.safetensors); the index CSV goes beside it.")
    ] = Path("embeddings.safetensors"),
    source: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Pretrain or fine-tuned artifact, or a run folder (its pretrain backbone; default: latest run).",
        ),
    ] = None,
    batch_size: InferenceBatch = 256,
    workers: Workers = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """L2-normalised backbone features of every image, for search and your own models."""
    from labelfew.use import predict as stage

    config = stage.EmbedConfig(
        images=images, out=out, source=source, batch_size=batch_size, workers=workers, quiet=quiet
    )
    guarded(lambda: stage.embed(config), debug)


@app.command()
def similar(
    query: Annotated[Path, typer.Argument(help="The image to search with.")],
    index: Annotated[Path, typer.Option("--index", help="Embeddings written by `labelfew embed`.")] = Path(
        "embeddings.safetensors"
    ),
    top_k: TopK = 10,
    source: Annotated[
        Path | None,
        typer.Option("--from", help="The model the index was built with, if it has moved since."),
    ] = None,
    debug: Debug = False,
) -> None:
    """The indexed images most similar to a query image (cosine similarity of backbone features)."""
    from labelfew.use import predict as stage

    config = stage.SimilarConfig(query=query, index=index, top_k=top_k, source=source)
    guarded(lambda: stage.similar(config), debug)


@app.command()
def export(
    source: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Fine-tuned or pretrain artifact, or a run folder (its fine-tuned model; default: latest run).",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder to write (default: export/ beside the artifact).")
    ] = None,
    export_format: Annotated[
        str,
        typer.Option("--format", help="safetensors (timm-loadable + config.json), onnx, or both (default)."),
    ] = "both",
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Write the model as timm-loadable safetensors + config.json and as ONNX."""
    from labelfew.use import export as stage

    config = stage.ExportConfig(source=source, out=out, format=export_format, quiet=quiet)
    guarded(lambda: stage.run(config), debug)


def main() -> None:
    """Entry point of the `labelfew` script and `python -m labelfew`."""
    app(prog_name="labelfew")


if __name__ == "__main__":  # pragma: no cover
    main()
