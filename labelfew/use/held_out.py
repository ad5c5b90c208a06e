"""What fine-tuning measures on its held-out labels (`--val-fraction`) and the frozen features of
`--method linear`: the per-epoch scores that choose the best epoch, a multi-label model's
threshold, and the features of a frozen backbone, all through the one inference loop
(`labelfew.use.inference`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from labelfew.data.images import printable
from labelfew.errors import UserError
from labelfew.multilabel import DEFAULT_THRESHOLD, choose_threshold, macro_f1
from labelfew.spec import ModelSpec
from labelfew.use.inference import EvalImages, held_out_multi_label, run_model, top1_and_balanced


def epoch_scores(
    model: nn.Module, images: EvalImages, accelerator: Any, num_classes: int, multi_label: bool
) -> dict[str, float]:
    """One validation's numbers: `val_score` (what the best epoch is chosen on: balanced accuracy,
    or for multi-label macro-F1 at `DEFAULT_THRESHOLD`) and `val_top1` (single-label) or
    `val_macro_f1` (multi-label)."""
    if multi_label:
        scores, targets = held_out_multi_label(model, images, accelerator)
        score = macro_f1(scores, targets, DEFAULT_THRESHOLD)
        return {"val_macro_f1": score, "val_score": score}
    top1, balanced = top1_and_balanced(model, images, accelerator, num_classes)
    return {"val_top1": top1, "val_score": balanced}


def multi_label_threshold(model: nn.Module, images: EvalImages | None, accelerator: Any) -> float:
    """A multi-label model's global threshold: the best macro-F1 on the held-out images
    (`labelfew.multilabel.choose_threshold`), or `DEFAULT_THRESHOLD` without any."""
    if images is None:
        return DEFAULT_THRESHOLD
    scores, targets = held_out_multi_label(model, images, accelerator)
    return choose_threshold(scores, targets)


def frozen_features(
    frozen: nn.Module, paths: list[Path], spec: ModelSpec, batch_size: int, workers: int | None,
    skip_bad: bool, quiet: bool,
) -> tuple[torch.Tensor, list[int], list[str]]:  # fmt: skip
    """A frozen network's outputs for image files, once, in the evaluation view
    (`labelfew.use.inference.run_model`): the values, the indices of the decoded files, and the
    names of the undecodable ones.

    Raises:
        UserError: an image cannot be decoded and `skip_bad` is off (a labelled image is never
            dropped silently).

    Shape: -> values (decoded files, output width)
    """
    outputs = run_model(frozen, paths, spec, batch_size, workers, description="features (frozen backbone)",
                        quiet=quiet)  # fmt: skip
    bad = [printable(paths[index]) for index in sorted(outputs.errors)]
    if bad and not skip_bad:
        raise UserError(
            f"{bad[0]}: cannot be decoded ({len(bad)} labelled image(s)); fix it or pass --skip-bad"
        )
    return outputs.values, outputs.kept, bad
