"""A two-minute version of the CPU CIFAR-10 recipe: SimCLR + 1% labels must beat 1% labels alone.

Excluded from the default suite (marker `slow`); `.ci/run` runs it after the suite:
    python -m pytest -m slow
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_ssl_beats_scratch_on_cifar10_with_one_percent_labels(cifar10_archive: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, str(REPO / "benchmarks" / "label_efficiency.py"),
        "--recipe", str(REPO / "recipes" / "cifar10-cpu.toml"), "--cache", str(tmp_path / "cache"),
        "--out", str(tmp_path / "results"), "--unlabeled-images", "5000", "--pretrain-epochs", "8",
        "--fractions", "0.01", "--seeds", "0", "--test-images", "2000", "--semi", "--quiet",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    cell = report["results"]["0.01"]
    assert cell["fine-tuned (SSL)"][0] > cell["fine-tuned (scratch)"][0], cell
