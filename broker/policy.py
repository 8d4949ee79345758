"""Per-topic retention and expiry: ``BROKER_TOPIC_POLICIES``, first match wins.

A policy names topics by a pattern where ``*`` matches any run of characters
(one LLM generation per topic: ``chat:*``), and sets what the global settings
would otherwise: the newest events kept (``maxlen``), their age
(``max_age_seconds``), and how long a topic nobody publishes to lives on
(``ttl_seconds``). The store asks once per topic and remembers the answer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from broker.errors import InvalidInput

POLICY_CACHE_SIZE = 4096
"""Topics whose policy is remembered (the most recent): the cache keeps their names,
and at 65,536 it held 24 MB of them for good, topics long expired included. Matching
a few patterns again costs little beside the Redis call it is for."""


@dataclass(frozen=True, slots=True)
class Retention:
    """What one topic keeps, and for how long it lives unused (0: no limit)."""

    maxlen: int
    max_age_ms: int = 0
    ttl_ms: int = 0
    trim_slack: int = field(init=False, repr=False, compare=False)
    """Trimming waits for this many extra entries (1%), so it costs little per append.
    (Worked out once, not per append: every append sends it.)"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "trim_slack", max(1, min(1000, self.maxlen // 100)))


@dataclass(frozen=True, slots=True)
class TopicPolicy:
    pattern: str
    maxlen: int | None = None
    max_age_seconds: float | None = None
    ttl_seconds: float | None = None


class TopicPattern:
    """A topic pattern: ``*`` is any run of characters, anything else itself.

    Matched in linear time, not as a regular expression: ``.*`` per star backtracks,
    and a topic name is the client's (a public pattern is matched before any token):
    ``*:*:*:*:*:z`` took 27 s over a 200-character name, the process frozen meanwhile.
    Between its first and last piece, a glob of stars only matches if each middle
    piece is found in order, each at its leftmost place after the one before.
    """

    __slots__ = ("_first", "_last", "_least", "_middle", "_wild")

    def __init__(self, pattern: str) -> None:
        pieces = pattern.split("*")
        self._wild = len(pieces) > 1
        self._first, self._last, self._middle = pieces[0], pieces[-1], pieces[1:-1]
        self._least = sum(map(len, pieces))  # (a name shorter cannot match)

    def fullmatch(self, topic: str) -> bool:
        """Whether the whole of ``topic`` matches."""
        if not self._wild:
            return topic == self._first
        first, last = self._first, self._last
        if len(topic) < self._least or not topic.startswith(first) or not topic.endswith(last):
            return False
        position, stop = len(first), len(topic) - len(last)
        for piece in self._middle:
            found = topic.find(piece, position, stop)
            if found < 0:
                return False
            position = found + len(piece)
        return True


class Policies:
    """The retention of each topic: the first matching policy over the defaults."""

    def __init__(self, default: Retention, policies: Sequence[TopicPolicy] = ()) -> None:
        self.default = default
        self._rules = [(TopicPattern(p.pattern), _apply(p, default)) for p in policies]
        self.for_topic: Callable[[str], Retention] = self._default
        if self._rules:  # (the cache holds topic names: none without rules)
            self.for_topic = functools.lru_cache(maxsize=POLICY_CACHE_SIZE)(self._lookup)
        self.expiring = bool(default.ttl_ms) or any(r.ttl_ms for _, r in self._rules)
        """Whether any topic can expire (the live reader then watches for it)."""
        ttls = [r.ttl_ms for r in (default, *(r for _, r in self._rules)) if r.ttl_ms]
        self.shortest_ttl_ms = min(ttls, default=0)
        """The shortest TTL of any topic (0: none expires)."""

    def _default(self, topic: str) -> Retention:
        return self.default

    def _lookup(self, topic: str) -> Retention:
        for pattern, retention in self._rules:
            if pattern.fullmatch(topic):
                return retention
        return self.default


def _apply(policy: TopicPolicy, default: Retention) -> Retention:
    def ms(seconds: float | None, fallback: int) -> int:
        return fallback if seconds is None else int(seconds * 1000)

    if policy.maxlen is not None and policy.maxlen < 1:
        raise InvalidInput(f"policy {policy.pattern!r}: maxlen must be at least 1")
    return Retention(
        maxlen=default.maxlen if policy.maxlen is None else policy.maxlen,
        max_age_ms=ms(policy.max_age_seconds, default.max_age_ms),
        ttl_ms=ms(policy.ttl_seconds, default.ttl_ms),
    )
