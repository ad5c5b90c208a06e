"""Shared fixtures: real image folders for the tests.

Tests that need `../shared/datasets` skip with a reason in a user's clone (where it is absent),
but fail under CI (env CI=true), where a skip would hide a test that never ran.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from labelfew.demo import write_digits
from labelfew.engine import accelerator as accelerators

REPO = Path(__file__).resolve().parent.parent
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def _float32_pretraining_on_every_cpu() -> Iterator[None]:
    """`pretrain --precision auto` is bf16 on CPUs with native bf16 (AVX512-BF16, AMX) and float32
    elsewhere; the suite runs as on a CPU without it, so that its pretrained models, and what tests
    read from them, are the same on every CI machine. `tests/stages/test_pretrain_cpu_step.py` and
    `tests/engine/test_accelerator.py` patch it back to test the bf16 choice itself."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(accelerators, "native_cpu_bf16", lambda: False)
        yield


CopyPerClass = Callable[[Path, Path, int], Path]
"""copy_per_class(source, destination, per_class) -> destination"""


def _copy_per_class(source: Path, destination: Path, per_class: int, classes: int | None = None) -> Path:
    """The first `per_class` images of each class folder of `source` (of the first `classes` folders
    when given), copied to `destination`."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir())[:classes]:
        (destination / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[:per_class]:
            shutil.copy(path, destination / folder.name / path.name)
    return destination


@pytest.fixture(scope="session")
def copy_per_class() -> CopyPerClass:
    """Copies the first N images of each class folder (the small real runs of several test modules)."""
    return _copy_per_class


def shared_dataset(name: str) -> Path:
    """The path of a dataset under ../shared/datasets, or a skip (a failure under CI)."""
    path = SHARED_DATASETS / name
    if not path.exists():
        reason = f"{path} is absent (it lies beside the repo on the team's machines and in CI)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must not skip: {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    """../shared/datasets/hymenoptera_data (train/{ants,bees}, val/{ants,bees}; 398 photos)."""
    return shared_dataset("hymenoptera_data")


@pytest.fixture(scope="session")
def cifar10_archive() -> Path:
    """../shared/datasets/cifar10_jpg (the 60k-image JPEG archive and its README)."""
    return shared_dataset("cifar10_jpg")


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """scikit-learn's digits as 32 px PNG files: (train folder, test folder), class per subfolder."""
    return write_digits(tmp_path_factory.mktemp("digits"))


TinyRun = dict[str, Path]
"""work, run (its pretrain), unlabeled (20 digits of each of 3 classes), labels (5 of each), test (5 of each)"""


@pytest.fixture(scope="session")
def tiny_pretrained(digits_folder: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch test_resnet pretrain on 60 digits of 3 classes and the folders beside it (made once)."""
    from labelfew.config import PretrainConfig
    from labelfew.stages import pretrain

    train, test = digits_folder
    work = tmp_path_factory.mktemp("tiny-pretrained")
    for name, source, count in (("unlabeled", train, 20), ("labels", train, 5), ("test", test, 5)):
        _copy_per_class(source, work / name, count, classes=3)
    pretrain.run(PretrainConfig(data=work / "unlabeled", out=work / "run", arch="test_resnet", small_stem=False,
                                epochs=1, batch_size=30, workers=0, quiet=True))  # fmt: skip
    return work


def copy_tiny_run(tiny_pretrained: Path, destination: Path) -> TinyRun:
    """A copy of `tiny_pretrained`'s folders in `destination`, for a test module to add its stages to."""
    shutil.copytree(tiny_pretrained, destination, dirs_exist_ok=True)
    names = ("unlabeled", "labels", "test", "run")
    return {"work": destination, **{name: destination / name for name in names}}
