"""The stages, one module each (pretrain, finetune, evaluate, select, ...).

Importing this package imports every module in it, so that each stage registers what it writes
(`labelfew.artifacts.register_stage`) before any `--from` is resolved: a new stage is one new
module here, found by every command without a list to extend. No stage imports another.
"""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
