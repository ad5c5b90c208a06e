"""`labelfew select` on a tiny real run: 200 digit images, a 1-epoch pretraining, a 1-epoch fine-tune."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import CopyPerClass
from typer.testing import CliRunner

from labelfew.cli import app
from labelfew.config import FinetuneConfig, PretrainConfig, SelectConfig
from labelfew.data.labels import read_labels, write_labels
from labelfew.data.subsets import balanced_subset
from labelfew.errors import UserError
from labelfew.stages import finetune, pretrain
from labelfew.stages import select as stage

runner = CliRunner()


@pytest.fixture(scope="module")
def work(
    digits_folder: tuple[Path, Path], copy_per_class: CopyPerClass, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A pool of 200 digits (20 per class), its pretraining, 20 labels and a model fine-tuned on them."""
    train, _ = digits_folder
    root = tmp_path_factory.mktemp("select")
    pool = copy_per_class(train, root / "pool", per_class=20)
    run = root / "runs" / "digits"
    pretrain.run(
        PretrainConfig(
            data=pool, out=run, arch="test_resnet", epochs=1, batch_size=100, workers=0, quiet=True
        )
    )
    labels = root / "labels.csv"
    write_labels(balanced_subset(read_labels(pool), per_class=2, seed=0), labels)
    tuned = root / "tuned"
    finetune.run(
        FinetuneConfig(
            labels=labels, source=run, out=tuned / "finetune", epochs=1, batch_size=20, workers=0, quiet=True
        )
    )
    return {"root": root, "pool": pool, "run": run, "labels": labels, "tuned": tuned / "finetune"}


def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def select(work: dict[str, Path], name: str, **settings: object) -> list[dict[str, str]]:
    out = work["root"] / name / "to-label.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    defaults: dict[str, object] = {"folder": work["pool"], "budget": 10, "out": out, "source": work["run"]}
    stage.run(SelectConfig(**{**defaults, **settings, "workers": 0, "quiet": True}))  # type: ignore[arg-type]
    return rows_of(out)


def test_writes_budget_rows_with_empty_labels_and_the_page(work: dict[str, Path]) -> None:
    rows = select(work, "typical")
    assert len(rows) == 10 and list(rows[0]) == ["path", "label"]
    assert all(row["label"] == "" for row in rows)
    folder = work["root"] / "typical"
    pool = {path.resolve() for path in work["pool"].rglob("*.png")}
    assert {(folder / row["path"]).resolve() for row in rows} <= pool
    assert len({row["path"] for row in rows}) == 10
    page = (folder / "to-label.html").read_text(encoding="utf-8")
    assert page.count('<img src="data:image/jpeg;base64,') == 10
    assert all(row["path"] in page for row in rows)
    # the classes of 200 digits: typical picks from 10 clusters cover most of them
    assert len({row["path"].split("/")[-2] for row in rows}) >= 6


def test_same_seed_same_choice(work: dict[str, Path]) -> None:
    assert select(work, "seed-a", seed=3) == select(work, "seed-b", seed=3)


def test_labelled_images_are_never_chosen_again(work: dict[str, Path]) -> None:
    labelled = {path.resolve() for path in read_labels(work["labels"]).paths}
    rows = select(work, "with-labels", labels=work["labels"], strategy="typical")
    folder = work["root"] / "with-labels"
    assert not {(folder / row["path"]).resolve() for row in rows} & labelled


def test_mixed_is_the_default_with_a_model_and_labels(work: dict[str, Path]) -> None:
    # 20 labels of 10 classes: mixed picks typical images up to 5 per class (30 more), then uncertain
    out = work["root"] / "mixed" / "to-label.csv"
    out.parent.mkdir()
    config = SelectConfig(
        folder=work["pool"],
        budget=40,
        out=out,
        source=work["tuned"],
        labels=work["labels"],
        workers=0,
        quiet=True,
    )
    stage.run(config)
    page = out.with_suffix(".html").read_text(encoding="utf-8")
    assert page.count("(typical)") == 30 and page.count("(uncertain)") == 10
    assert '<option value="7">' in page  # the model's classes are offered


def test_uncertain_spreads_over_clusters(work: dict[str, Path]) -> None:
    rows = select(work, "uncertain", source=work["tuned"], labels=work["labels"], strategy="uncertain")
    page = (work["root"] / "uncertain" / "to-label.html").read_text(encoding="utf-8")
    assert len(rows) == 10 and page.count("(uncertain)") == 10
    assert page.count("<h2>cluster") == 10  # 30 clusters, one pick in each of 10


def test_uncertain_needs_a_fine_tuned_model(work: dict[str, Path]) -> None:
    with pytest.raises(UserError, match="needs a fine-tuned model"):
        select(work, "no-model", strategy="uncertain")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--budget", "0"], "--budget 0"),
        (["--budget", "201"], "only 200 unlabelled images"),
        (["--budget", "5", "--labels", "OUTSIDE"], "not in the folder"),
        (["--budget", "5", "--from", "EMPTY"], "no completed"),
        (["--budget", "5", "--from", "SCRATCH"], "no pretrained backbone"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    work: dict[str, Path], tmp_path: Path, arguments: list[str], message: str
) -> None:
    outside = tmp_path / "outside.csv"
    outside.write_text(f"path,label\n{work['labels'].resolve()},x\n")  # a file, but not in the pool
    empty = tmp_path / "empty-run"
    empty.mkdir()
    replaced = {"OUTSIDE": str(outside), "EMPTY": str(empty), "SCRATCH": str(_scratch_model(work))}
    arguments = [replaced.get(argument, argument) for argument in arguments]
    result = runner.invoke(
        app,
        [
            "select",
            str(work["pool"]),
            "--out",
            str(tmp_path / "x.csv"),
            "--from",
            str(work["run"]),
            *arguments,
        ],
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def _scratch_model(work: dict[str, Path]) -> Path:
    """A run with only a --scratch fine-tuned model (no pretrained backbone)."""
    folder = work["root"] / "scratch-run" / "finetune"
    if not (folder / "model.safetensors").is_file():
        finetune.run(
            FinetuneConfig(
                labels=work["labels"], scratch=True, arch="test_resnet", out=folder, epochs=1, batch_size=20,
                workers=0, quiet=True,
            )
        )  # fmt: skip
    return folder / "model.safetensors"
