"""`finetune --method linear`: linear heads on frozen backbone features, a grid of lrs in one pass.

The backbone never trains, so its features are computed once (the evaluation view, by the stage
through `labelfew.use.inference`) and everything here works on that (N, D) tensor: seconds on a
CPU for a few thousand labels. Random crop + flip views, one per epoch, were measured and not
kept: on CIFAR-10 (a 50-epoch test_resnet pretrain, 2,000 test images, the grid's best lr) they
scored 45.6% against the evaluation view's 45.8% at 1% of the labels (20 views) and 53.5% against
54.3% at 10% (10 views), for 10× the feature time.

The protocol is SimCLR's linear evaluation (arXiv 2002.05709, appendix B.6; google-research/simclr
`--train_mode=finetune --fine_tune_after_block=4 --zero_init_logits_layer=True`): a zero-initialised
linear layer, SGD with Nesterov momentum 0.9, lr 0.1 × B/256, no weight decay, no warmup, cosine
decay, the batches drawn anew each epoch. solo-learn's SimCLR linear evaluation
(`scripts/linear/imagenet-100/simclr.yaml`) agrees on SGD, no weight decay and 100 epochs but uses
lr 1.0 at batch 256, ten times SimCLR's: the lr is the one setting the protocols disagree on, so it
is searched. MAE's linear probing (arXiv 2111.06377, appendix A.2) normalises the features first
(BatchNorm without affine); here each feature is standardised with the fitted labels' mean and
standard deviation, which is folded back into the saved layer (W/σ, b − Wμ/σ), so the artifact is
a plain `labelfew.models.Classifier`.

With few labels no fixed lr is right (`labelfew.engine.lr_search`), and a linear head is cheap, so
one head per lr of `LR_FACTORS` × the rule is trained in the same pass — one [heads, classes, dim]
weight, one batched matmul, each head its own lr — on the folds of `--lr auto`
(`lr_search.search_folds`); the best pooled held-out top-1 wins (ties: the lower held-out loss,
then the smaller lr), and the final head is trained on all the labels at that lr.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from labelfew.data.labels import LabeledImages
from labelfew.engine.lr_search import search_folds
from labelfew.optim import warmup_cosine_fraction

BASE_LR = 0.1
"""SimCLR's linear evaluation lr per 256 images (linear scaling): 0.1 × B/256."""
MOMENTUM = 0.9
"""SimCLR's (Nesterov) momentum."""
LR_FACTORS = tuple(2.0**power for power in range(-6, 3))
"""The grid: the rule × 1/64, 1/32, …, 4 (nine heads, 256× from first to last). Low, because the
rule is for SimCLR's few large-batch steps (batch 4096 or 512, 90–100 epochs) and a fine-tuning's
batch of 64 takes many more: on CIFAR-10 features (test_resnet pretrain, 500 and 5,000 labels) a
first grid of 1/16 … 16 chose 1/8 and 1/16, and 8× and 16× were last."""


def linear_rule(batch_size: int) -> float:
    """SimCLR's linear-evaluation lr for a batch: 0.1 × B/256."""
    return BASE_LR * batch_size / 256


@dataclass(frozen=True)
class HeadSettings:
    """How the heads train (the stage's `--epochs`, `--batch-size`, `--weight-decay`, …).

    `weight_decay` applies to the weights, never the biases; `balanced` draws every class equally
    often (with replacement) as `--balanced` does for the image batches; `class_weights` (one per
    class, `--class-weights`) weigh the cross-entropy as `labelfew.losses.classification_loss` does.
    """

    epochs: int
    batch_size: int
    weight_decay: float = 0.0
    warmup_fraction: float = 0.0
    label_smoothing: float = 0.0
    balanced: bool = False
    seed: int = 0
    class_weights: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Heads:
    """Trained heads on the raw (unstandardised) features.

    Attributes:
        weight: Shape: (heads, classes, dim)
        bias: Shape: (heads, classes)
        final_loss: each head's mean loss over its last epoch (NaN: diverged). Shape: (heads,)
        epoch_losses: the first head's mean loss per epoch (the run's curve with one head).
    """

    weight: Tensor
    bias: Tensor
    final_loss: Tensor
    epoch_losses: list[float]

    def logits(self, features: Tensor) -> Tensor:
        """Shape: (N, dim) -> (heads, N, classes)"""
        return torch.einsum("nd,hcd->hnc", features, self.weight) + self.bias[:, None, :]

    def layer(self, head: int = 0) -> nn.Linear:
        """Head `head` as the `nn.Linear` a `Classifier` holds."""
        layer = nn.Linear(self.weight.shape[2], self.weight.shape[1])
        with torch.no_grad():
            layer.weight.copy_(self.weight[head])
            layer.bias.copy_(self.bias[head])
        return layer


