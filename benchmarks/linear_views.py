"""Which features `finetune --method linear` trains its heads on: the evaluation view computed once,
or crop + flip views (one per epoch, as a fine-tuning sees them), or both.

For one pretraining and one label file, computes the frozen backbone's features of the labels
in the evaluation view and in `--views` crop + flip views (`labelfew.views.finetune.CropFlipViews`,
the fine-tuning view), trains the lr grid of `labelfew.engine.linear_head` on each (the same number
of passes over the images in all), and prints each lr's top-1 on the test images and the feature
time. It reports the best lr of each grid on the test set, so it compares the feature choices,
not what `--lr auto` would pick.

    python benchmarks/linear_views.py RUN LABELS.csv TEST_FOLDER [--views 10] [--epochs 60]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from labelfew import engine
from labelfew.artifacts import load_artifact
from labelfew.data.labelled import labelled_batches
from labelfew.data.labels import read_labels
from labelfew.engine import linear_head
from labelfew.models import load_model
from labelfew.use.inference import run_model
from labelfew.views.finetune import CropFlipViews


def grid_top1(features: torch.Tensor, labels: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor],
              classes: int, epochs: int) -> torch.Tensor:  # fmt: skip
    """Test top-1 of every lr of the grid (batch 64, the rule × `linear_head.LR_FACTORS`)."""
    lrs = [linear_head.linear_rule(64) * factor for factor in linear_head.LR_FACTORS]
    heads = linear_head.train_heads(
        features, labels, classes, lrs, linear_head.HeadSettings(epochs=epochs, batch_size=64)
    )
    return linear_head.held_out_scores(heads, *test)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder with a pretrain stage")
    parser.add_argument("labels", type=Path)
    parser.add_argument("test", type=Path)
    parser.add_argument("--views", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    artifact = load_artifact(args.run / "pretrain" / "backbone.safetensors")
    backbone = load_model(artifact).eval()
    train, test = read_labels(args.labels), read_labels(args.test)
    names = train.class_names
    started = time.perf_counter()
    features = run_model(backbone, list(train.paths), artifact.spec, 256, 0).values
    eval_seconds = time.perf_counter() - started
    test_features = run_model(backbone, list(test.paths), artifact.spec, 256, 0).values
    labels = torch.tensor(train.label_indices(names))
    held = (test_features, torch.tensor(test.label_indices(names)))
    batches, _ = labelled_batches(
        train, names, 100, 0, artifact.spec.image_size, engine.make_accelerator("no", seed=0), 0
    )
    crop_flip = CropFlipViews(artifact.spec.image_size, artifact.spec.mean, artifact.spec.std)
    started = time.perf_counter()
    views = []
    with torch.no_grad():
        for epoch in range(args.views):
            batches.set_epoch(epoch)
            rows = torch.zeros_like(features)
            for batch in batches:
                rows[batch.indices] = backbone(
                    crop_flip(batch.images, batch.sizes, batch.generator())
                ).float()
            views.append(rows)
    views_seconds = time.perf_counter() - started
    seen = views[0].abs().sum(dim=1) > 0  # the images of the last, incomplete batch are dropped
    cropped, cropped_labels = torch.cat([view[seen] for view in views]), labels[seen].repeat(args.views)
    results = {
        "eval view": grid_top1(features, labels, held, len(names), args.epochs),
        f"{args.views} crop views": grid_top1(cropped, cropped_labels, held, len(names), max(1, args.epochs // args.views)),
        "eval + crop views": grid_top1(torch.cat([features, cropped]), torch.cat([labels, cropped_labels]), held,
                                       len(names), max(1, args.epochs // (args.views + 1))),
    }  # fmt: skip
    for name, top1 in results.items():
        grid = " ".join(
            f"{factor:g}:{100 * value:.1f}"
            for factor, value in zip(linear_head.LR_FACTORS, top1.tolist(), strict=True)
        )
        print(f"{name:18s} best {100 * top1.max():.1f}  (test top-1 per lr factor: {grid})")
    print(f"features: eval view {eval_seconds:.1f} s, {args.views} crop views {views_seconds:.1f} s")


if __name__ == "__main__":
    main()
