"""The CLI surface: help, version, the subset command, and one-line errors with exit code 2."""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import typer
import typer.core
from typer.testing import CliRunner

from labelfew import __version__, cli
from labelfew.cli import app
from labelfew.config import (
    COMMAND_CONFIGS,
    DemoConfig,
    EmbedConfig,
    EvaluateConfig,
    ExportConfig,
    FinetuneConfig,
    PredictConfig,
    PretrainConfig,
    SimilarConfig,
    SubsetConfig,
    build_config,
    takes_recipe,
)
from labelfew.errors import UserError
from labelfew.options import default_text, field_options, flag_of, option

runner = CliRunner()
COMMANDS = ("pretrain", "subset", "finetune", "evaluate", "demo", "predict", "embed", "similar", "export")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # ./runs of these tests is the temporary folder's


def test_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"labelfew {__version__}"
    for command in COMMANDS:
        result = runner.invoke(app, [command, "-h"])
        assert result.exit_code == 0, command
        assert "Usage" in result.stdout


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "labelfew", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and __version__ in result.stdout


def test_subset_writes_a_balanced_csv(digits_folder: tuple[Path, Path], tmp_path: Path) -> None:
    train, _ = digits_folder
    out = tmp_path / "subset.csv"
    result = runner.invoke(app, ["subset", str(train), "--fraction", "0.1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    counts = {label: sum(row["label"] == label for row in rows) for label in {row["label"] for row in rows}}
    assert len(counts) == 10 and all(13 <= count <= 14 for count in counts.values())
    assert all((tmp_path / row["path"]).is_file() for row in rows)  # paths relative to the CSV


def _one_line_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_bad_input_gives_one_line_and_exit_code_2(tmp_path: Path, digits_folder: tuple[Path, Path]) -> None:
    train, test = digits_folder
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.csv").write_text("file,class\na.png,1\n")
    assert "no such folder" in _one_line_error(["pretrain", str(tmp_path / "missing")])
    assert "no image files" in _one_line_error(["pretrain", str(tmp_path / "empty")])
    assert "larger than" in _one_line_error(["pretrain", str(train), "--batch-size", "100000"])
    assert "not a timm model" in _one_line_error(
        ["pretrain", str(train), "--arch", "resnet_nope", "--batch-size", "8"]
    )
    assert "fp16" in _one_line_error(["pretrain", str(train), "--precision", "fp16", "--batch-size", "8"])
    assert "out of range" in _one_line_error(["subset", str(train), "--fraction", "0", "--out", "x.csv"])
    assert "out of range" in _one_line_error(["subset", str(train), "--fraction", "1.5", "--out", "x.csv"])
    assert "empty" in _one_line_error(["subset", str(train), "--fraction", "0.001", "--out", "x.csv"])
    assert "missing column" in _one_line_error(
        ["subset", str(tmp_path / "bad.csv"), "--fraction", "0.5", "--out", "x.csv"]
    )
    assert "no pretrain artifact" in _one_line_error(["finetune", "--labels", str(train)])
    assert "no such file" in _one_line_error(
        ["evaluate", "--test", str(test), "--from", str(tmp_path / "m.safetensors")]
    )
    assert "not valid TOML" in _one_line_error(
        ["pretrain", str(train), "--recipe", str(tmp_path / "bad.csv")]
    )


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    """The same bad input gives one line without `--debug`, and Python's traceback with it (run as a
    user runs it: in a CliRunner an exception is recorded whatever the exit path)."""
    plain = runner.invoke(app, ["pretrain", str(tmp_path / "missing")])
    assert plain.exit_code == 2 and plain.output.strip().startswith("error:") and "missing" in plain.output
    assert len(plain.output.strip().splitlines()) == 1
    command = [sys.executable, "-m", "labelfew", "pretrain", str(tmp_path / "missing"), "--debug"]
    debug = subprocess.run(command, capture_output=True, text=True, check=False)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "labelfew.errors.UserError" in debug.stderr and "no such folder" in debug.stderr


def test_demo_runs_the_whole_pipeline(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "evaluate" / "report.json").is_file()
    assert (tmp_path / "demo" / "finetune-scratch-labels-10-per-class" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "distill-labels-10-per-class" / "model.safetensors").is_file()
    report = json.loads((tmp_path / "demo" / "evaluate" / "report.json").read_text())
    methods = {row["method"] for row in report["rows"]}
    # the transfer baseline: the demo's own pretrained backbone, exported and read back by finetune --init
    assert {
        "fine-tuned",
        "fine-tuned (scratch)",
        "distilled",
        "fine-tuned (init pretrain-export)",
        "linear (frozen)",
    } <= methods
    assert (tmp_path / "demo" / "pretrain" / "pretrain-export" / "config.json").is_file()


# The CLI is built from the configs (labelfew.options): one declaration per option.


def _commands() -> dict[str, typer.core.TyperCommand]:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    return dict(group.commands)  # type: ignore[arg-type]


def test_every_config_field_is_a_cli_parameter_with_its_flag_default_and_help() -> None:
    commands = _commands()
    assert list(commands) == list(COMMAND_CONFIGS) == list(cli.COMMANDS)
    for name, config_class in COMMAND_CONFIGS.items():
        params = {param.name: param for param in commands[name].params}
        declared = field_options(config_class)
        extra = {"recipe", "debug"} if takes_recipe(config_class) else {"debug"}
        assert set(params) == {item.name for item, _, _ in declared} | extra, name  # and nothing else
        for item, spec, annotation in declared:
            param = params[item.name]
            if spec.argument:
                assert isinstance(param, typer.core.TyperArgument) and param.required, (name, item.name)
                continue
            assert isinstance(param, typer.core.TyperOption), (name, item.name)
            assert flag_of(item.name, spec) in param.opts and (not spec.short or spec.short in param.opts)
            help_text = param.help or ""
            assert help_text.startswith(cli._plain(spec.help)), (name, item.name)
            if cli.is_single_flag(spec, annotation):
                assert param.is_flag and param.default is False and not param.secondary_opts
            elif item.default is dataclasses.MISSING:
                assert param.required, (name, item.name)
            else:
                assert param.default is None, (name, item.name)  # only what is typed overrides the recipe
                shown = default_text(item, spec)
                assert shown == "—" or help_text.endswith(f"Default: {cli._plain(shown)}."), (name, item.name)
            if annotation in (bool, bool | None) and spec.toggle:
                assert param.secondary_opts == ["--no-" + flag_of(item.name, spec)[2:]], (name, item.name)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["pretrain", "d"], PretrainConfig(data=Path("d"))),
        (
            ["pretrain", "d", "--no-small-stem", "--restart", "--quiet", "--optimizer", "sgd", "--memory-budget", "2"],
            PretrainConfig(data=Path("d"), small_stem=False, restart=True, quiet=True, optimizer="sgd", memory_budget=2.0),
        ),
        (["subset", "l.csv", "--out", "o.csv", "--per-class", "3", "--allow-empty"],
         SubsetConfig(labels=Path("l.csv"), out=Path("o.csv"), per_class=3, allow_empty=True)),
        (["finetune", "--labels", "l.csv", "--from", "runs/a", "--scratch", "--balanced"],
         FinetuneConfig(labels=Path("l.csv"), source=Path("runs/a"), scratch=True, balanced=True)),
        (["evaluate", "--test", "t", "--plots", "--knn-k", "5"], EvaluateConfig(test=Path("t"), plots=True, knn_k=5)),
        (["demo", "--epochs", "2"], DemoConfig(epochs=2)),
        (["predict", "i", "-k", "5"], PredictConfig(images=Path("i"), top_k=5)),
        (["embed", "i", "--batch-size", "8"], EmbedConfig(images=Path("i"), batch_size=8)),
        (["similar", "q.png", "--top-k", "4", "--from", "m"], SimilarConfig(query=Path("q.png"), top_k=4, source=Path("m"))),
        (["export", "--format", "onnx"], ExportConfig(format="onnx")),
    ],
)  # fmt: skip
def test_the_command_line_builds_the_config(
    args: list[str], expected: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = []

    def build_and_stop(config_class: type, recipe: dict, **options: object) -> None:
        built.append(build_config(config_class, recipe, **options))
        raise UserError("stopped before the run")

    monkeypatch.setattr(cli, "build_config", build_and_stop)
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "stopped before the run" in result.output, result.output
    assert built == [expected]


def test_flags_left_off_keep_the_recipe_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[pretrain]\nquiet = true\nrestart = true\nblur = false\noptimizer = "adamw"\n')
    built = []
    monkeypatch.setattr(cli, "build_config", lambda *a, **k: built.append(build_config(*a, **k)) or 1 / 0)
    runner.invoke(app, ["pretrain", "d", "--recipe", str(recipe)])
    assert (built[0].quiet, built[0].restart, built[0].blur, built[0].optimizer) == (
        True,
        True,
        False,
        "adamw",
    )


def test_a_field_added_to_a_config_appears_on_the_command_line() -> None:
    @dataclasses.dataclass(frozen=True)
    class NewConfig:
        images: Path = option(argument=True, help="Images.")
        strength: float = option(0.5, above=0, help="How strong.")
        mode: str = option("fast", choices=("fast", "slow"), help="Which mode.")
        lr: float | str = option("auto", help="A number, or auto.")
        verbose: bool = option(False, toggle=False, help="Say more.")

    seen = []
    new_app = typer.Typer()
    new_app.command("new")(cli.command(NewConfig, seen.append, "A new command."))
    new_app.command("other")(lambda: None)  # a group, so that `new` is a subcommand
    result = runner.invoke(
        new_app, ["new", "x", "--strength", "2", "--mode", "slow", "--lr", "0.1", "--verbose"]
    )
    assert result.exit_code == 0, result.output
    assert seen == [NewConfig(images=Path("x"), strength=2.0, mode="slow", lr=0.1, verbose=True)]
    assert "How strong. Default: 0.5." in runner.invoke(new_app, ["new", "--help"]).output


@pytest.mark.parametrize("command", list(COMMAND_CONFIGS))
def test_help_at_80_columns_shows_every_option_name_whole(command: str) -> None:
    # rich shrank every column of the option table and cut 11 names (`--checkpoint-eve…`) (issue 22, item 13)
    import re

    output = CliRunner().invoke(app, [command, "-h"], env={"COLUMNS": "80"}, terminal_width=80).output
    assert max(len(line) for line in output.splitlines()) <= 80
    for item, spec, annotation in field_options(COMMAND_CONFIGS[command]):
        if spec.argument:
            continue
        names = [flag_of(item.name, spec)]
        if annotation in (bool, bool | None) and spec.toggle:
            names.append("--no-" + names[0][2:])
        for name in names:
            assert re.search(re.escape(name) + r"(?![\w-])", output), f"{command}: {name} cut in\n{output}"


# Run folders, locks and Ctrl-C (issue 22, items 3, 4 and 7)


def _tiny_images(folder: Path, count: int = 8) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    generator = np.random.default_rng(len(str(folder)))
    for index in range(count):
        Image.fromarray(generator.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


TINY_PRETRAIN = ["--arch", "test_resnet", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--quiet"]


def test_two_data_folders_of_one_name_get_two_runs_and_restart_keeps_the_other(tmp_path: Path) -> None:
    first, second = _tiny_images(tmp_path / "a" / "train"), _tiny_images(tmp_path / "b" / "train")
    for data in (first, second):
        result = runner.invoke(app, ["pretrain", str(data), *TINY_PRETRAIN])
        assert result.exit_code == 0, result.output
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(run.name.startswith("train-") for run in runs)
    taken = next(run for run in runs if str(first) in (run / "pretrain" / ".source.json").read_text())
    weights = (taken / "pretrain" / "backbone.safetensors").read_bytes()
    message = _one_line_error(["pretrain", str(second), "--out", str(taken), "--restart", *TINY_PRETRAIN])
    assert f"made from {first}, not {second}" in message and "--restart would delete it" in message
    assert (taken / "pretrain" / "backbone.safetensors").read_bytes() == weights
    assert not (taken / "pretrain" / ".lock").exists()  # released on the error's way out too


def test_a_second_run_on_one_out_exits_2_naming_the_first(tmp_path: Path) -> None:
    data, out = _tiny_images(tmp_path / "data"), tmp_path / "run"
    (out / "pretrain").mkdir(parents=True)
    hold = "import sys; from pathlib import Path; from labelfew import locks; "
    hold += "locks.lock_stage_folder(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()"
    first = subprocess.Popen([sys.executable, "-c", hold, str(out / "pretrain")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert first.stdout is not None and first.stdout.readline() == "locked\n"
        message = _one_line_error(["pretrain", str(data), "--out", str(out), *TINY_PRETRAIN])
        assert f"in use by another labelfew run (pid {first.pid} on " in message
    finally:
        first.communicate("")
    assert runner.invoke(app, ["pretrain", str(data), "--out", str(out), *TINY_PRETRAIN]).exit_code == 0


def test_the_exit_path_never_imports_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C during the first import of torch left it half imported; importing it again on the
    way out printed a second traceback or crashed (exit 139)."""
    import labelfew

    for name in [name for name in sys.modules if name.startswith("labelfew.engine")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(labelfew, "engine", raising=False)

    def fails() -> None:
        raise UserError("bad input")

    with pytest.raises(typer.Exit):
        cli.guarded(fails, debug=False)
    assert "labelfew.engine" not in sys.modules


STARTS = "import sys; from labelfew.__main__ import main; sys.argv[0] = 'labelfew'; print('ready', flush=True); main()"
"""The `labelfew` script, saying when the interpreter is up (a signal before that is Python's own)."""


def test_ctrl_c_at_any_moment_exits_130_with_one_line(tmp_path: Path) -> None:
    """SIGINT (and SIGTERM) while the CLI, torch or the stage imports, while the images load, while
    it trains: exit 130 (143), one line, and the stage folder's lock released."""
    data = _tiny_images(tmp_path / "data")
    stops = [(0.05, signal.SIGINT), (0.3, signal.SIGINT), (0.8, signal.SIGINT), (1.5, signal.SIGINT),
             (3.0, signal.SIGTERM), (3.0, signal.SIGINT), (6.0, signal.SIGINT)]  # seconds after the interpreter is up  # fmt: skip
    processes = []
    for index in range(len(stops)):
        command = [sys.executable, "-c", STARTS, "pretrain", str(data), "--out", str(tmp_path / f"run{index}"),
                   *TINY_PRETRAIN, "--epochs", "1000"]  # fmt: skip
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for process in processes:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
    started = time.monotonic()
    for (delay, number), process in zip(stops, processes, strict=True):
        time.sleep(max(0.0, started + delay - time.monotonic()))
        process.send_signal(number)
    for index, ((delay, number), process) in enumerate(zip(stops, processes, strict=True)):
        _, stderr = process.communicate(timeout=120)
        lines = [line for line in stderr.splitlines() if not line.startswith("pretrain epoch")]
        assert process.returncode == 128 + number, (delay, stderr)
        assert len(lines) == 1 and lines[0].startswith("interrupted"), (delay, stderr)
        assert not list((tmp_path / f"run{index}").rglob(".lock")), delay


def test_a_full_disk_anywhere_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A write outside the checkpoints and artifacts (the training log) that finds the disk full."""

    def writes() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(typer.Exit) as caught:
        cli.guarded(writes, debug=False)
    assert caught.value.exit_code == 2
    message = capsys.readouterr().err
    assert message.startswith("error: the disk is full") and "rerun the same command" in message
    assert message.count("\n") == 1
