"""Editing methods and TokenFlow structures, found by name (see ``methods/base.py``)."""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from .base import EditMethod, Injection, Structure, UNetPass

if TYPE_CHECKING:
    from ..options import EditOptions


def _subclasses(root: type) -> list[type]:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
    found, pending = [], list(root.__subclasses__())
    while pending:
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        if not cls.__name__.startswith("_"):
            found.append(cls)
    return found


def edit_methods() -> dict[str, type[EditMethod]]:
    return {cls.name: cls for cls in _subclasses(EditMethod) if cls.name}


def structures() -> dict[str | None, type[Structure]]:
    """Structures by the ``baseline`` option value that selects them (None: TokenFlow)."""
    return {cls.baseline: cls for cls in _subclasses(Structure)}


def propagation_rules() -> tuple[str, ...]:
    from .tokenflow import PROPAGATION_RULES

    return tuple(PROPAGATION_RULES)


def method_for(options: EditOptions) -> EditMethod:
    return edit_methods()[options.method](options)


def structure_for(n_frames: int, options: EditOptions) -> Structure:
    return structures()[options.baseline](n_frames, options)


__all__ = [
    "EditMethod",
    "Injection",
    "Structure",
    "UNetPass",
    "edit_methods",
    "method_for",
    "propagation_rules",
    "structure_for",
    "structures",
]
