"""`labelfew export`: the backbone or the fine-tuned model for use outside labelfew.

Writes into one folder:

- `model.safetensors` + `config.json` in timm's own local-folder format, so that
  `timm.create_model("local-dir:FOLDER", pretrained=True)` rebuilds the model with its weights
  (and `timm.data.resolve_data_config(model=...)` its preprocessing). Models trained with the
  small-image stem, or fine-tuned from a projection-head layer (SimCLRv2), are not plain timm
  models: `config.json` then holds the few lines of Python that rebuild them (`labelfew.rebuild`).
- `model.onnx` (opset 18, dynamic batch) through PyTorch's torch.export-based ONNX exporter.

Both take the model's channels (`labelfew.spec.ModelSpec.channels`): the input is
``(batch, C, S, S)``, and timm's ``input_size`` is ``[C, S, S]`` (timm builds the model with
``in_chans = C`` from it).

Each file is checked before the command reports success: the timm rebuild must reproduce the
labelfew model's outputs, and ONNX Runtime must match PyTorch within `ONNX_TOLERANCE`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from rich.console import Console
from torch import nn

from labelfew import __version__
from labelfew.artifacts import Artifact, save_tensors
from labelfew.config import ExportConfig
from labelfew.errors import UserError
from labelfew.fileio import atomic_write, atomic_write_json, sha256_file
from labelfew.models import Classifier, build_backbone, load_model
from labelfew.registry import resolve_model
from labelfew.spec import ModelSpec

FORMATS = ("safetensors", "onnx", "both")
ONNX_OPSET = 18  # the torch.export-based exporter's native opset; ONNX Runtime supports it
ONNX_TOLERANCE = 1e-4
console = Console()


def run(config: ExportConfig) -> Path:
    """Exports the model and returns the output folder.

    Raises:
        UserError: unknown format, no artifact, or ONNX asked for without the `export` extra.
    """
    if config.format not in FORMATS:
        raise UserError(f"--format {config.format}: use safetensors, onnx or both")
    onnx_wanted = config.format in ("onnx", "both")
    if onnx_wanted:
        _require_onnx()
    artifact = resolve_model(config.source, ("classifier", "backbone"))
    model = load_model(artifact).eval()
    out = config.out or artifact.path.parent / "export"
    size, channels = artifact.spec.image_size, artifact.spec.channels
    example = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(0))
    settings = _settings(artifact, model, out)
    written: list[Path] = []
    timm_files = config.format in ("safetensors", "both")
    if timm_files:
        written += _write_safetensors(artifact, model, out)
    else:
        settings["labelfew"].pop("rebuild")
    if onnx_wanted:
        difference = _write_onnx(model, out / "model.onnx", example)
        settings["labelfew"]["onnx"] = {
            "file": "model.onnx",
            "opset": ONNX_OPSET,
            "input": {"name": "images", "shape": ["batch", channels, size, size], "dtype": "float32"},
            "output": {"name": settings["labelfew"]["outputs"], "shape": ["batch", _output_width(model)]},
            "max_abs_difference_vs_pytorch": difference,
        }
        written.append(out / "model.onnx")
    atomic_write_json(out / "config.json", settings)
    written.append(out / "config.json")
    if timm_files:
        _check_rebuild(settings["labelfew"]["rebuild"], model, example, out / "config.json")
    if not config.quiet:
        console.print(
            f"exported {artifact.stage} model {artifact.path} ({artifact.arch}, {size} px, "
            f"{channels} channel{'s' if channels > 1 else ''}) to {out}/"
        )
        for path in written:
            console.print(f"  {path.name:<18} {_size(path.stat().st_size):>9}")
        if onnx_wanted:
            console.print(
                f"  ONNX Runtime vs PyTorch: max |difference| {difference:.2e} (tolerance {ONNX_TOLERANCE:g})"
            )
    return out


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count / 1e3:.1f} kB"


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise UserError(
            f"ONNX export needs {error.name}: pip install 'labelfew[export]' (or pass --format safetensors)"
        ) from None


def _output_width(model: nn.Module) -> int:
    if isinstance(model, Classifier):
        return model.classifier.out_features
    return int(model.num_features)  # type: ignore[arg-type]


def _settings(artifact: Artifact, model: nn.Module, out: Path) -> dict[str, Any]:
    """config.json: timm's local-folder format plus a `labelfew` section."""
    spec = artifact.spec
    size, resize = spec.image_size, spec.resize_side
    fine_tuned = spec.class_names is not None
    head_layers = spec.from_head_layer
    class_names = list(spec.class_names or [])
    # timm resizes to floor(size / crop_pct): this crop_pct gives exactly labelfew's resize side
    crop_fraction = 1.0 if resize == size else size / (resize + 0.5)
    mean, std = list(spec.mean), list(spec.std)
    input_size = [spec.channels, size, size]
    settings: dict[str, Any] = {
        "architecture": artifact.arch,
        "num_classes": len(class_names) if fine_tuned and head_layers == 0 else 0,
        "num_features": spec.num_features,
        "pretrained_cfg": {
            "input_size": input_size,
            "interpolation": "bicubic",
            "mean": mean,
            "std": std,
            "crop_pct": crop_fraction,
            "crop_mode": "center",
        },
    }
    if fine_tuned and head_layers == 0:
        settings["label_names"] = class_names
    model_args: dict[str, Any] = {"img_size": size} if _takes_image_size(artifact.arch, size) else {}
    if spec.channels != 3:
        model_args["in_chans"] = spec.channels
    if model_args:
        settings["model_args"] = model_args
    settings["labelfew"] = {
        "version": __version__,
        "stage": artifact.stage,
        "source": {"path": str(artifact.path.resolve()), "sha256": sha256_file(artifact.path)},
        "class_names": class_names,
        "outputs": "logits" if fine_tuned else "features",
        "small_stem": spec.small_stem,
        "from_head_layer": head_layers,
        "input_size": input_size,
        "mean": mean,
        "std": std,
        "preprocessing": (
            f"{_decoding_text(spec)}; resize the shorter side to {resize} px (bicubic, antialiased); centre crop "
            f"{size}×{size}; scale to [0, 1]; subtract mean and divide by std per channel"
        ),
        "rebuild": _rebuild_code(artifact, model, out),
    }
    return settings


