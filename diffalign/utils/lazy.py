"""A module proxy that imports on first attribute access.

Objective files declare their spec and hyperparameter dataclass at import time (the command line is built from them)
but need torch only when a loss is computed; importing torch costs seconds, and ``--help`` must answer in well under
one. ``torch = lazy_module("torch")`` at the top of such a file keeps ``torch.relu(...)`` readable.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class _LazyModule(ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self.__dict__["_lazy_target"] = None

    def __getattr__(self, attr: str) -> Any:
        target = self.__dict__["_lazy_target"]
        if target is None:
            target = importlib.import_module(self.__name__)
            self.__dict__["_lazy_target"] = target
        return getattr(target, attr)


def lazy_module(name: str) -> ModuleType:
    """``name`` imported the first time one of its attributes is read."""
    return _LazyModule(name)
