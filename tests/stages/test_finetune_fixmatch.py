"""`finetune --method fixmatch`: the step against a hand-written FixMatch loss, per-image strong views
of the weak view's window, the classifier's weight decay and BatchNorm momentum, the moving average
saved instead of the weights, the artifact as evaluate reads it, and bad options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from conftest import TinyRun, copy_tiny_run
from reference.losses_reference import weighted_smoothed_cross_entropy
from safetensors.torch import load_file
from torch import nn

from labelfew import engine
from labelfew.artifacts import load_artifact
from labelfew.config import EvaluateConfig, FinetuneConfig
from labelfew.data.batches import Batch, LabelledPairBatch
from labelfew.data.labelled import held_out_split
from labelfew.data.labels import read_label_files
from labelfew.engine import checkpoint, fine_tuning
from labelfew.engine.fixmatch import PseudoLabels, WeakStrongViews, find_unlabeled, fixmatch_step
from labelfew.engine.start import finetune_start
from labelfew.errors import UserError
from labelfew.models import Classifier, build_classifier, load_model
from labelfew.registry import model_label
from labelfew.stages import evaluate, finetune
from labelfew.use import held_out
from labelfew.views.finetune import ShiftFlipViews
from labelfew.views.randaugment import RandAugmentViews, apply_randaugment, sample_randaugment

LABELFEW = str(Path(sys.executable).parent / "labelfew")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _batches(labelled: int = 4, unlabeled: int = 8) -> LabelledPairBatch:
    images = torch.randint(0, 256, (labelled + unlabeled, 3, 36, 40), dtype=torch.uint8)
    sizes = torch.tensor([[36, 40]] * (labelled + unlabeled))
    labels = torch.arange(labelled) % 3
    labelled_batch = Batch(images[:labelled], sizes[:labelled], torch.arange(labelled), labels=labels, seed=3)
    return LabelledPairBatch(images[labelled:], sizes[labelled:], torch.arange(unlabeled), labels=None, seed=11,
                             labelled=labelled_batch)  # fmt: skip


def _unit_views(images: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return ShiftFlipViews(32, mean=(0, 0, 0), std=(1, 1, 1))(images, sizes, generator)


def _normalise(views: torch.Tensor) -> torch.Tensor:
    return (views - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_the_strong_view_is_the_weak_views_window_with_its_own_randaugment_operations_per_image() -> None:
    torch.manual_seed(0)
    batch = _batches(unlabeled=16)
    weak, strong = WeakStrongViews(32, MEAN, STD)(batch.images, batch.sizes, batch.generator())
    generator = batch.generator()  # the same draws by hand: one shift + flip, then RandAugment and Cutout
    expected_weak = _unit_views(batch.images, batch.sizes, generator)
    parameters = sample_randaugment(16, 32, 32, generator)
    torch.testing.assert_close(weak, _normalise(expected_weak))
    torch.testing.assert_close(strong, _normalise(apply_randaugment(expected_weak, parameters)))
    assert len({tuple(row) for row in parameters.operations.tolist()}) > 8  # per image, not one op per batch
    assert len({tuple(row) for row in parameters.cutout.tolist()}) > 8
    # the same image twice in one batch gets two different strong views
    twice = torch.cat([batch.images[:1]] * 2)
    _, strong_twice = WeakStrongViews(32, MEAN, STD)(twice, batch.sizes[:2], torch.Generator().manual_seed(5))
    assert not torch.allclose(strong_twice[0], strong_twice[1])


def test_without_randaugment_the_strong_view_is_the_weak_view_pixel_for_pixel() -> None:
    """The strong view's geometry is the weak view's (IoU 1): the same window and flip, whatever the
    images' sizes, so a pseudo-label is never a label of another part of the photo."""
    images = torch.randint(0, 256, (6, 3, 40, 48), dtype=torch.uint8)
    sizes = torch.tensor([[32, 32], [32, 40], [40, 32], [32, 48], [20, 28], [40, 48]])  # stored, and resized
    views = WeakStrongViews(32, MEAN, STD)
    views.randaugment = RandAugmentViews(operation_count=0, cutout_fraction=0)
    weak, strong = views(images, sizes, torch.Generator().manual_seed(3))
    assert torch.equal(weak, strong)
    assert torch.equal(weak, _normalise(_unit_views(images, sizes, torch.Generator().manual_seed(3))))


