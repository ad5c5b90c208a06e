"""`labelfew demo`: the whole pipeline on scikit-learn's bundled handwritten digits.

The 1,797 digits images (8×8, 10 classes; real scans that ship inside scikit-learn, so nothing
is downloaded) are written as 32 px PNG files, a quarter of them held out as the test set. Then
subset → pretrain → finetune (SSL and scratch, and a linear head on the frozen backbone) → distill (the fine-tuned SSL model into the same
arch on the unlabeled pool, for half the pretraining epochs as SimCLRv2) → the transfer baseline
(`finetune --init`, here with the weights of the demo's own pretraining exported by `labelfew
export` and read back, not a download, at the SSL model's lr, so its row is close to
`fine-tuned`'s when export and reload lose nothing) → evaluate run through the same `run(config)`
functions as the CLI commands. The backbone is timm's `test_resnet` (0.4 M parameters) so the
run takes a few minutes on two CPU cores; a real dataset would use resnet18 or larger.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from labelfew import engine
from labelfew.artifacts import load_artifact
from labelfew.config import DistillConfig, EvaluateConfig, ExportConfig, FinetuneConfig, PretrainConfig
from labelfew.data.labels import read_labels, write_labels
from labelfew.data.subsets import balanced_subset
from labelfew.stages import distill, evaluate, finetune, pretrain
from labelfew.use import export

DEMO_ARCH = "test_resnet"
DEMO_SIDE = 32
LABELS_PER_CLASS = 10


def write_digits(root: Path, side: int = DEMO_SIDE) -> tuple[Path, Path]:
    """Writes the digits as PNG files: root/train/<digit>/*.png and root/test/<digit>/*.png.

    Every fourth image (in scikit-learn's order) goes to the test split. Returns (train, test).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        split = "test" if index % 4 == 0 else "train"
        folder = root / split / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:04d}.png"
        if path.exists():
            continue
        gray = (255 - pixels * (255 / 16)).clip(0, 255).astype(np.uint8)  # dark ink on white paper
        Image.fromarray(gray, mode="L").resize((side, side), Image.Resampling.BICUBIC).convert("RGB").save(
            path
        )
    return root / "train", root / "test"


def run(out: Path, epochs: int = 30, quiet: bool = False) -> dict[str, Any]:
    """Runs the demo into `out` and returns the evaluation result."""
    out = Path(out)
    say = (lambda text: None) if quiet else engine.console.print
    train_folder, test_folder = write_digits(out / "images")
    say(f"[bold]demo[/] digits images written to {out / 'images'} (train: unlabeled pool, test: held out)")
    labels = out / f"labels-{LABELS_PER_CLASS}-per-class.csv"
    chosen = balanced_subset(read_labels(train_folder), per_class=LABELS_PER_CLASS, seed=0)
    write_labels(chosen, labels)
    say(f"[bold]demo[/] label subset: {len(chosen)} images ({LABELS_PER_CLASS} per class) -> {labels}")
    pretrain.run(
        PretrainConfig(
            data=train_folder,
            out=out,
            arch=DEMO_ARCH,
            small_stem=False,
            image_size=DEMO_SIDE,
            epochs=epochs,
            batch_size=256,
            quiet=quiet,
        )
    )
    for scratch in (False, True):
        finetune.run(
            FinetuneConfig(
                labels=(labels,), source=out, scratch=scratch, epochs=50, batch_size=50, quiet=quiet
            )
        )
    finetune.run(FinetuneConfig(labels=(labels,), source=out, method="linear", batch_size=50, quiet=quiet))
    teacher = out / f"finetune-{labels.stem}"
    _transfer_baseline(out, labels, teacher, quiet)
    distill.run(
        DistillConfig(unlabeled=train_folder, source=teacher, epochs=max(1, epochs // 2), quiet=quiet)
    )
    result = evaluate.run(EvaluateConfig(test=test_folder, source=out, random_baseline=True, quiet=quiet))
    say(f"[bold]demo[/] artifacts in {out}: pretrain/, finetune-*/, distill-*/, evaluate/report.json")
    return result


def _transfer_baseline(out: Path, labels: Path, teacher: Path, quiet: bool) -> Path:
    """`finetune --init` from the demo's pretrained backbone, exported and read back as foreign weights.

    The lr is the SSL model's (searched once, and the demo stays under two minutes): the same
    weights at the same lr and seed, so the row shows what the export → `--init` path costs (about
    nothing, when it works). Returns the model's path.
    """
    weights = export.run(ExportConfig(source=out / "pretrain", out=out / "pretrain" / "pretrain-export",
                                      format="safetensors", quiet=True))  # fmt: skip
    lr = load_artifact(teacher / "model.safetensors").json_field("config")["lr"]
    return finetune.run(
        FinetuneConfig(
            labels=(labels,),
            init=str(weights),
            out=out / f"finetune-init-{labels.stem}",
            lr=lr,
            epochs=50,
            batch_size=50,
            quiet=quiet,
        )
    )