def standardization(features: Tensor) -> tuple[Tensor, Tensor]:
    """Each feature's mean and standard deviation (a constant feature gets σ = 1). Shape: (dim,) each."""
    mean = features.mean(dim=0)
    std = features.std(dim=0, unbiased=False)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def epoch_order(labels: Tensor, num_classes: int, balanced: bool, generator: torch.Generator) -> Tensor:
    """One epoch's sample order: a permutation, or with `balanced` as many draws with replacement,
    each class equally likely."""
    if not balanced:
        return torch.randperm(len(labels), generator=generator)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).double()
    return torch.multinomial(1.0 / counts[labels], len(labels), replacement=True, generator=generator)


def train_heads(
    features: Tensor, labels: Tensor, num_classes: int, lrs: Sequence[float], settings: HeadSettings
) -> Heads:
    """Trains one zero-initialised linear head per lr on standardised features, all in one pass.

    Every head sees the same batches; its step is exactly `torch.optim.SGD(momentum=0.9,
    nesterov=True)` at its own lr × the shared warmup + cosine factor
    (`labelfew.optim.warmup_cosine_fraction`), with `weight_decay` on the weight only.

    Shape: features (N, dim) float, labels (N,) int64 -> Heads of len(lrs) heads.
    """
    mean, std = standardization(features)
    inputs = (features - mean) / std
    count, heads, width = len(labels), len(lrs), inputs.shape[1]
    weight, bias = torch.zeros(heads, num_classes, width), torch.zeros(heads, num_classes)
    rates = torch.tensor(list(lrs), dtype=torch.float32)
    batch = min(settings.batch_size, count)
    # the one warmup + cosine rule, read from a placeholder optimizer at lr 1
    placeholder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = warmup_cosine_fraction(
        placeholder, math.ceil(count / batch) * settings.epochs, settings.warmup_fraction
    )
    buffers: list[Tensor | None] = [None, None]
    generator = torch.Generator().manual_seed(settings.seed)
    class_weights = None if settings.class_weights is None else torch.tensor(settings.class_weights)
    epoch_losses: list[float] = []
    final = torch.zeros(heads)
    for _ in range(settings.epochs):
        order = epoch_order(labels, num_classes, settings.balanced, generator)
        total = torch.zeros(heads)
        for start in range(0, count, batch):
            index = order[start : start + batch]
            losses, weight_gradient, bias_gradient = _loss_and_gradients(
                inputs[index], labels[index], weight, bias, settings.label_smoothing, class_weights
            )
            factor = placeholder.param_groups[0]["lr"]
            _nesterov_step((weight, bias), (weight_gradient, bias_gradient), buffers, rates * factor,
                           settings.weight_decay)  # fmt: skip
            placeholder.step()  # no gradient: moves nothing, keeps the scheduler in order
            schedule.step()
            total += losses * len(index)
        final = total / count
        epoch_losses.append(float(final[0]))
    folded = weight / std  # the standardisation folded into the layer: W (x − μ)/σ + b
    return Heads(folded, bias - folded @ mean, final, epoch_losses)


