"""A package's public names imported when first used (PEP 562's module ``__getattr__``).

``broker`` and ``brokerclient`` use it so that a command line client loads only what it
runs (see their docstrings): ``from broker import Broker`` works as ever, importing
``broker.core`` then.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_names(
    package: str, homes: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, whose public names (``homes``:
    each name -> the submodule defining it) are imported on first use into
    ``namespace`` (its globals)."""

    def getattr_(name: str) -> object:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        namespace[name] = value  # (once: later uses find it here)
        return value

    def dir_() -> list[str]:
        """The names not used yet among them too (``help()`` and a REPL's completion
        list a module's names from ``dir()``, which shows only its globals)."""
        return sorted({*namespace, *homes})

    return getattr_, dir_
