"""The `labelfew` command, built from the configs: each command builds a config and calls `run(config)`.

Every option of a command is a field of its config in `labelfew.config` (type, default, help,
choices, range); this module turns the fields into Typer parameters, so a field added there
appears here with its help. The config validates itself when it is built, so a bad value exits
2 before any image is read.

Exit codes: 0 success, 2 bad input (one line saying what and what to do), 1 internal error,
130 interrupted (143 on SIGTERM). `--debug` shows full tracebacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import signal
import sys
import threading
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from labelfew import __version__
from labelfew.config import (
    COMMAND_CONFIGS,
    DemoConfig,
    DistillConfig,
    EmbedConfig,
    EvaluateConfig,
    ExportConfig,
    FinetuneConfig,
    PredictConfig,
    PretrainConfig,
    SelectConfig,
    SimilarConfig,
    SubsetConfig,
    build_config,
    load_recipe,
    takes_recipe,
)
from labelfew.errors import Interrupted, UserError
from labelfew.fileio import DISK_FULL_HINT, is_disk_full
from labelfew.locks import release_locks
from labelfew.options import Option, default_text, field_options, flag_of

HELP_WIDTH = 120
"""`-h` is click's plain layout, as wide as the terminal up to this: rich's option table shrank every
column to fit 80 columns, cut option names (`--checkpoint-eve…`) and wrapped help 19 characters wide."""

app = typer.Typer(
    name="labelfew",
    help="Many images, few labels: SimCLR pretraining, fine-tuning on a label subset, evaluation.",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": HELP_WIDTH},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

T = TypeVar("T")
Field = dataclasses.Field[Any]

# The two options that are not config fields: where the values come from, and how errors show.
RECIPE = inspect.Parameter(
    "recipe",
    inspect.Parameter.KEYWORD_ONLY,
    default=None,
    annotation=Annotated[
        Path | None,
        typer.Option("--recipe", help="TOML recipe (see recipes/); options given here override it."),
    ],
)
DEBUG = inspect.Parameter(
    "debug",
    inspect.Parameter.KEYWORD_ONLY,
    default=False,
    annotation=Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")],
)


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


class _StopAtOnce:
    """SIGINT/SIGTERM outside the training loop (which checkpoints first: `engine.signals`): one
    line, the stage folder's lock released, exit 130/143 at once.

    Python's KeyboardInterrupt can land inside an import (torch's takes seconds): the half-imported
    modules then fail with other errors, print several tracebacks, or crash at exit (exit 1 or
    139 where Ctrl-C should give 130).
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.reported = False  # a line was printed already: the signal only hurries the exit
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopAtOnce:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self)
        return self

    def __call__(self, number: int, frame: Any) -> None:
        if os.getpid() != self.pid:  # a forked loader worker: as Python does (its loop ignores it)
            raise KeyboardInterrupt
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a flush this signal interrupted
                stream.flush()
        if not self.reported:
            os.write(2, f"interrupted: stopped by {signal.Signals(number).name}\n".encode())
        release_locks()
        os._exit(128 + number)

    def __exit__(self, *exc: object) -> None:
        for number, handler in self.previous.items():
            if handler is not None:  # None: a handler set outside Python, which cannot be restored
                signal.signal(number, handler)


def guarded(action: Callable[[], T], debug: bool) -> T:
    """Runs a command body; turns errors into one line and an exit code (130 on Ctrl-C, at any moment)."""
    with _StopAtOnce() as stop:
        try:
            return action()
        except UserError as error:
            if debug:
                raise
            stop.reported = True
            typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None
        except Interrupted as error:
            stop.reported = True
            typer.secho(f"interrupted: {error}", err=True, fg=typer.colors.YELLOW)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:  # a second Ctrl-C during training (`engine.signals`)
            stop.reported = True
            typer.secho("interrupted", err=True, fg=typer.colors.YELLOW)
            raise typer.Exit(130) from None
        except Exception as error:
            if debug:
                raise
            stop.reported = True
            if is_disk_full(error, Path(getattr(error, "filename", None) or ".")):
                typer.secho(f"error: the disk is full ({error}); {DISK_FULL_HINT}", err=True, fg="red")
                raise typer.Exit(2) from None
            typer.secho(
                f"internal error: {type(error).__name__}: {error} (rerun with --debug for the traceback)",
                err=True,
                fg=typer.colors.RED,
            )
            raise typer.Exit(1) from None
        finally:
            release_locks()
            # Only a command that imported the engine has a process group. Importing it here would
            # import torch, and importing a torch whose import Ctrl-C cut short can crash.
            accelerator = sys.modules.get("labelfew.engine.accelerator")
            if accelerator is not None:
                accelerator.shutdown()


