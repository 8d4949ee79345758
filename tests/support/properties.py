"""The suite's one way to bound a property test (``hypothesis``): the same examples on
every run (derandomized, no example database), a deadline for each, and few enough of
them that a test stays well under its timeout. A failure names its example, and runs
again the same way."""

from __future__ import annotations

import itertools

from hypothesis import settings


def bounded(examples: int, deadline_ms: int = 2000) -> settings:
    """``examples`` examples, each in at most ``deadline_ms``; the same ones every run."""
    return settings(
        max_examples=examples,
        deadline=deadline_ms,
        derandomize=True,
        database=None,
        print_blob=False,
    )


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (those inside it): the reads it may arrive in."""
    inside = sorted({cut for cut in cuts if 0 < cut < len(data)})
    bounds = [0, *inside, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]
