"""kNN accuracy of a pretrain artifact alone (no linear probe), with `labelfew evaluate`'s functions.

The representation metric of lightly's benchmarks: frozen backbone features of every labelled
bank image (all training labels), cosine similarity, the k = 200 nearest vote with weight
exp(similarity / 0.1), on the test images. `labelfew evaluate` computes the same kNN row with the
same functions (`backbone_features`, `knn_scores`) but also fits the linear probe, whose
scikit-learn fits on 50,000 features take minutes; this script gives the kNN figure alone, so that
`gpu_check.sh` can report time to accuracy inside its budget.

    python benchmarks/knn_check.py --from runs/cifar10 --bank cifar10_jpg/train --test cifar10_jpg/test
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

# labelfew imports: every one is here, so that a module that moves is fixed in one place.
from labelfew.artifacts import load_artifact
from labelfew.data.labels import read_labels
from labelfew.registry import resolve_artifact
from labelfew.stages.evaluate import backbone_features, knn_scores


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--from", dest="source", type=Path, required=True, help="pretrain run or artifact")
    parser.add_argument("--bank", type=Path, required=True, help="labelled images: CSV or class folders")
    parser.add_argument("--test", type=Path, required=True, help="labelled test images")
    parser.add_argument("--knn-k", type=int, default=200)
    parser.add_argument("--knn-temperature", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: as evaluate)")
    parser.add_argument("--out", type=Path, help="JSON record")
    args = parser.parse_args()
    record = knn(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"kNN (k={record['k']}, T={record['temperature']}, bank {record['bank_images']}): top-1 "
        f"{record['top1']:.2%}, top-5 {record['top5']:.2%} on {record['test_images']} test images, "
        f"{record['seconds']:.0f} s"
    )


def knn(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    artifact = load_artifact(resolve_artifact(args.source, ("pretrain",)), "pretrain")
    bank, test = read_labels(args.bank), read_labels(args.test)
    classes = bank.class_names
    unknown = sorted(set(test.labels) - set(classes))
    if unknown:
        raise SystemExit(f"{args.test}: classes {unknown[:5]} are not in the bank {args.bank}")
    bank_x, bank_y = backbone_features(artifact, bank, classes, args.batch_size, args.workers)
    test_x, test_y = backbone_features(artifact, test, classes, args.batch_size, args.workers)
    features_seconds = time.perf_counter() - started
    scores = knn_scores(bank_x, bank_y, test_x, len(classes), k=args.knn_k, temperature=args.knn_temperature)
    top = scores.topk(min(5, len(classes)), dim=1).indices
    return {
        "artifact": str(artifact.path),
        "bank": str(args.bank),
        "test": str(args.test),
        "bank_images": len(bank),
        "test_images": len(test),
        "classes": len(classes),
        "k": min(args.knn_k, len(bank)),
        "temperature": args.knn_temperature,
        "top1": float((top[:, 0] == test_y).float().mean()),
        "top5": float((top == test_y[:, None]).any(dim=1).float().mean()),
        "features_seconds": features_seconds,
        "seconds": time.perf_counter() - started,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


if __name__ == "__main__":
    main()
