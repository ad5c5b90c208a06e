"""`benchmarks/gpu_check.sh --smoke`: the GPU check's every step, end to end, on the CPU at tiny sizes.

The GPU session gets one try at the real run (one 10-minute device command), so a typo in the
script or a renamed module must show up here first. About a minute on two idle CPU cores, four to
five on cores shared with other heavy jobs (hence the script's 15-minute bound, under which slow
steps still run rather than being recorded as "not run"). Excluded from the default suite (marker
`slow`):
    python -m pytest -m slow tests/benchmarks/test_gpu_check_smoke.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
MUST_PASS = ("setup", "t1a", "t1c", "sync", "sizing", "pretrain", "knn", "syncbn")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")
def test_gpu_check_smoke_runs_every_step_and_writes_the_report(cifar10_archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    environment = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--budget", "900"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=1000,
        check=False,
    )
    log = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, log
    assert sorted(path.name for path in out.iterdir()) == [
        "gpu_check.json",
        "gpu_check.log",
        "gpu_check.md",
        "raw.tar.gz",
    ]
    record = json.loads((out / "gpu_check.json").read_text())
    statuses = {row["step"]: row["status"] for row in record["summary"]}
    failed = {step: statuses.get(step) for step in MUST_PASS if statuses.get(step) != "ok"}
    assert not failed, (failed, log)
    # optional steps end in a recorded state, never missing
    assert {"lightly", "t1b", "evaluate"} <= set(statuses), statuses
    rows = record["throughput"]["t1a"]["rows"]
    assert rows["labelfew"]["views_per_second"] > 0 and rows["bare"]["views_per_second"] > 0
    assert set(record["throughput"]["t1c"]["rows"]) >= {
        "labelfew",
        "bare",
        "cpu-path",
        "stream",
        "stream-device",
    }
    sync = record["sync"]
    assert sync["steps"] and all(step["syncs"] >= 0 for step in sync["steps"])
    assert sync["applicable"] == (sync["status"] == "ok")
    knn = record["time_to_accuracy"]["knn"]
    assert 0.0 <= knn["top1"] <= 1.0 and knn["k"] >= 1
    assert record["time_to_accuracy"]["pretrain"]["epochs"] == 1
    markdown = (out / "gpu_check.md").read_text()
    assert "| step | status | result | seconds |" in markdown
    if statuses["lightly"] != "ok":  # lightly is the bench extra: row (b) must say why it did not run
        assert "not run:" in markdown