def _loss_and_gradients(
    inputs: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, smoothing: float,
    class_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Every head's cross-entropy on a batch and its gradients, in closed form: one matrix product
    forward, one back.

    With targets t (label smoothing ε, class weights w: t[i, c] = (1 − ε)·w[y_i]·[c = y_i] + ε·w[c]/C,
    PyTorch's ``cross_entropy(weight=w, label_smoothing=ε)``) the loss is −Σ t·log p / Σ_i w[y_i], and
    d loss / d logits = (p·Σ_c t[i, c] − t) / Σ_i w[y_i] (without weights: (p − t) / n).

    Shape: inputs (n, dim), labels (n,), weight (heads, classes, dim), bias (heads, classes),
    class_weights (classes,) -> losses (heads,), weight gradient (heads, classes, dim), bias gradient
    (heads, classes)
    """
    heads, classes, width = weight.shape
    count = len(labels)
    logits = (inputs @ weight.reshape(heads * classes, width).T).view(-1, heads, classes) + bias
    log_probabilities = logits.log_softmax(dim=2)
    per_class = torch.ones(classes) if class_weights is None else class_weights.float()
    target = (smoothing / classes * per_class).expand(count, heads, classes).clone()
    target.scatter_add_(2, labels.view(-1, 1, 1).expand(-1, heads, 1),
                        ((1.0 - smoothing) * per_class[labels]).view(-1, 1, 1).expand(-1, heads, 1).clone())  # fmt: skip
    total = float(count) if class_weights is None else per_class[labels].sum()
    losses = -(target * log_probabilities).sum(dim=2).sum(dim=0) / total
    residual = (
        log_probabilities.exp() * target.sum(dim=2, keepdim=True) - target
    ) / total  # (n, heads, classes)
    weight_gradient = (residual.reshape(count, heads * classes).T @ inputs).view(heads, classes, width)
    return losses, weight_gradient, residual.sum(dim=0)


def _nesterov_step(
    parameters: tuple[Tensor, Tensor], gradients: tuple[Tensor, Tensor], buffers: list[Tensor | None],
    rates: Tensor, decay: float,
) -> None:  # fmt: skip
    """`torch.optim.SGD`'s Nesterov step (momentum 0.9, dampening 0) with a per-head lr (`rates`,
    shape (heads,)), on (weight, bias); `decay` on the weight only."""
    for slot, (parameter, gradient) in enumerate(zip(parameters, gradients, strict=True)):
        if slot == 0 and decay:
            gradient = gradient + decay * parameter
        buffer = buffers[slot]
        buffer = gradient.clone() if buffer is None else buffer.mul_(MOMENTUM).add_(gradient)
        buffers[slot] = buffer
        parameter -= rates.view(-1, *[1] * (parameter.dim() - 1)) * (gradient + MOMENTUM * buffer)


@dataclass(frozen=True)
class GridScore:
    """One lr of the grid over the folds: held-out scores pooled (weighted by fold size), steps of
    all folds, the mean last-epoch training loss; val_top1/val_loss/final_loss None: it diverged.
    The keys of `--lr auto`'s candidates, so that `labelfew.report.tables.print_lr_search` shows it."""

    lr: float
    factor: float
    steps: int
    val_top1: float | None
    val_loss: float | None
    final_loss: float | None


def held_out_scores(heads: Heads, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Each head's top-1 and mean cross-entropy on held-out features (NaN loss: diverged).

    Shape: features (N, dim), labels (N,) -> (heads,), (heads,)
    """
    logits = heads.logits(features)
    top1 = (logits.argmax(dim=2) == labels).float().mean(dim=1)
    loss = nn.functional.cross_entropy(logits.permute(0, 2, 1), labels[None].expand(len(logits), -1),
                                       reduction="none").mean(dim=1)  # fmt: skip
    finite = torch.isfinite(loss) & torch.isfinite(heads.weight).flatten(1).all(dim=1)
    return top1, torch.where(finite, loss, torch.full_like(loss, math.nan))


def search_grid(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    folds: Sequence[tuple[Tensor, Tensor]],
    rule: float,
    settings: HeadSettings,
) -> dict[str, object]:
    """Trains the whole grid on each fold's fitted rows, scores it on the held-out rows, and
    chooses an lr (`_rank`); the record for run.json's `lr_search`.

    `folds` are (fit rows, held-out rows) index tensors into `features`, the folds of `--lr auto`.
    """
    started = time.perf_counter()
    folds = [(fit, check) for fit, check in folds if len(check)]
    record: dict[str, object] = {"rule": rule, "optimizer": "sgd (nesterov, momentum 0.9)", "method": "linear",
                                 "batch": settings.batch_size, "factors": list(LR_FACTORS), "candidates": [],
                                 "folds": len(folds), "held_out_images": 0, "fit_images": len(labels)}  # fmt: skip
    if not folds:
        return record | {
            "chosen": rule,
            "note": "no class has 3 labels to hold one out: the rule's lr, not searched",
        }
    lrs = [rule * factor for factor in LR_FACTORS]
    top1, loss, final = torch.zeros(len(lrs)), torch.zeros(len(lrs)), torch.zeros(len(lrs))
    held = steps = 0
    for fit, check in folds:
        heads = train_heads(features[fit], labels[fit], num_classes, lrs, settings)
        fold_top1, fold_loss = held_out_scores(heads, features[check], labels[check])
        top1, loss, held = top1 + fold_top1 * len(check), loss + fold_loss * len(check), held + len(check)
        final += heads.final_loss / len(folds)
        steps += settings.epochs * math.ceil(len(fit) / min(settings.batch_size, len(fit)))
    scores = []
    for i, (lr, factor) in enumerate(zip(lrs, LR_FACTORS, strict=True)):
        finite = bool(torch.isfinite(loss[i]))
        values = (
            (float(top1[i] / held), float(loss[i] / held), float(final[i])) if finite else (None, None, None)
        )
        scores.append(GridScore(lr, factor, steps, *values))
    scored = [score for score in scores if score.val_top1 is not None]
    chosen = max(scored, key=_rank).lr if scored else rule
    return record | {"candidates": [asdict(score) for score in scores], "chosen": chosen, "held_out_images": held,
                     "fit_images": len(folds[0][0]), "seconds": time.perf_counter() - started}  # fmt: skip


def _rank(score: GridScore) -> tuple[float, float, float]:
    """Higher is better: held-out top-1, then lower held-out loss, then smaller lr (as `--lr auto`)."""
    return (score.val_top1 or 0.0, -(score.val_loss or 0.0), -score.lr)


@dataclass(frozen=True)
class LinearFit:
    """The final head (on raw features), its lr, the grid's record (None for an explicit `--lr`),
    its loss curve, steps and seconds."""

    layer: nn.Linear
    lr: float
    search: dict[str, object] | None
    final_loss: float
    epoch_losses: list[float]
    steps: int
    seconds: float


def fit_linear(
    features: Tensor, labeled: LabeledImages, class_names: list[str], lr: float | None, settings: HeadSettings
) -> LinearFit:
    """`lr` None: `search_grid` on `--lr auto`'s folds of `labeled` (seeded by `settings.seed`), then
    the chosen lr's head on all of `labeled`; else that lr's head alone.

    Shape: features (len(labeled), dim), row i the features of labeled.paths[i].
    """
    started = time.perf_counter()
    labels = torch.tensor(labeled.label_indices(class_names), dtype=torch.int64)
    search = None
    if lr is None:
        row = {path: index for index, path in enumerate(labeled.paths)}

        def rows(part: LabeledImages) -> Tensor:
            return torch.tensor([row[path] for path in part.paths], dtype=torch.int64)

        folds = [(rows(fit), rows(check)) for fit, check in search_folds(labeled, settings.seed)]
        rule = linear_rule(min(settings.batch_size, len(labeled)))
        search = search_grid(features, labels, len(class_names), folds, rule, settings)
        lr = float(search["chosen"])  # type: ignore[arg-type]
    heads = train_heads(features, labels, len(class_names), [lr], settings)
    steps = settings.epochs * math.ceil(len(labels) / min(settings.batch_size, len(labels)))
    return LinearFit(heads.layer(0), lr, search, float(heads.final_loss[0]), heads.epoch_losses, steps,
                     time.perf_counter() - started)  # fmt: skip