def _decoding_text(spec: ModelSpec) -> str:
    """How the images are decoded, in the words of config.json's ``preprocessing``."""
    channels = {1: "8-bit grayscale (1 channel)", 3: "RGB"}.get(spec.channels, f"{spec.channels} channels")
    if spec.window is None:
        return f"decode to {channels}"
    low, high = spec.window
    return f"decode to {channels}, deeper images mapped to 8 bits through the window [{low:g}, {high:g}]"


def _takes_image_size(arch: str, size: int) -> bool:
    """Whether timm builds `arch` for a fixed input size (vision transformers), as build_backbone does."""
    try:
        timm.create_model(arch, pretrained=False, num_classes=0, img_size=size)
    except TypeError:
        return False
    return True


def _write_safetensors(artifact: Artifact, model: nn.Module, out: Path) -> list[Path]:
    """model.safetensors in timm's key layout (+ head.safetensors for head-layer models)."""
    backbone = model.backbone if isinstance(model, Classifier) else model
    tensors = dict(backbone.state_dict())
    spec = artifact.spec
    timm_model = build_backbone(
        spec.arch, small_stem=spec.small_stem, image_size=spec.image_size, channels=spec.channels
    )
    if isinstance(model, Classifier) and model.head is None:
        timm_model.reset_classifier(model.classifier.out_features)  # type: ignore[operator]
        name = _classifier_name(timm_model, artifact)
        tensors.update({f"{name}.{key}": value for key, value in model.classifier.state_dict().items()})
    timm_model.load_state_dict(tensors)  # strict: the keys are exactly timm's
    metadata = {"format": "pt", "architecture": artifact.arch, "exported_by": f"labelfew {__version__}"}
    save_tensors(out / "model.safetensors", tensors, metadata)
    written = [out / "model.safetensors"]
    if isinstance(model, Classifier) and model.head is not None:
        head = {f"head.{key}": value for key, value in model.head.state_dict().items()}
        head.update({f"classifier.{key}": value for key, value in model.classifier.state_dict().items()})
        save_tensors(out / "head.safetensors", head, metadata)
        written.append(out / "head.safetensors")
    return written


def _check_rebuild(code: list[str], model: nn.Module, example: torch.Tensor, config_file: Path) -> None:
    """Runs the rebuild code from config.json and compares its outputs with the labelfew model.

    Raises:
        RuntimeError: they differ (config.json is removed, so the export does not look complete).
    """
    namespace: dict[str, Any] = {}
    exec("\n".join(code), namespace)  # the code this module generated, as a user would run it
    with torch.no_grad():
        difference = float((namespace["model"](example) - model(example)).abs().max())
    if difference > 1e-5:
        config_file.unlink(missing_ok=True)
        raise RuntimeError(
            f"the rebuild code in {config_file} gives outputs {difference:.2e} away from the model"
        )


