"""Distillation (SimCLRv2 eq. 2) and FixMatch's unlabeled loss (eq. 4) against plain Python loops."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from labelfew.losses import distillation_loss, fixmatch_unlabeled_loss


def softmax_row(row: list[float]) -> list[float]:
    top = max(row)
    exponentials = [math.exp(value - top) for value in row]
    return [value / sum(exponentials) for value in exponentials]


def reference_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    """Mean over rows of -sum_y p_teacher(y; t) log p_student(y; t), one row at a time."""
    total = 0.0
    for student_row, teacher_row in zip(student.tolist(), teacher.tolist(), strict=True):
        targets = softmax_row([value / temperature for value in teacher_row])
        predictions = softmax_row([value / temperature for value in student_row])
        total -= sum(p * math.log(q) for p, q in zip(targets, predictions, strict=True))
    return total / len(student)


def reference_fixmatch(weak: torch.Tensor, strong: torch.Tensor, threshold: float) -> tuple[float, float]:
    """Sum over confident rows of -log p_strong(pseudo-label), divided by every row; the mask rate."""
    total, confident = 0.0, 0
    for weak_row, strong_row in zip(weak.tolist(), strong.tolist(), strict=True):
        probabilities = softmax_row(weak_row)
        label = max(range(len(probabilities)), key=probabilities.__getitem__)
        if probabilities[label] >= threshold:
            confident += 1
            total -= math.log(softmax_row(strong_row)[label])
    return total / len(weak), confident / len(weak)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0, 4.0])
@pytest.mark.parametrize(("batch_size", "classes"), [(1, 2), (7, 10), (32, 3)])
def test_distillation_matches_a_loop(batch_size: int, classes: int, temperature: float) -> None:
    generator = torch.Generator().manual_seed(batch_size * classes)
    student = torch.randn(batch_size, classes, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(batch_size, classes, generator=generator, dtype=torch.float64) * 3
    loss = distillation_loss(student, teacher, temperature)
    assert loss.item() == pytest.approx(reference_distillation(student, teacher, temperature), rel=1e-12)


def test_distillation_has_the_temperature_on_both_sides() -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(16, 5, generator=generator, dtype=torch.float64)
    teacher = torch.randn(16, 5, generator=generator, dtype=torch.float64) * 4
    scaled = distillation_loss(student / 3, teacher / 3, 1.0)
    assert distillation_loss(student, teacher, 3.0).item() == pytest.approx(scaled.item(), rel=1e-12)
    one_sided = reference_distillation(student / 3, teacher, 1.0)
    assert distillation_loss(student, teacher, 3.0).item() != pytest.approx(one_sided, rel=1e-3)
    # The student's optimum is the teacher at every temperature: zero gradient at student == teacher
    for temperature in (0.5, 1.0, 4.0):
        copy = teacher.clone().requires_grad_(True)
        distillation_loss(copy, teacher, temperature).backward()
        assert copy.grad is not None and copy.grad.abs().max() < 1e-12


def test_distillation_sends_no_gradient_to_the_teacher() -> None:
    student = torch.randn(8, 4, requires_grad=True)
    teacher = torch.randn(8, 4, requires_grad=True)
    distillation_loss(student, teacher, 2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize(("batch_size", "classes"), [(1, 2), (56, 10), (448, 3)])
def test_fixmatch_loss_matches_a_loop(batch_size: int, classes: int, threshold: float) -> None:
    generator = torch.Generator().manual_seed(batch_size + classes)
    weak = torch.randn(batch_size, classes, generator=generator, dtype=torch.float64) * 6
    strong = torch.randn(batch_size, classes, generator=generator, dtype=torch.float64) * 2
    loss, mask_rate = fixmatch_unlabeled_loss(weak, strong, threshold)
    expected_loss, expected_rate = reference_fixmatch(weak, strong, threshold)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12, abs=1e-15)
    assert mask_rate.item() == pytest.approx(expected_rate, rel=1e-12)


def test_fixmatch_divides_by_every_unlabeled_image_and_counts_the_threshold() -> None:
    confident, unsure = [10.0, 0.0, 0.0], [0.1, 0.0, 0.0]
    weak = torch.tensor([confident, unsure, unsure, unsure])
    strong = torch.tensor([[0.0, 2.0, 0.0]] * 4)
    loss, mask_rate = fixmatch_unlabeled_loss(weak, strong, 0.95)
    one_image = -math.log(math.exp(0) / (2 + math.exp(2)))
    assert loss.item() == pytest.approx(one_image / 4, rel=1e-6)  # not one_image / 1
    assert mask_rate.item() == 0.25
    # a probability exactly at the threshold counts (>=)
    exactly = torch.tensor([[math.log(3.0), 0.0]])  # softmax = (0.75, 0.25)
    assert fixmatch_unlabeled_loss(exactly.double(), exactly.double(), 0.75)[1].item() == 1.0
    none_confident = fixmatch_unlabeled_loss(torch.zeros(5, 3), torch.randn(5, 3), 0.95)
    assert none_confident[0].item() == 0.0 and none_confident[1].item() == 0.0


def test_fixmatch_pseudo_labels_carry_no_gradient() -> None:
    weak = (torch.randn(64, 5) * 8).requires_grad_(True)
    strong = torch.randn(64, 5, requires_grad=True)
    loss, mask_rate = fixmatch_unlabeled_loss(weak, strong, 0.5)
    loss.backward()
    assert weak.grad is None and not mask_rate.requires_grad
    assert strong.grad is not None and strong.grad.abs().sum() > 0


def test_losses_are_float32_under_autocast() -> None:
    logits = torch.randn(4, 3, dtype=torch.bfloat16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert distillation_loss(logits, logits).dtype == torch.float32
        assert fixmatch_unlabeled_loss(logits, logits)[0].dtype == torch.float32


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0), "temperature"),
        (lambda: distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4)), "same shape"),
        (lambda: fixmatch_unlabeled_loss(torch.zeros(2, 3), torch.zeros(2, 3), 1.5), "threshold"),
        (lambda: fixmatch_unlabeled_loss(torch.zeros(0, 3), torch.zeros(0, 3)), "non-empty"),
    ],
)
def test_bad_arguments_raise(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