@pytest.mark.parametrize(("class_weights", "smoothing"), [(None, 0.0), ([0.5, 1.0, 3.0], 0.1)])
def test_the_step_is_supervised_ce_plus_the_masked_ce_of_strong_views_against_the_weak_argmax(
    class_weights: list[float] | None, smoothing: float
) -> None:
    """`--class-weights` weigh the labelled part only (USB's FixMatch weighs neither part)."""
    torch.manual_seed(0)
    model = build_classifier("test_resnet", small_stem=True, image_size=32, num_classes=3).train()
    nn.init.normal_(model.classifier.weight, std=3.0)  # confident on some images, not on others
    batch = _batches()
    labelled = batch.labelled
    assert labelled is not None and labelled.labels is not None
    # by hand: the labelled images' weak views, then the unlabeled weak and strong views (RandAugment of
    # the weak one), one forward pass over all three
    labelled_views = ShiftFlipViews(32, MEAN, STD)(labelled.images, labelled.sizes, labelled.generator())
    generator = batch.generator()
    weak_base = _unit_views(batch.images, batch.sizes, generator)
    weak = _normalise(weak_base)
    strong = _normalise(apply_randaugment(weak_base, sample_randaugment(8, 32, 32, generator)))
    logits = model(torch.cat([labelled_views, weak, strong]))
    weak_logits, strong_logits = logits[4:12], logits[12:]
    confidence, guess = torch.softmax(weak_logits.detach(), dim=1).max(dim=1)
    threshold = float(confidence.median())
    mask = (confidence >= threshold).float()
    assert 0 < mask.mean() < 1
    per_image = nn.functional.cross_entropy(strong_logits, guess, reduction="none")
    supervised = weighted_smoothed_cross_entropy(
        logits[:4], labelled.labels, class_weights, smoothing
    ).float()
    expected = supervised + 2.0 * (mask * per_image).mean()

    pseudo_labels = PseudoLabels(torch.device("cpu"), has_labels=False)
    step = fixmatch_step(ShiftFlipViews(32, MEAN, STD), WeakStrongViews(32, MEAN, STD), threshold,
                         unlabeled_weight=2.0, label_smoothing=smoothing, channels_last=False,
                         pseudo_labels=pseudo_labels, class_weights=class_weights)  # fmt: skip
    loss, count = step(model, batch)
    assert count == 4 + 2 * 8
    torch.testing.assert_close(loss, expected)
    # no gradient through the pseudo-label: the gradient is that of the loss with the weak logits detached
    loss.backward()
    gradient = model.classifier.weight.grad.clone()  # type: ignore[union-attr]
    model.zero_grad()
    expected.backward()
    torch.testing.assert_close(gradient, model.classifier.weight.grad)

    class Accelerator:
        def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
            return tensor

    assert pseudo_labels.epoch_metrics(Accelerator()) == {"mask_rate": pytest.approx(float(mask.mean()))}


