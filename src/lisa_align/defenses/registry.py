"""The defense registry: name → :class:`~lisa_align.defenses.base.Defense` subclass.

``defenses/__init__.py`` registers every defense of the package, in the order the report lists the
methods; a defense defined elsewhere (a plugin) calls :func:`register` itself.
"""

from __future__ import annotations

import difflib
import importlib

from lisa_align.defenses.base import Defense, Stage
from lisa_align.errors import LisaError

DEFENSES: dict[str, type[Defense]] = {}


def register(cls: type[Defense]) -> type[Defense]:
    """Add a defense (by its ``name``). The config's union of defenses is built when
    :mod:`lisa_align.config` is first imported: register a plugin's defense before that."""
    name = cls.defense_name()
    if not name or name in DEFENSES and DEFENSES[name] is not cls:
        raise ValueError(f"defense name '{name}' is empty or already registered")
    DEFENSES[name] = cls
    return cls


def defense_names(stage: Stage | None = None) -> list[str]:
    return [n for n, cls in DEFENSES.items() if stage is None or stage in cls.stages]


def suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def get_defense(name: str, stage: Stage | None = None) -> type[Defense]:
    names = defense_names(stage)
    if name not in names:
        where = f"{stage} " if stage else ""
        raise LisaError(f"unknown {where}defense '{name}': use one of {', '.join(names)}{suggest(str(name), names)}")
    return DEFENSES[name]


def load_class(path: str):
    """The class a ``"package.module:Class"`` path names (a defense's trainer or arguments)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)
