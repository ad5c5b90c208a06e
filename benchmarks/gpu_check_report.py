"""Bookkeeping for `benchmarks/gpu_check.sh`: step records, the epoch count of step 3, the report.

Standard library only (no torch, no labelfew), so that each call takes milliseconds and works
whatever state the package is in:

    gpu_check_report.py record --work W --name NAME --rc RC --seconds S --limit L --command CMD
    gpu_check_report.py epochs --work W --images 50000 --batch-size 512 --target-seconds 300
    gpu_check_report.py report --work W --out OUT

`record` appends one line to W/steps.jsonl. `epochs` sizes the time-to-accuracy run from the
views/s of step 1 (row (a), no compile) and the start-up and epoch-end times of step 2, prints
"EPOCHS WARMUP_EPOCHS" and writes W/sizing.json. `report` reads every record and result file
under W and writes OUT/gpu_check.json and OUT/gpu_check.md (and prints the markdown).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

LIGHTLY_ANCHOR = (
    "lightly 1.6.0's benchmark: 84.8% kNN after 200 epochs in 87 min on an A6000 (ResNet-18, batch 512)"
)
FALLBACK_VIEWS_PER_SECOND = 10_000.0  # only if neither step 1 nor step 2 gave a rate
ROW_LABELS = {
    "labelfew": "(a) labelfew batched",
    "lightly": "(b) lightly 1.6.0",
    "bare": "(c) bare step",
    "cpu-path": "(d) worker path",
    "stream": "(e) stream, CPU decode",
    "stream-device": "(f) stream, device decode",
}
THROUGHPUT_STEPS = {
    "t1a": "resnet18 @ 32 px, batch 512",
    "t1b": "resnet18 @ 32 px, batch 512, --compile",
    "t1c": "resnet50 @ 224 px, batch 256",
}
STEP_TITLES = {
    "setup": "0. setup: wheels, pip install -e ., CIFAR-10 archive",
    "lightly": "0. lightly 1.6.0 importable (row b)",
    "t1a": "1. throughput",
    "t1b": "1. throughput, --compile (run after step 4)",
    "t1c": "1. throughput, worker and device paths",
    "sync": "2. host syncs per pretraining step",
    "sizing": "3. epoch count for the pretraining run",
    "pretrain": "3. labelfew pretrain, CIFAR-10 train",
    "knn": "3. kNN (k=200, T=0.1), all train labels as bank",
    "syncbn": "4. pretrain --sync-bn forced on one GPU",
    "evaluate": "3. labelfew evaluate (kNN + linear probe), if time is left",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    record = commands.add_parser("record", help="append one step's outcome to WORK/steps.jsonl")
    record.add_argument("--work", type=Path, required=True)
    record.add_argument("--name", required=True)
    record.add_argument("--rc", type=int)
    record.add_argument("--seconds", type=float)
    record.add_argument("--limit", type=float)
    record.add_argument("--status", help="instead of one derived from --rc, e.g. 'not run'")
    record.add_argument("--detail", default="")
    record.add_argument("--command-line", dest="command_line", default="")
    epochs = commands.add_parser("epochs", help="size the pretraining run; prints EPOCHS WARMUP")
    epochs.add_argument("--work", type=Path, required=True)
    epochs.add_argument("--images", type=int, required=True)
    epochs.add_argument("--batch-size", type=int, required=True)
    epochs.add_argument("--target-seconds", type=float, required=True)
    epochs.add_argument("--max-epochs", type=int, default=800)
    report = commands.add_parser("report", help="write OUT/gpu_check.json and OUT/gpu_check.md")
    report.add_argument("--work", type=Path, required=True)
    report.add_argument("--out", type=Path, required=True)
    report.add_argument("--mode", default="gpu", help="gpu or smoke")
    report.add_argument("--budget", type=float)
    report.add_argument("--started", type=float, help="unix time the script started")
    report.add_argument("--quiet", action="store_true", help="write the files without printing")
    args = parser.parse_args()
    {"record": record_step, "epochs": size_epochs, "report": write_report}[args.command](args)


# ---------------------------------------------------------------- record


def record_step(args: argparse.Namespace) -> None:
    if args.status:
        status = args.status
    elif args.rc == 0:
        status = "ok"
    elif args.rc in (124, 137):
        status = f"timeout after {args.limit:.0f} s" if args.limit else "timeout"
    else:
        status = f"failed (exit {args.rc})"
    line = {
        "name": args.name,
        "status": status,
        "rc": args.rc,
        "seconds": args.seconds,
        "limit": args.limit,
        "detail": args.detail.strip()[-500:],
        "command": args.command_line,
        "time": time.time(),
    }
    args.work.mkdir(parents=True, exist_ok=True)
    with (args.work / "steps.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


def read_steps(work: Path) -> dict[str, dict[str, Any]]:
    """The last record of each step, by name."""
    steps: dict[str, dict[str, Any]] = {}
    path = work / "steps.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            steps[item["name"]] = item
    return steps


# ---------------------------------------------------------------- epochs


def size_epochs(args: argparse.Namespace) -> None:
    """Epochs that fit ``--target-seconds`` of `labelfew pretrain` wall time, from measured rates."""
    throughput = read_throughput(args.work / "t1a")
    sync = read_json(args.work / "sync.json")
    notes = []
    rate = None
    decode_per_image = None
    row = rows_by_name(throughput).get("labelfew") if throughput else None
    if row and row.get("views_per_second"):
        rate = float(row["views_per_second"])
        notes.append(f"views/s {rate:,.0f} from step 1 row (a), no compile")
        if throughput and row.get("decode_seconds") and throughput.get("images"):
            decode_per_image = row["decode_seconds"] / throughput["images"]
    elif sync and finite(sync.get("step_seconds_median")):
        rate = 2 * sync["settings"]["batch_size"] / sync["step_seconds_median"]
        notes.append(f"views/s {rate:,.0f} from step 2's median step (step 1 gave no rate)")
    else:
        rate = FALLBACK_VIEWS_PER_SECOND
        notes.append(f"no measured rate: assumed {rate:,.0f} views/s")
    overhead = 1.0
    if sync and finite(sync.get("epoch_end_overhead_seconds")):
        overhead = max(0.0, float(sync["epoch_end_overhead_seconds"]))
        notes.append(f"epoch-end overhead {overhead:.2f} s from step 2")
    else:
        notes.append("epoch-end overhead assumed 1 s")
    startup = 20.0
    if sync and finite(sync.get("startup_seconds")):
        startup = float(sync["startup_seconds"])
        notes.append(f"start-up {startup:.1f} s from step 2")
    if decode_per_image is not None:
        startup += decode_per_image * args.images
        notes.append(f"+ decoding {args.images} images at {decode_per_image * 1e6:.0f} µs each")
    startup += 5.0  # finding the files, the recipe, artifact writing at the end
    steps_per_epoch = max(1, args.images // args.batch_size)
    epoch_seconds = 1.1 * steps_per_epoch * 2 * args.batch_size / rate + overhead
    epochs = int((args.target_seconds - startup) // epoch_seconds)
    epochs = max(1, min(args.max_epochs, epochs))
    warmup = round(min(10.0, epochs / 10), 2)
    sizing = {
        "epochs": epochs,
        "warmup_epochs": warmup,
        "target_seconds": args.target_seconds,
        "estimated_seconds": startup + epochs * epoch_seconds,
        "estimated_startup_seconds": startup,
        "estimated_epoch_seconds": epoch_seconds,
        "views_per_second": rate,
        "steps_per_epoch": steps_per_epoch,
        "notes": notes,
    }
    (args.work / "sizing.json").write_text(json.dumps(sizing, indent=2) + "\n")
    print(epochs, warmup)


# ---------------------------------------------------------------- report


def write_report(args: argparse.Namespace) -> None:
    work, out = args.work, args.out
    steps = read_steps(work)
    commit = git("rev-parse", "--short", "HEAD")
    dirty = None if commit == "unknown" else bool(git("status", "--porcelain", "--untracked-files=no"))
    source = read_json(Path(__file__).resolve().parent / ".cache" / "gpu_check" / "source.json")
    if commit == "unknown" and source:  # no .git on the device machine: what gpu_prep.sh saw
        commit, dirty = source.get("commit", "unknown"), source.get("dirty")
    meta = {
        "mode": args.mode,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "commit": commit,
        "dirty": dirty,
        "host": platform.node(),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "budget_seconds": args.budget,
        "wall_seconds": time.time() - args.started if args.started else None,
    }
    throughput = {name: throughput_summary(name, work, steps) for name in THROUGHPUT_STEPS}
    device = next((t["device"] for t in throughput.values() if t.get("device")), None)
    sync = read_json(work / "sync.json")
    env = read_json(work / "env.json") or {}
    meta["device"] = env.get("device") or device or (sync or {}).get("device")
    meta["torch"] = env.get("torch") or next(
        (t["torch"] for t in throughput.values() if t.get("torch")), None
    )
    meta["cuda"] = env.get("cuda")
    meta["gpu_memory_gib"] = env.get("gpu_memory_gib")
    tta = time_to_accuracy(work, steps)
    syncbn = sync_bn_summary(work, steps)
    summary_rows = summary_table(steps, throughput, sync, tta, syncbn)
    record = {
        "meta": meta,
        "steps": steps,
        "summary": summary_rows,
        "throughput": throughput,
        "sync": sync,
        "time_to_accuracy": tta,
        "sync_bn": syncbn,
    }
    markdown = to_markdown(meta, summary_rows, throughput, tta, steps)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown)
    if not args.quiet:
        print(markdown)


def throughput_summary(name: str, work: Path, steps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    step = steps.get(name, {})
    data = read_throughput(work / name)
    summary: dict[str, Any] = {
        "config": config_from_command(step.get("command", "")) or THROUGHPUT_STEPS[name],
        "status": step.get("status", "not run"),
    }
    if step.get("detail") and step.get("status") != "ok":
        summary["detail"] = step["detail"]
    if not data:
        return summary
    settings = data.get("settings", {})
    summary.update(
        {
            "config": (
                f"{settings.get('arch')} @ {settings.get('image_size')} px, batch {settings.get('batch_size')}, "
                f"{'fp32' if data.get('precision') == 'no' else data.get('precision')}, {data.get('images')} "
                f"{'JPEGs from ' + Path(settings['data']).name if settings.get('data') else 'synthetic JPEGs'}"
                f"{', --compile' if settings.get('compile') else ''}"
            ),
            "device": data.get("device"),
            "torch": data.get("torch"),
            "precision": data.get("precision"),
            "images": data.get("images"),
            "data": settings.get("data") or f"synthetic JPEGs ({settings.get('synthetic_count')})",
            "command_settings": settings,
            "rows": {},
        }
    )
    rows = rows_by_name(data)
    rates = {key: row.get("views_per_second") for key, row in rows.items()}
    for key, row in rows.items():
        summary["rows"][key] = {
            "views_per_second": row.get("views_per_second"),
            "peak_memory_gib": row.get("peak_memory_gib"),
            "status": row.get("status"),
            "notes": {
                k: row[k]
                for k in ("workers", "store_device", "resize", "decode_seconds", "decode")
                if k in row
            },
        }
    summary["a_over_b"] = ratio(rates.get("labelfew"), rates.get("lightly"))
    summary["a_over_c"] = ratio(rates.get("labelfew"), rates.get("bare"))
    summary["d_over_c"] = ratio(rates.get("cpu-path"), rates.get("bare"))
    summary["e_over_c"] = ratio(rates.get("stream"), rates.get("bare"))
    summary["f_over_c"] = ratio(rates.get("stream-device"), rates.get("bare"))
    return summary


def time_to_accuracy(work: Path, steps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    sizing = read_json(work / "sizing.json")
    run = read_json(work / "runs" / "cifar10" / "pretrain" / "run.json")
    knn = read_json(work / "knn.json")
    evaluation = read_json(work / "runs" / "cifar10" / "evaluate" / "report.json")
    result: dict[str, Any] = {"anchor": LIGHTLY_ANCHOR, "sizing": sizing}
    if run:
        config = run.get("config", {})
        result["pretrain"] = {
            "epochs": config.get("epochs"),
            "arch": config.get("arch"),
            "batch_size": config.get("batch_size"),
            "images": run.get("data", {}).get("images"),
            "train_seconds": run.get("wall_seconds"),
            "process_seconds": steps.get("pretrain", {}).get("seconds"),
            "views_per_second": run.get("metrics", {}).get("views_per_second"),
            "final_loss": run.get("metrics", {}).get("final_loss"),
            "device": run.get("device"),
        }
    if knn:
        result["knn"] = knn
    if evaluation:
        result["evaluate"] = [
            {key: row.get(key) for key in ("method", "top1", "top5", "balanced_accuracy", "details")}
            for row in evaluation.get("rows", [])
        ]
        result["evaluate_wall_seconds"] = evaluation.get("wall_seconds")
    return result


def sync_bn_summary(work: Path, steps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    step = steps.get("syncbn", {})
    run = read_json(work / "runs" / "syncbn" / "pretrain" / "run.json")
    result: dict[str, Any] = {"status": step.get("status", "not run"), "detail": step.get("detail")}
    if run:
        result.update(
            {
                "batchnorm": run.get("distributed", {}).get("batchnorm"),
                "steps": run.get("steps"),
                "views_per_second": run.get("metrics", {}).get("views_per_second"),
                "final_loss": run.get("metrics", {}).get("final_loss"),
                "device": run.get("device"),
            }
        )
    return result


def summary_table(
    steps: dict[str, dict[str, Any]],
    throughput: dict[str, dict[str, Any]],
    sync: dict[str, Any] | None,
    tta: dict[str, Any],
    syncbn: dict[str, Any],
) -> list[dict[str, Any]]:
    rows = []
    for name, title in STEP_TITLES.items():
        step = steps.get(name)
        status = step["status"] if step else "not run"
        result = ""
        if name in throughput and throughput[name].get("rows"):
            result = throughput_result(throughput[name])
        elif name == "sync" and sync:
            result = sync_result(sync)
        elif name == "sizing" and tta.get("sizing"):
            sizing = tta["sizing"]
            result = (
                f"{sizing['epochs']} epoch(s) (warmup {sizing['warmup_epochs']}) for {sizing['target_seconds']:.0f} s, "
                f"estimated {sizing['estimated_seconds']:.0f} s at {sizing['views_per_second']:,.0f} views/s"
            )
        elif name == "pretrain" and tta.get("pretrain"):
            run = tta["pretrain"]
            result = (
                f"{run['epochs']} epoch(s) of {run['images']} images in {minutes(run['process_seconds'])} "
                f"(training loop {minutes(run['train_seconds'])}), {run['views_per_second']:,.0f} views/s, "
                f"final loss {run['final_loss']:.3f}"
            )
        elif name == "knn" and tta.get("knn"):
            result = knn_result(tta)
        elif name == "syncbn" and syncbn.get("batchnorm"):
            result = (
                f"{syncbn['batchnorm']}, {syncbn['steps']} steps, {syncbn['views_per_second']:,.0f} views/s, "
                f"final loss {syncbn['final_loss']:.3f}"
            )
        elif name == "evaluate" and tta.get("evaluate"):
            result = "; ".join(f"{row.get('method')} {percent(row.get('top1'))}" for row in tta["evaluate"])
        if not result and step and step.get("detail"):
            result = step["detail"].splitlines()[-1][:200]
        if name in throughput:
            title = f"{title}: {throughput[name]['config']}"
        rows.append(
            {
                "step": name,
                "title": title,
                "status": status,
                "result": result,
                "seconds": step.get("seconds") if step else None,
            }
        )
    return rows


def throughput_result(summary: dict[str, Any]) -> str:
    parts = []
    for key, row in summary["rows"].items():
        label = ROW_LABELS.get(key, key).split(" ")[0]
        if row.get("views_per_second"):
            parts.append(f"{label} {row['views_per_second']:,.0f}")
        else:
            parts.append(f"{label} not run")
    ratios = [f"a/b {summary['a_over_b']}" if summary.get("a_over_b") else ""]
    ratios.append(f"a/c {summary['a_over_c']}" if summary.get("a_over_c") else "")
    return "views/s " + ", ".join(parts) + ("; " + ", ".join(r for r in ratios if r) if any(ratios) else "")


def sync_result(sync: dict[str, Any]) -> str:
    if sync.get("status") == "failed":
        return sync.get("reason", "failed")
    counts = sync.get("syncs_by_kind", {})
    shown = ", ".join(f"{kind} {values}" for kind, values in counts.items())
    if not sync.get("applicable"):
        return (
            f"not applicable on CPU (the loop ran {len(sync.get('steps', []))} steps and was timed); {shown}"
        )
    verdict = "target met" if sync.get("target_met") else "target MISSED"
    where = ", ".join(f"{place} ×{count}" for place, count in list(sync.get("where", {}).items())[:4])
    return f"syncs per step: {shown}; {verdict} (plain 0, log 1); where: {where or 'nowhere'}"


def knn_result(tta: dict[str, Any]) -> str:
    knn = tta["knn"]
    run = tta.get("pretrain", {})
    spent = run.get("process_seconds")
    return (
        f"top-1 {percent(knn['top1'])} (top-5 {percent(knn['top5'])}) on {knn['test_images']} test images, "
        f"bank {knn['bank_images']}, after {run.get('epochs')} epoch(s) / {minutes(spent)} of pretraining "
        f"(+{knn['seconds']:.0f} s for kNN)"
    )


def to_markdown(
    meta: dict[str, Any],
    summary_rows: list[dict[str, Any]],
    throughput: dict[str, dict[str, Any]],
    tta: dict[str, Any],
    steps: dict[str, dict[str, Any]],
) -> str:
    lightly = steps.get("lightly", {})
    lightly_missing = (
        f"not run: {lightly.get('detail', '').splitlines()[-1] if lightly.get('detail') else 'lightly not importable'}"
        if lightly and lightly.get("status") != "ok"
        else ""
    )
    title = (
        "GPU check"
        if meta["mode"] == "gpu"
        else "GPU check, --smoke (CPU, tiny sizes: a test of the script, no figures)"
    )
    wall = f"{meta['wall_seconds']:.0f} s" if meta.get("wall_seconds") is not None else "?"
    budget = f"{meta['budget_seconds']:.0f} s" if meta.get("budget_seconds") else "?"
    lines = [
        f"## {title}",
        "",
        f"{meta['date_utc']} UTC, device {meta.get('device')}, torch {meta.get('torch')}, python {meta['python']}, "
        f"commit {meta['commit']}{' (+ uncommitted changes)' if meta['dirty'] else ''}; wall {wall} of a {budget} budget.",
        "",
        "| step | status | result | seconds |",
        "| --- | --- | --- | --- |",
    ]
    for row in summary_rows:
        seconds = f"{row['seconds']:.0f}" if row.get("seconds") is not None else ""
        lines.append(f"| {row['title']} | {row['status']} | {cell(row['result'])} | {seconds} |")
    lines += [
        "",
        "Throughput, views/s (median round; peak GiB: `torch.cuda.max_memory_allocated` over the row's timed "
        "steps with every row of the run resident, or the process's peak RSS on the CPU):",
        "",
        "| config | (a) labelfew batched | (b) lightly 1.6.0 | (c) bare step | (d) worker path | (e) stream, CPU decode | (f) stream, device decode | a/b | a/c | e/c | f/c | peak GiB a / b / c / d / e / f | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for summary in throughput.values():
        rows = summary.get("rows", {})
        cells = []
        peaks = []
        for key in ("labelfew", "lightly", "bare", "cpu-path", "stream", "stream-device"):
            row = rows.get(key)
            if row is None:
                cells.append(cell(lightly_missing) if key == "lightly" and rows else "")
                peaks.append("-")
            elif row.get("views_per_second"):
                cells.append(f"{row['views_per_second']:,.0f}")
                peaks.append(
                    f"{row['peak_memory_gib']:.2f}" if row.get("peak_memory_gib") is not None else "-"
                )
            else:
                cells.append(f"not run: {cell(row.get('status') or '?')}")
                peaks.append("-")
        status = summary["status"]
        if summary.get("detail"):
            detail = summary["detail"]
            status = detail if detail.startswith(status) else f"{status}: {detail}"
        lines.append(
            f"| {summary['config']} | {' | '.join(cells)} | {summary.get('a_over_b') or ''} | "
            f"{summary.get('a_over_c') or ''} | {summary.get('e_over_c') or ''} | {summary.get('f_over_c') or ''} | "
            f"{' / '.join(peaks)} | {cell(status)} |"
        )
    lines += [
        "",
        "(d) is the per-image PIL path that `pretrain --augment-on workers` took before the streaming source; "
        "(e) and (f) are the path `pretrain --augment-on auto` takes for a folder whose decoded images exceed "
        "`--memory-budget` (workers decode and resize, views on the device), (e) decoding in the workers, "
        "(f) decoding the JPEGs of each batch with nvJPEG on the GPU (`--decode-on device`, the default on CUDA). "
        "The resnet50 run measures them on synthetic 500×375 JPEG photos (throughput.py without --data), which "
        "also fit the budget, so (a) is measured on the same files.",
        "",
        f"Time to accuracy: {knn_result(tta) if tta.get('knn') else 'not measured'}. Anchor: {LIGHTLY_ANCHOR}.",
        "",
        "Step 2 counts the warnings of `torch.cuda.set_sync_debug_mode('warn')` per training iteration of "
        "`labelfew pretrain`'s loop (targets: 0 in a plain step, 1 in a step that logs).",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- helpers


def config_from_command(command: str) -> str:
    """'resnet18 @ 32 px, batch 512' from a throughput.py command line (when it left no record)."""
    words = command.split()
    value = {flag: words[i + 1] for i, flag in enumerate(words[:-1]) if flag.startswith("--")}
    if "--arch" not in value:
        return ""
    compiled = ", --compile" if "--compile" in words else ""
    return f"{value['--arch']} @ {value.get('--image-size', '32')} px, batch {value.get('--batch-size', '256')}{compiled}"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_throughput(folder: Path) -> dict[str, Any] | None:
    """The newest throughput.py record in ``folder``."""
    files = sorted(folder.glob("throughput-*.json")) if folder.is_dir() else []
    return read_json(files[-1]) if files else None


def rows_by_name(data: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {row["row"]: row for row in (data or {}).get("rows", [])}


def ratio(value: float | None, reference: float | None) -> str | None:
    return f"{value / reference:.2f}" if value and reference else None


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def percent(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "?"


def minutes(seconds: Any) -> str:
    return f"{seconds / 60:.1f} min" if isinstance(seconds, int | float) else "? min"


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def git(*arguments: str) -> str:
    try:
        return subprocess.run(
            ["git", *arguments], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    main()