@pytest.fixture(scope="module")
def tiny(tiny_pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """The shared 1-epoch pretrain on 60 digits of 3 classes."""
    return copy_tiny_run(tiny_pretrained, tmp_path_factory.mktemp("fixmatch"))


def _config(tiny: TinyRun, **options: Any) -> FinetuneConfig:
    values: dict[str, Any] = {"labels": tiny["labels"], "source": tiny["run"], "method": "fixmatch",
                              "unlabeled": tiny["unlabeled"], "epochs": 2, "batch_size": 5, "mu": 2,
                              "threshold": 0.5, "workers": 0, "quiet": True, **options}  # fmt: skip
    return FinetuneConfig(**values)


@pytest.fixture(scope="module")
def fixmatch(tiny: TinyRun) -> Path:
    return finetune.run(_config(tiny))


def test_the_artifact_is_the_moving_average_and_evaluate_shows_it_as_fixmatch(
    tiny: TinyRun, fixmatch: Path
) -> None:
    assert fixmatch == tiny["run"] / "finetune-fixmatch-labels" / "model.safetensors"
    artifact = load_artifact(fixmatch, "finetune")
    assert model_label(artifact) == "fine-tuned (fixmatch)" and artifact.metadata["method"] == "fixmatch"
    record = json.loads((fixmatch.parent / "run.json").read_text())
    config = record["config"]
    assert (
        config["method"],
        config["mu"],
        config["threshold"],
        config["unlabeled_weight"],
        config["ema"],
    ) == ("fixmatch", 2, 0.5, 1.0, 0.999)
    # FixMatch's defaults, not SimCLR fine-tuning's: lr 0.03 × B / 64, weight decay 5e-4, no warmup
    assert record["lr"] == pytest.approx(0.03 * 5 / 64) and "not searched" in record["lr_search"]["note"]
    assert (config["weight_decay"], config["warmup_fraction"]) == (5e-4, 0.0)
    assert record["data"]["unlabeled_images"] == 60
    assert record["steps"] == 2 * (60 // 10)  # an epoch is one pass over the unlabeled images, 2 × 5 a step
    # the unlabeled folder is a tree of the label classes: the pseudo-labels' accuracy is logged
    metrics = record["metrics"]
    assert len(metrics["mask_rate"]) == 2 and len(metrics["pseudo_label_top1"]) == 2
    assert all(0 <= rate <= 1 for rate in metrics["mask_rate"] + metrics["masked_pseudo_label_top1"])
    # what was saved is the average kept in the last checkpoint, not the weights trained last
    last = checkpoint.latest(fixmatch.parent / "checkpoints")
    assert last is not None
    # a checkpoint of FixMatch before its weak view, decay and BN momentum were the references' is refused
    assert json.loads((last / "fingerprint.json").read_text())["fixmatch_version"] == 2
    saved, averaged, weights = (load_file(str(path)) for path in (fixmatch, last / "ema.safetensors",
                                                                   last / "model.safetensors"))  # fmt: skip
    assert all(torch.equal(saved[key], averaged[key]) for key in saved)
    assert not torch.equal(saved["classifier.weight"], weights["classifier.weight"])
    model = load_model(artifact).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    finetune.run(FinetuneConfig(labels=tiny["labels"], source=tiny["run"], epochs=1, batch_size=5, lr=0.01,
                                workers=0, quiet=True))  # fmt: skip
    result = evaluate.run(EvaluateConfig(test=tiny["test"], source=tiny["run"], bank=tiny["labels"],
                                         out=tiny["work"] / "evaluate", workers=0, quiet=True))  # fmt: skip
    names = [row["method"] for row in result["rows"]]
    assert "fine-tuned (fixmatch)" in names and "fine-tuned" in names


def _prepared(config: FinetuneConfig) -> fine_tuning.Training:
    """The model, optimizer and step `finetune.run` would train, without training."""
    accelerator = engine.make_accelerator(config.precision, seed=config.seed)
    labeled = read_label_files(config.labels)
    start = finetune_start(config.source, config.scratch, config.arch, config.image_size, labeled.paths)
    train, _ = held_out_split(labeled, config.val_fraction, config.seed)
    unlabeled = None if config.unlabeled is None else find_unlabeled(config.unlabeled, labeled.class_names)
    return fine_tuning.prepare_training(
        config, start, labeled.class_names, train, 0.01, accelerator, unlabeled
    )


def _batchnorm_momenta(model: nn.Module) -> set[float | None]:
    return {
        module.momentum for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
    }


def test_fixmatch_decays_the_classifier_weight_and_its_batchnorm_follows_the_average(tiny: TinyRun) -> None:
    """FixMatch (official: every kernel; USB: all but biases and BN) decays the final dense weight,
    SimCLR's fine-tuning does not; FixMatch's BN momentum is 1 - the average's decay (0.001 warmed up),
    plain fine-tuning keeps PyTorch's 0.1."""
    fixmatch = _prepared(_config(tiny, weight_decay=5e-4))
    supervised = _prepared(FinetuneConfig(labels=tiny["labels"], source=tiny["run"], weight_decay=5e-4, epochs=1,
                                          batch_size=5, workers=0, quiet=True))  # fmt: skip
    for training, classifier_decay in ((fixmatch, 5e-4), (supervised, 0.0)):
        classifier = cast(Classifier, training.model).classifier
        decays = {id(param): group["weight_decay"] for group in training.optimizer.param_groups
                  for param in group["params"]}  # fmt: skip
        assert decays[id(classifier.weight)] == classifier_decay
        assert decays[id(classifier.bias)] == 0.0
        backbone_weights = [param for param in training.model.parameters() if param.ndim > 1]
        assert all(decays[id(param)] == 5e-4 for param in backbone_weights if param is not classifier.weight)
    assert _batchnorm_momenta(supervised.model) == {0.1}
    ema = fixmatch.ema
    assert ema is not None
    assert list(_batchnorm_momenta(fixmatch.model)) == [pytest.approx(0.9)]  # 1 - d_0 = 1 - 1/10: warming up
    ema.load_state_dict(ema.state_dict(), updates=10_000)  # as a resumed run far into training
    assert list(_batchnorm_momenta(fixmatch.model)) == [pytest.approx(0.001)]


def test_from_scratch_it_is_plain_fixmatch(tiny: TinyRun) -> None:
    path = finetune.run(_config(tiny, scratch=True, epochs=1))
    assert path.parent.name == "finetune-fixmatch-scratch-labels"
    artifact = load_artifact(path, "finetune")
    assert model_label(artifact) == "fine-tuned (fixmatch, scratch)"
    assert json.loads((path.parent / "run.json").read_text())["parent"] is None


def test_the_best_epoch_kept_is_the_moving_average_validated_then(
    tiny: TinyRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With held-out labels FixMatch keeps its best epoch too: the average's weights at that epoch."""
    seen: list[dict[str, torch.Tensor]] = []
    scores = [0.4, 0.9, 0.6]

    def validate(model: nn.Module, *args: Any) -> tuple[float, float]:
        seen.append({key: value.clone() for key, value in model.state_dict().items()})
        return 0.5, scores[len(seen) - 1]

    monkeypatch.setattr(held_out, "top1_and_balanced", validate)
    path = finetune.run(_config(tiny, epochs=3, val_fraction=0.2, out=tiny["work"] / "fixmatch-best"))
    record = json.loads((path.parent / "run.json").read_text())
    assert record["best"]["epoch"] == 2 and record["metrics"]["val_score"] == scores
    for name, expected in (("model.safetensors", seen[1]), ("model-last.safetensors", seen[2])):
        saved = load_file(str(path.parent / name))
        assert all(torch.equal(saved[key], expected[key]) for key in expected), name
    assert (
        model_label(load_artifact(path.parent / "model-last.safetensors"))
        == "fine-tuned (fixmatch, last epoch)"
    )


def _bad(tiny: TinyRun, *arguments: str) -> str:
    result = subprocess.run([LABELFEW, "finetune", "--labels", str(tiny["labels"]), "--from", str(tiny["run"]),
                             "--workers", "0", "--quiet", *arguments], cwd=tiny["work"],
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_options_that_do_not_go_together_exit_2_with_one_line(tiny: TinyRun) -> None:
    assert "--method fixmatch needs --unlabeled" in _bad(tiny, "--method", "fixmatch")
    unlabeled = str(tiny["unlabeled"])
    assert "--unlabeled: only for --method fixmatch" in _bad(tiny, "--unlabeled", unlabeled)
    assert "--mu, --ema: only for --method fixmatch" in _bad(tiny, "--mu", "3", "--ema", "0.99")
    assert "--threshold 1.5" in _bad(
        tiny, "--method", "fixmatch", "--unlabeled", unlabeled, "--threshold", "1.5"
    )
    empty = tiny["work"] / "empty"
    empty.mkdir(exist_ok=True)
    assert "no image files" in _bad(tiny, "--method", "fixmatch", "--unlabeled", str(empty))
    with pytest.raises(UserError, match="--unlabeled-weight"):
        FinetuneConfig(labels=tiny["labels"], unlabeled_weight=0.5)