# What each command runs; the stage modules are imported only then (`labelfew -h` stays fast).
def _pretrain(config: PretrainConfig) -> Path:
    from labelfew.stages import pretrain

    return pretrain.run(config)


def _finetune(config: FinetuneConfig) -> Path:
    from labelfew.stages import finetune

    return finetune.run(config)


def _distill(config: DistillConfig) -> Path:
    from labelfew.stages import distill

    return distill.run(config)


def _evaluate(config: EvaluateConfig) -> Any:
    from labelfew.stages import evaluate

    return evaluate.run(config)


def _subset(config: SubsetConfig) -> None:
    from labelfew.data.labels import read_labels, write_labels
    from labelfew.data.subsets import balanced_subset, cover_subset

    if config.out.is_dir():  # else an IsADirectoryError after the labels were read
        raise UserError(
            f"--out {config.out}: a folder; name the CSV to write, e.g. {config.out / 'subset.csv'}"
        )
    full = read_labels(config.labels, config.label_delimiter)
    if full.multi_label:  # a greedy cover keeps a positive of every class
        chosen = cover_subset(full, fraction=config.fraction, per_class=config.per_class, seed=config.seed)
    else:
        chosen = balanced_subset(full, fraction=config.fraction, per_class=config.per_class, seed=config.seed,
                                 allow_empty=config.allow_empty)  # fmt: skip
    write_labels(chosen, config.out)
    typer.echo(
        f"wrote {config.out}: {len(chosen)} of {len(full)} images, {len(chosen.class_names)} classes "
        f"({min(chosen.counts().values())}–{max(chosen.counts().values())} per class)"
    )


def _select(config: SelectConfig) -> Path:
    from labelfew.stages import select

    return select.run(config)


def _demo(config: DemoConfig) -> Any:
    from labelfew import demo

    return demo.run(out=config.out, epochs=config.epochs, quiet=config.quiet)


def _predict(config: PredictConfig) -> Path:
    from labelfew.use import predict

    return predict.predict(config)


def _embed(config: EmbedConfig) -> Path:
    from labelfew.use import embed

    return embed.embed(config)


def _similar(config: SimilarConfig) -> Any:
    from labelfew.use import similar

    return similar.similar(config)


def _export(config: ExportConfig) -> Path:
    from labelfew.use import export

    return export.run(config)


COMMANDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "pretrain": ("SimCLR pretraining on a folder of unlabeled images.", _pretrain),
    "subset": ("A class-balanced, seeded label subset (1% / 10%), written as a CSV.", _subset),
    "select": (
        "Which images to label first: the most typical image of each k-means cluster of the "
        "pretrained embeddings (TypiClust), or the fine-tuned model's most uncertain; writes "
        "to-label.csv and to-label.html, a page to label them in.",
        _select,
    ),
    "finetune": (
        "Fine-tune the pretrained backbone (or a random one, --scratch) on labelled images.",
        _finetune,
    ),
    "distill": (
        "Distil the fine-tuned model into a student (same or smaller arch) on unlabeled images (SimCLRv2).",
        _distill,
    ),
    "evaluate": ("kNN, linear probe and fine-tuned accuracy on a labelled test set.", _evaluate),
    "demo": ("The whole pipeline on scikit-learn's bundled digits images (real data, no download).", _demo),
    "predict": ("Classify every image of a folder with the fine-tuned model; writes a CSV.", _predict),
    "embed": ("L2-normalised backbone features of every image, for search and your own models.", _embed),
    "similar": (
        "The indexed images most similar to a query image (cosine similarity of backbone features).",
        _similar,
    ),
    "export": ("Write the model as timm-loadable safetensors + config.json and as ONNX.", _export),
}  # in the order of `labelfew -h`; the keys are those of labelfew.config.COMMAND_CONFIGS


