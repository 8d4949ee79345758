"""Per-topic retention and expiry: ``BROKER_TOPIC_POLICIES``, first match wins.

A policy names topics by a pattern where ``*`` matches any run of characters
(one LLM generation per topic: ``chat:*``), and sets what the global settings
would otherwise: the newest events kept (``maxlen``), their age
(``max_age_seconds``), and how long a topic nobody publishes to lives on
(``ttl_seconds``). The store asks once per topic and remembers the answer.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from broker.errors import InvalidInput

POLICY_CACHE_SIZE = 65_536


@dataclass(frozen=True, slots=True)
class Retention:
    """What one topic keeps, and for how long it lives unused (0: no limit)."""

    maxlen: int
    max_age_ms: int = 0
    ttl_ms: int = 0

    @property
    def trim_slack(self) -> int:
        """Trimming waits for this many extra entries (1%), so it costs little per append."""
        return max(1, min(1000, self.maxlen // 100))


@dataclass(frozen=True, slots=True)
class TopicPolicy:
    pattern: str
    maxlen: int | None = None
    max_age_seconds: float | None = None
    ttl_seconds: float | None = None


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A topic pattern as a regular expression: ``*`` is any run of characters."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


class Policies:
    """The retention of each topic: the first matching policy over the defaults."""

    def __init__(self, default: Retention, policies: Sequence[TopicPolicy] = ()) -> None:
        self.default = default
        self._rules = [(compile_pattern(p.pattern), _apply(p, default)) for p in policies]
        self.for_topic = functools.lru_cache(maxsize=POLICY_CACHE_SIZE)(self._lookup)

    def _lookup(self, topic: str) -> Retention:
        for pattern, retention in self._rules:
            if pattern.fullmatch(topic):
                return retention
        return self.default

    @property
    def expiring(self) -> bool:
        """Whether any topic can expire (the live reader then watches for it)."""
        return bool(self.default.ttl_ms) or any(r.ttl_ms for _, r in self._rules)


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
