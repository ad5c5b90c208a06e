"""Layers import downward only (DESIGN.md): walks the `import` statements of every labelfew module.

A stage never imports another stage; a use command never imports a stage; a module never imports
a layer above its own. The one import of the `labelfew.stages` package from below is
`labelfew/use/__init__.py`, which only fills the stage registry (`registry.register_stage`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "labelfew"

LAYERS: dict[str, int] = {
    # 0: no labelfew dependencies but these; the configs and the model spec
    "labelfew": 0,  # the package itself (__version__)
    "labelfew.errors": 0,
    "labelfew.fileio": 0,
    "labelfew.spec": 0,
    "labelfew.options": 0,
    "labelfew.config": 0,
    # 1: the only reader and writer of weights, and the stage registry
    "labelfew.artifacts": 1,
    "labelfew.registry": 1,
    # 2: models and the maths
    "labelfew.models": 2,
    "labelfew.losses": 2,
    "labelfew.optim": 2,
    "labelfew.selection": 2,
    "labelfew.probes": 2,
    "labelfew.multilabel": 2,
    # 3-5: views, image sources, the training engine
    "labelfew.views": 3,
    "labelfew.data": 4,
    "labelfew.engine": 5,
    # 6-8: using models, reports, stages
    "labelfew.use": 6,
    "labelfew.report": 7,
    "labelfew.stages": 8,
    # 9: entry points
    "labelfew.demo": 9,
    "labelfew.cli": 9,
    "labelfew.__main__": 9,
}
REGISTRY_FILL = ("labelfew.use", "labelfew.stages")
"""(importer, imported): the use package imports the stages package only to fill the registry."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    """The layer of a module: its longest prefix in LAYERS."""
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (PACKAGE.parent / relative).with_suffix(".py").is_file() or (PACKAGE.parent / relative).is_dir()


def imports_of(path: Path) -> set[str]:
    """The labelfew modules a file imports (`from a import b` counts `a.b` when b is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names}
            modules = {name for name in submodules if _is_module(name)}
            found.update(modules)
            if len(modules) < len(submodules):
                found.add(node.module)
    return {name for name in found if name == "labelfew" or name.startswith("labelfew.")}


def _stage(module: str) -> str | None:
    """`labelfew.stages.finetune` -> "finetune" (the package itself is no stage)."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["labelfew", "stages"] else None


def violations(module: str, imported: set[str]) -> list[str]:
    """Why `module` may not import each of `imported` (empty when every import is allowed)."""
    found = []
    for target in sorted(imported):
        stage = _stage(target)
        if stage is not None and _stage(module) not in (None, stage):
            found.append(f"{module} imports {target}: a stage never imports another stage")
        elif stage is not None and module.startswith("labelfew.use"):
            found.append(f"{module} imports {target}: a use command never imports a stage")
        elif (module, target) == REGISTRY_FILL:
            continue
        elif _layer(target) > _layer(module):
            found.append(f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})")
    return found


def test_every_module_imports_only_downward() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        problems += violations(module, imports_of(path))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "imported", "message"),
    [
        ("labelfew.stages.evaluate", {"labelfew.stages.finetune"}, "never imports another stage"),
        ("labelfew.stages.distill", {"labelfew.stages.finetune"}, "never imports another stage"),
        ("labelfew.use.predict", {"labelfew.stages.finetune"}, "never imports a stage"),
        ("labelfew.report.plots", {"labelfew.stages"}, "layer 7) imports labelfew.stages"),
        ("labelfew.models", {"labelfew.engine"}, "layer 2) imports labelfew.engine"),
        ("labelfew.artifacts", {"labelfew.models"}, "imports labelfew.models"),
    ],
)
def test_the_walk_catches_each_kind_of_violation(module: str, imported: set[str], message: str) -> None:
    (problem,) = violations(module, imported)
    assert message in problem


def test_allowed_imports_pass() -> None:
    assert violations("labelfew.use", {"labelfew.stages"}) == []  # fills the stage registry
    assert violations("labelfew.stages.finetune", {"labelfew.use.inference", "labelfew.artifacts"}) == []
    assert violations("labelfew.cli", {"labelfew.stages.pretrain", "labelfew.use.predict"}) == []


def test_from_imports_resolve_to_submodules(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text("from labelfew.report import plots\nfrom labelfew import __version__, engine\n")
    assert imports_of(source) == {"labelfew.report.plots", "labelfew", "labelfew.engine"}
