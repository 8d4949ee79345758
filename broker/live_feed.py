"""One live topic of the hub (``broker.fanout``): its subscribers, how far the live
reader has read its log, and the handing of what it read (or a reset) to each of its
subscribers.

Nothing here changes the hub's own state. Handing entries to subscribers is where one
subscriber is kept from reaching another: a subscriber that raises while being handed
entries (or a reset) is cut (its client resumes by id), and the rest go on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from broker.ids import StreamPosition
from broker.model import LiveBatch, LogEntry

log = logging.getLogger("broker.fanout")  # (the hub's log, as before this module)


class LiveSubscriber(Protocol):
    """What the hub pushes into."""

    def offer(self, batch: LiveBatch) -> int:
        """New entries of one topic, oldest first; must not block.

        Returns how many it wrote to its client right away (0 when it queued them).
        """

    def log_reset(self, topic: str) -> None:
        """Live entries can no longer be trusted to follow what it has (the log was
        lost or recreated, or trimmed past the reader): go back to the log."""

    def abandon(self) -> None:
        """Handing it entries failed: it must end, so that its client resumes."""


class Feed:
    """One live topic: its subscribers and how far the reader has read it."""

    __slots__ = ("epoch", "number", "position", "ready", "subscribers")

    def __init__(self) -> None:
        self.subscribers: set[LiveSubscriber] = set()
        self.position: StreamPosition = (0, 0)
        self.epoch: str | None = None
        # The number in its log of the entry at ``position`` (append.lua); None when
        # not known (a log stored before numbers, a position the log lost).
        self.number: int | None = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def follows(self, armed: StreamPosition, entries: list[LogEntry]) -> bool | None:
        """Whether these entries follow, in number, the last one the reader read (where
        the read began); None when their numbers cannot tell (entries stored before
        numbers, a position whose number is not known): retention's bounds judge."""
        first = entries[0].number
        if self.number is None or first is None or self.position != armed:
            return None
        return first == self.number + 1

    def offer(self, topic: str, batch: LiveBatch) -> int:
        """The batch offered to each subscriber: how many entries were written to
        clients right away."""
        delivered = 0
        for subscriber in tuple(self.subscribers):
            try:
                delivered += subscriber.offer(batch)
            except Exception:
                log.exception("topic %s: a subscriber failed to take entries", topic)
                _abandon(subscriber)
        return delivered

    def reset_subscribers(self, topic: str) -> None:
        """Each subscriber sent back to the log (``LiveSubscriber.log_reset``)."""
        for subscriber in tuple(self.subscribers):
            try:
                subscriber.log_reset(topic)
            except Exception:
                log.exception("topic %s: a subscriber failed to go back to the log", topic)
                _abandon(subscriber)


def _abandon(subscriber: LiveSubscriber) -> None:
    try:
        subscriber.abandon()
    except Exception:
        log.exception("a failed subscriber could not be cut")
