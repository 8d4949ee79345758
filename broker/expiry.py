"""When to look whether a live topic expired: one schedule for the live reader.

Redis expires a topic that nobody published to for its TTL, silently: the live
reader's XREAD just goes on waiting on a key that is gone. So the reader notes
when each live topic with a TTL could expire (its TTL after the last entry it
saw, or what Redis said was left of it), and looks then; a topic found gone has
its subscribers told. A heap, so each read costs O(log n) per change, not O(topics).
"""

from __future__ import annotations

import heapq

EXPIRY_MARGIN_S = 0.5
"""Looked at this long after the expected expiry: Redis expires keys a little late."""


class ExpiryWatch:
    """Topics and when to look at them; a topic noted again moves, its old note is ignored."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._at: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._at)

    def note(self, topic: str, now: float, expires_in_s: float) -> None:
        at = now + expires_in_s + EXPIRY_MARGIN_S
        self._at[topic] = at
        heapq.heappush(self._heap, (at, topic))
        if len(self._heap) > 4 * len(self._at) + 64:  # notes moved many times: compact
            self._heap = [(a, t) for t, a in self._at.items()]
            heapq.heapify(self._heap)

    def forget(self, topic: str) -> None:
        self._at.pop(topic, None)

    def due(self, now: float) -> list[str]:
        """Topics to look at now (they are forgotten: note them again if still live)."""
        topics = []
        while self._heap and self._heap[0][0] <= now:
            at, topic = heapq.heappop(self._heap)
            if self._at.get(topic) == at:
                del self._at[topic]
                topics.append(topic)
        return topics

    def seconds_until_next(self, now: float) -> float | None:
        while self._heap and self._at.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # a stale note
        return max(0.0, self._heap[0][0] - now) if self._heap else None