def _classifier_name(model: nn.Module, artifact: Artifact) -> str:
    classifier = model.get_classifier()  # type: ignore[operator]
    names = [name for name, module in model.named_modules() if module is classifier]
    if not names or set(classifier.state_dict()) != {"weight", "bias"}:
        raise UserError(
            f"{artifact.path}: {artifact.arch}'s timm classifier is not a single linear layer, so the "
            "fine-tuned weights cannot be written in its layout; use --format onnx"
        )
    return names[0]


def _python_target(name: str) -> str:
    """'conv1.0' -> 'model.conv1[0]' (an assignable expression for a submodule)."""
    text = "model"
    for part in name.split("."):
        text += f"[{part}]" if part.isdigit() else f".{part}"
    return text


def _module_code(module: nn.Module) -> str:
    """Python that builds an empty module of the same shape (the blocks of a projection head)."""
    if isinstance(module, nn.Sequential):
        return f"torch.nn.Sequential({', '.join(_module_code(child) for child in module)})"
    if isinstance(module, nn.Linear):
        return f"torch.nn.Linear({module.in_features}, {module.out_features}, bias={module.bias is not None})"
    if isinstance(module, nn.BatchNorm1d):
        return f"torch.nn.BatchNorm1d({module.num_features})"
    if isinstance(module, nn.ReLU):
        return "torch.nn.ReLU()"
    raise RuntimeError(f"no rebuild code for {type(module).__name__}")


def _rebuild_code(artifact: Artifact, model: nn.Module, out: Path) -> list[str]:
    """Lines of Python that rebuild the exported model with timm, torch and safetensors only."""
    lines = [
        "import timm, torch",
        "from safetensors.torch import load_file",
        f"folder = {str(out.resolve())!r}",
    ]
    if not artifact.spec.small_stem:
        lines.append('model = timm.create_model(f"local-dir:{folder}", pretrained=True)')
    else:
        backbone = model.backbone if isinstance(model, Classifier) else model
        first = next(
            (name, module)
            for name, module in backbone.named_modules()
            if name.startswith("conv1") and isinstance(module, nn.Conv2d)
        )
        conv = first[1]
        lines += [
            'model = timm.create_model(f"local-dir:{folder}")  # arch and classes from config.json',
            "# labelfew's small-image stem: a 3x3 stride-1 first convolution and no max-pool",
            f"{_python_target(first[0])} = torch.nn.Conv2d({conv.in_channels}, {conv.out_channels}, "
            "kernel_size=3, stride=1, padding=1, bias=False)",
            "model.maxpool = torch.nn.Identity()",
            'model.load_state_dict(load_file(f"{folder}/model.safetensors"))',
        ]
    if isinstance(model, Classifier) and model.head is not None:
        lines += [
            "# fine-tuned from a projection-head layer (SimCLRv2): backbone -> head -> classifier",
            'parts = load_file(f"{folder}/head.safetensors")',
            f"head = {_module_code(model.head)}",
            'head.load_state_dict({k[len("head."):]: v for k, v in parts.items() if k.startswith("head.")})',
            f"classifier = torch.nn.Linear({model.classifier.in_features}, {model.classifier.out_features})",
            'classifier.load_state_dict({k[len("classifier."):]: v for k, v in parts.items() if k.startswith("classifier.")})',
            "model = torch.nn.Sequential(model, head, classifier)",
        ]
    lines.append("model = model.eval()")
    return lines


def _write_onnx(model: nn.Module, path: Path, example: torch.Tensor) -> float:
    """Exports with a dynamic batch, then returns ONNX Runtime's max |difference| from PyTorch.

    Raises:
        RuntimeError: the difference exceeds ONNX_TOLERANCE.
    """
    import onnxruntime

    batch = torch.export.Dim("batch", min=1)
    output = "logits" if isinstance(model, Classifier) else "features"
    program = torch.onnx.export(
        model,
        (example[:2],),
        input_names=["images"],
        output_names=[output],
        dynamic_shapes=({0: batch},),
        opset_version=ONNX_OPSET,
        dynamo=True,
        verbose=False,
    )
    assert program is not None
    atomic_write(path, lambda temporary: program.save(str(temporary), external_data=False))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(example).numpy()
    (actual,) = session.run([output], {"images": example.numpy()})
    difference = float(abs(actual - expected).max())
    if difference > ONNX_TOLERANCE:
        raise RuntimeError(
            f"{path}: ONNX Runtime differs from PyTorch by {difference:.2e} (> {ONNX_TOLERANCE:g})"
        )
    return difference
