"""The stages, one module each (pretrain, finetune, evaluate, select, ...).

Importing this package imports every module in it, so that each stage registers what it writes
(`labelfew.registry.register_stage`) before any `--from` is resolved: a new stage is one new
module here, found by every command without a list to extend. No stage imports another.
"""

from __future__ import annotations

import importlib
import pkgutil

# The chain's first two stages register first, so that they come first wherever stages are listed
# (`--from` preferences, error messages); the others follow in name order.
_FIRST = ("pretrain", "finetune")
for _name in (*_FIRST, *sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _FIRST)):
    importlib.import_module(f"{__name__}.{_name}")
