"""Optimisers and learning-rate schedules for SimCLR pretraining and fine-tuning.

LARS (You et al. 2017, https://arxiv.org/abs/1708.03888) as SimCLR uses it
(https://arxiv.org/abs/2002.05709, appendix B.1, and the official TensorFlow
`lars_optimizer.py` in google-research/simclr): weight decay and the layer-wise trust ratio
apply to weight matrices and convolution kernels only, never to biases or normalisation
weights; the learning rate scales with the batch size; it warms up linearly, then decays
along a cosine, and is updated every iteration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "LARS",
    "build_finetune_optimizer",
    "build_optimizer",
    "finetune_learning_rate",
    "parameter_groups",
    "scaled_learning_rate",
    "warmup_cosine",
]

OptimizerName = Literal["lars", "sgd", "adamw"]
LearningRateRule = Literal["linear", "sqrt"]

# SimCLR appendix B.1: 0.3 x batch / 256 with LARS; 0.075 x sqrt(batch) works better for
# small batches and long training.
DEFAULT_BASE_LEARNING_RATE = {"linear": 0.3, "sqrt": 0.075}


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling, as in SimCLR's `lars_optimizer.py`.

    For each parameter `w` of a group with `lars_adapt=True` (the TensorFlow formulation,
    `classic_momentum=True`, no Nesterov):

        g = grad + weight_decay * w
        trust_ratio = trust_coefficient * ||w|| / (||g|| + eps)   (1 when ||w|| or ||g|| is 0)
        v = momentum * v + lr * trust_ratio * g
        w = w - v

    The momentum buffer holds the scaled update, so a change of learning rate affects new
    gradients only (unlike `torch.optim.SGD`, whose buffer is multiplied by the current lr).
    Groups with `lars_adapt=False` (biases and normalisation weights, see `parameter_groups`)
    get plain momentum SGD, `v = momentum * v + lr * grad`, without weight decay.

    Args:
        params: parameters or parameter groups; a group may set `lr`, `momentum`,
            `weight_decay`, `trust_coefficient`, `eps` and `lars_adapt`.
        lr: learning rate; see `scaled_learning_rate`.
        momentum: 0.9 as in SimCLR.
        weight_decay: 1e-6 in SimCLR pretraining (LARS, batch 4096); applied to adapted
            groups only.
        trust_coefficient: `eeta` in the TensorFlow code; 0.001 as there.
        eps: added to ||g|| in the trust ratio; 0 as in the TensorFlow code.
        lars_adapt: default for groups that do not set it.

    All tensors of a group are updated with `torch._foreach_*` kernels: a handful of launches
    per group instead of ~8 per tensor (on a GPU, ResNet-18's 62 tensors otherwise cost ~500
    small kernel launches per step). tests/reference/lars_reference.py holds the per-tensor
    loop the tests compare it with.

    Raises:
        ValueError: a negative or out-of-range hyperparameter, or a group with
            `lars_adapt=False` and non-zero weight decay (LARS never decays those).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
        lars_adapt: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "lars_adapt": lars_adapt,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_lars_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Performs one update.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None without a closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            if any(param.grad.is_sparse for param in params):
                raise ValueError("LARS does not support sparse gradients.")
            _update_group(params, [self.state[param] for param in params], group)
        return loss


def _check_lars_group(group: dict[str, Any]) -> None:
    """Raises ValueError for a LARS parameter group with unusable hyperparameters."""
    if group["lr"] < 0:
        raise ValueError(f"LARS learning rate must be >= 0, got {group['lr']}.")
    if not 0 <= group["momentum"] < 1:
        raise ValueError(f"LARS momentum must be in [0, 1), got {group['momentum']}.")
    if group["weight_decay"] < 0:
        raise ValueError(f"LARS weight decay must be >= 0, got {group['weight_decay']}.")
    if group["trust_coefficient"] <= 0:
        raise ValueError(f"LARS trust coefficient must be positive, got {group['trust_coefficient']}.")
    if group["eps"] < 0:
        raise ValueError(f"LARS eps must be >= 0, got {group['eps']}.")
    if not group["lars_adapt"] and group["weight_decay"] != 0:
        raise ValueError(
            "LARS never applies weight decay to a group with lars_adapt=False; "
            f"set its weight_decay to 0 (got {group['weight_decay']})."
        )


def _update_group(params: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]) -> None:
    """One LARS (or, for excluded groups, momentum SGD) update of every tensor of a group, in place.

    The trust ratios stay on the device (no host synchronisation): the norms of all tensors are
    stacked into one vector, the ratio computed once for all, and split back into 0-d tensors.
    """
    if not params:
        return
    grads: list[Tensor] = [param.grad for param in params if param.grad is not None]
    if group["lars_adapt"]:
        if group["weight_decay"] != 0:
            grads = list(torch._foreach_add(grads, params, alpha=group["weight_decay"]))
        param_norms = torch.stack(torch._foreach_norm(params))
        grad_norms = torch.stack(torch._foreach_norm(grads))
        trust_ratios = torch.where(
            (param_norms > 0) & (grad_norms > 0),
            group["trust_coefficient"] * param_norms / (grad_norms + group["eps"]),
            torch.ones_like(param_norms),
        )
        updates = torch._foreach_mul(grads, list((trust_ratios * group["lr"]).unbind()))
    else:
        updates = torch._foreach_mul(grads, group["lr"])
    for param, state in zip(params, states, strict=True):
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
    velocities = [state["momentum_buffer"] for state in states]
    torch._foreach_mul_(velocities, group["momentum"])
    torch._foreach_add_(velocities, updates)
    torch._foreach_sub_(params, velocities)


def parameter_groups(
    model: nn.Module, weight_decay: float, exclude: Sequence[nn.Module] = ()
) -> list[dict[str, Any]]:
    """Splits the trainable parameters into a LARS-adapted, decayed group and an excluded one.

    Excluded are parameters with at most one dimension: biases and the weights of BatchNorm,
    LayerNorm and GroupNorm (SimCLR excludes `batch_normalization` and `bias` variables;
    decaying or adapting them hurts, DESIGN.md trap 3), and every parameter of the modules in
    `exclude` (fine-tuning passes the new linear classifier, which SimCLR's `lars_optimizer.py`
    excludes as `head_supervised`). Frozen parameters are left out.

    Args:
        model: the module to optimise.
        weight_decay: for the adapted group; 1e-6 for SimCLR pretraining with LARS.
        exclude: submodules of `model` whose parameters are neither adapted nor decayed.

    Returns:
        Two groups, always in this order and possibly empty:
        `{"params": [...], "weight_decay": weight_decay, "lars_adapt": True}` and
        `{"params": [...], "weight_decay": 0.0, "lars_adapt": False}`.

    Raises:
        ValueError: negative weight decay.
    """
    if weight_decay < 0:
        raise ValueError(f"Weight decay must be >= 0, got {weight_decay}.")
    adapted: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    always_excluded = {id(param) for module in exclude for param in module.parameters()}
    for param in model.parameters():
        if param.requires_grad:
            (excluded if param.ndim <= 1 or id(param) in always_excluded else adapted).append(param)
    return [
        {"params": adapted, "weight_decay": weight_decay, "lars_adapt": True},
        {"params": excluded, "weight_decay": 0.0, "lars_adapt": False},
    ]


def scaled_learning_rate(base_lr: float | None, batch_size: int, rule: LearningRateRule = "linear") -> float:
    """Learning rate for a global batch size (SimCLR appendix B.1).

    Args:
        base_lr: per-rule base; None uses SimCLR's 0.3 (linear) or 0.075 (sqrt).
        batch_size: the global batch size, summed over processes.
        rule: "linear" gives base_lr * batch_size / 256 (the paper's default with LARS);
            "sqrt" gives base_lr * sqrt(batch_size), better for small batches.

    Raises:
        ValueError: an unknown rule, a non-positive batch size or base learning rate.
    """
    if rule not in DEFAULT_BASE_LEARNING_RATE:
        raise ValueError(f"Unknown learning-rate rule {rule!r}; use 'linear' or 'sqrt'.")
    if batch_size <= 0:
        raise ValueError(f"Batch size must be positive, got {batch_size}.")
    if base_lr is None:
        base_lr = DEFAULT_BASE_LEARNING_RATE[rule]
    if not base_lr > 0:
        raise ValueError(f"Base learning rate must be positive, got {base_lr}.")
    if rule == "linear":
        return base_lr * batch_size / 256
    return base_lr * math.sqrt(batch_size)


FIXMATCH_LR_PER_64 = 0.03
"""FixMatch's SGD lr for a labelled batch of 64 (arXiv 2001.07685, section 4), scaled linearly."""


def fixmatch_learning_rate(optimizer: OptimizerName, batch_size: int) -> float:
    """`--method fixmatch`'s lr for a global labelled batch: SGD 0.03 × B / 64 (FixMatch), else
    `finetune_learning_rate`'s rule (FixMatch gives none for LARS or AdamW)."""
    if optimizer == "sgd" and batch_size > 0:
        return FIXMATCH_LR_PER_64 * batch_size / 64
    return finetune_learning_rate(optimizer, batch_size)


def finetune_learning_rate(optimizer: OptimizerName, batch_size: int) -> float:
    """The fine-tuning lr rule for a global batch: the centre of `--lr auto`'s search.

    SGD: 0.05 × B / 256 (SimCLR appendix B.5); LARS: 0.005 × √B (SimCLRv2's fine-tuning,
    0.16 at batch 1024); AdamW has no rule in the papers: 1e-3 × B / 256. No fixed value is right
    for every dataset (on 3,068 photos with ~300 steps the SGD rule's 0.0125 underfits: 46.0%
    against 55.1% at 0.05), which is why the fine-tuning stage searches ×1, ×2, ×4 and ×8 of it.

    Raises:
        ValueError: an unknown optimizer or a non-positive batch size.
    """
    if batch_size <= 0:
        raise ValueError(f"Batch size must be positive, got {batch_size}.")
    if optimizer == "lars":
        return 0.005 * math.sqrt(batch_size)
    if optimizer in ("sgd", "adamw"):
        return (0.05 if optimizer == "sgd" else 1e-3) * batch_size / 256
    raise ValueError(f"Unknown optimizer {optimizer!r}; use 'lars', 'sgd' or 'adamw'.")


def build_optimizer(
    name: OptimizerName,
    groups: Sequence[dict[str, Any]],
    lr: float,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """Builds the named optimizer over groups from `parameter_groups`.

    Args:
        name: "lars" for SimCLR pretraining; "sgd" (momentum with Nesterov, as SimCLR
            fine-tunes: appendix B.5 and the official `get_optimizer`, `use_nesterov=True`);
            "adamw" (default betas; `momentum` unused) for small-data fine-tuning.
        groups: parameter groups; each keeps its `weight_decay`. `lars_adapt` is read by LARS
            and dropped for the others.
        lr: learning rate, usually from `scaled_learning_rate`.
        momentum: for "lars" and "sgd".

    Raises:
        ValueError: an unknown name or a negative learning rate.
    """
    if lr < 0:
        raise ValueError(f"Learning rate must be >= 0, got {lr}.")
    if name == "lars":
        return LARS([dict(group) for group in groups], lr=lr, momentum=momentum)
    plain_groups = [{k: v for k, v in group.items() if k != "lars_adapt"} for group in groups]
    if name == "sgd":
        return torch.optim.SGD(plain_groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(plain_groups, lr=lr)
    raise ValueError(f"Unknown optimizer {name!r}; use 'lars', 'sgd' or 'adamw'.")


def build_finetune_optimizer(
    name: OptimizerName,
    model: nn.Module,
    classifier: nn.Module,
    weight_decay: float,
    lr: float,
    decay_classifier: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer of a model with a new linear classifier, which is neither LARS-adapted nor
    decayed (SimCLR's `lars_optimizer.py` excludes `head_supervised` from both), unless
    `decay_classifier`: FixMatch decays every weight matrix, the final dense layer's too (official
    code: every ``kernel``; USB: all but biases and BatchNorm).

    Args:
        name: "sgd" (Nesterov momentum), "lars" or "adamw" (`build_optimizer`).
        model: the whole model.
        classifier: its linear layer (a submodule of `model`).
        weight_decay: for the other weights; biases and normalisation weights never decay.
        lr: the peak learning rate.
        decay_classifier: treat the classifier's weight as the other weights (its bias still not).
    """
    groups = parameter_groups(model, weight_decay, exclude=[] if decay_classifier else [classifier])
    return build_optimizer(name, groups, lr=lr)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup to the base learning rate, then cosine decay to 0; step it per iteration.

    The factor for optimizer step `s` (counting from 0) is `(s + 1) / warmup_steps` during
    warmup, so the first step already moves (the TensorFlow code uses `s / warmup_steps`,
    which wastes it) and step `warmup_steps - 1` reaches 1; then
    `0.5 * (1 + cos(pi * (s - warmup_steps) / (total_steps - warmup_steps)))`, which is 1 at
    the end of warmup, 0.5 halfway and 0 from `total_steps` on. SimCLR warms up for 10 epochs
    (appendix B.1).

    Args:
        optimizer: its groups' current `lr` become the peak values.
        warmup_steps: iterations of linear warmup; 0 for none.
        total_steps: iterations of the whole run, warmup included.

    Raises:
        ValueError: negative warmup, or total steps not above 0 and at least the warmup.
    """
    if warmup_steps < 0 or total_steps <= 0 or warmup_steps > total_steps:
        raise ValueError(
            "Schedule needs 0 <= warmup_steps <= total_steps and total_steps > 0, "
            f"got warmup_steps={warmup_steps}, total_steps={total_steps}."
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step >= total_steps:
            return 0.0
        progress = (step - warmup_steps) / (total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, lr_lambda=factor)


def fixmatch_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float) -> LambdaLR:
    """FixMatch's decay (arXiv 2001.07685, section 4): ``cos(7 pi k / 16 K)`` at step ``k`` of ``K``,
    ending at 0.2 of the peak, after a linear warmup over `warmup_fraction` of the steps (FixMatch: none).

    With a warmup of ``W`` steps the decay runs over the ``K - W`` steps after it, ``k`` counted from
    its end, so that it reaches ``cos(7 pi / 16)`` at step ``K`` and stays there."""
    warmup = min(total_steps, max(1, round(warmup_fraction * total_steps))) if warmup_fraction > 0 else 0
    decay_steps = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return math.cos(7 * math.pi * min(step - warmup, decay_steps) / (16 * decay_steps))

    return LambdaLR(optimizer, lr_lambda=factor)


def finetune_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float,
                      fixmatch: bool = False) -> LambdaLR:  # fmt: skip
    """Fine-tuning's: `fixmatch_schedule` for `--method fixmatch`, else `warmup_cosine_fraction` (to 0)."""
    schedule = fixmatch_schedule if fixmatch else warmup_cosine_fraction
    return schedule(optimizer, total_steps, warmup_fraction)


def warmup_cosine_fraction(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float
) -> LambdaLR:
    """`warmup_cosine` warming up over `warmup_fraction` of the steps (at least one when it is not 0)."""
    warmup = min(total_steps, max(1, round(warmup_fraction * total_steps))) if warmup_fraction > 0 else 0
    return warmup_cosine(optimizer, warmup_steps=warmup, total_steps=total_steps)
