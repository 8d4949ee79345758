"""Hand-written ``__init__``s for the frozen dataclasses made for every event.

A frozen dataclass's generated ``__init__`` sets each field through
``object.__setattr__`` (the class's own refuses): a wrapper call, a walk of the class's
bases and a lookup of the name, field by field. For the objects of every append
(``NewEvent``, ``EventId``, ``AppendResult``, ``IngestLines``) that was 4,100 to 6,500
instructions an object, some 18,000 of an ingest line's 170,000 (callgrind). Their
``__init__``s are written by hand instead, setting each field with its slot's own
``__set__``, as below: some 600 instructions a field less. The classes stay frozen
(an assignment still raises ``FrozenInstanceError``), and equal, hashed and shown as
before (``tests/unit/test_fast_paths.py`` holds each ``__init__`` to the generated one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SlotSetter = Callable[[Any, Any], None]


def slot_setters(cls: type, *names: str) -> tuple[SlotSetter, ...]:
    """The ``__set__`` of each named slot of ``cls`` (a dataclass with ``slots=True``:
    the class the decorator made, whose slots these are)."""
    return tuple(cls.__dict__[name].__set__ for name in names)