def is_single_flag(spec: Option, annotation: Any) -> bool:
    """A bool declared `toggle=False`: one `--flag` that turns it on (`--quiet`, `--restart`)."""
    return annotation is bool and not spec.toggle


def _plain(text: str) -> str:
    """README markdown (`code`, **bold**) as plain text for `-h`."""
    return text.replace("`", "").replace("**", "")


def _cli_type(annotation: Any) -> Any:
    """The type Typer parses: `int | None` -> int; a union of several types (`float | str`) -> str."""
    if typing.get_origin(annotation) is tuple:  # a repeatable option: `--logger a --logger b`
        return list[typing.get_args(annotation)[0]]  # type: ignore[misc]
    kinds = [kind for kind in typing.get_args(annotation) if kind is not type(None)] or [annotation]
    return kinds[0] if len(kinds) == 1 else str


def parameter(item: Field, spec: Option, annotation: Any) -> inspect.Parameter:
    """The Typer parameter of one config field.

    Options default to None (False for single flags), so that only what the user typed overrides
    the recipe; `-h` shows the config's default instead.
    """
    kind = _cli_type(annotation)
    if spec.argument:
        info: Any = typer.Argument(help=_plain(spec.help), show_default=False)
        return inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, info])
    long = flag_of(item.name, spec)
    names = [spec.short, long] if spec.short else [long]
    default: Any = None
    shown = default_text(item, spec)
    if is_single_flag(spec, annotation):
        kind, default, shown = bool, False, "—"
    elif kind is bool:
        names = [f"{long}/--no-{long.removeprefix('--')}"]
    text = spec.help if shown in ("—", "required") else f"{spec.help} Default: {shown}."
    metavar = "|".join(spec.choices) if spec.choices else None
    info = typer.Option(*names, help=_plain(text), show_default=False, metavar=metavar)
    if item.default is dataclasses.MISSING:  # a required option (`finetune --labels`)
        return inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, info])
    return inspect.Parameter(
        item.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind | None, info]
    )


def _typed(value: Any, annotation: Any) -> Any:
    """A CLI string for a field of several types (`float | str`): the number when it is one; the
    values of a repeated option as a tuple (none given: None, so the recipe or default holds)."""
    if isinstance(value, list):
        return tuple(value) or None
    if not isinstance(value, str) or _cli_type(annotation) is not str:
        return value
    for kind in (int, float):
        if kind in typing.get_args(annotation):
            try:
                return kind(value)
            except ValueError:
                continue
    return value


def command(config_class: type, run: Callable[[Any], Any], summary: str) -> Callable[..., None]:
    """A Typer command whose parameters are the fields of `config_class` (+ --recipe, --debug)."""
    declared = field_options(config_class)

    def body(**given: Any) -> None:
        debug = given.pop("debug")
        recipe = given.pop("recipe", None)
        values = {}
        for item, spec, annotation in declared:
            value = given[item.name]
            single_off = is_single_flag(spec, annotation) and value is False
            values[item.name] = None if single_off else _typed(value, annotation)

        def action() -> Any:
            return run(build_config(config_class, load_recipe(recipe), **values))

        guarded(action, debug)

    parameters = [parameter(item, spec, annotation) for item, spec, annotation in declared]
    parameters += [RECIPE, DEBUG] if takes_recipe(config_class) else [DEBUG]
    body.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    body.__annotations__ = {item.name: item.annotation for item in parameters}
    body.__doc__ = summary
    return body


for _name, (_summary, _run) in COMMANDS.items():
    app.command(_name, help=_summary)(command(COMMAND_CONFIGS[_name], _run, _summary))


def main() -> None:
    """Entry point of the `labelfew` script and `python -m labelfew`."""
    app(prog_name="labelfew")


if __name__ == "__main__":  # pragma: no cover
    main()
