"""Hooks the core calls as things happen, so the edge can count them.

The core imports no metrics library; ``api.metrics`` implements these with
prometheus-client. The defaults do nothing.
"""

from __future__ import annotations


class Observer:
    """Callbacks for what the broker does; subclass and override what you count."""

    def published(self, count: int, *, replayed: bool) -> None:
        """Events were appended (or an idempotent repeat was answered)."""

    def delivered(self, count: int) -> None:
        """Events were written to subscribers (live, or caught up from the log)."""

    def replayed(self, count: int) -> None:
        """A subscriber caught up this many events from the log, in one catch-up."""

    def gap_sent(self, reason: str) -> None:
        """A ``broker.gap`` notice went out."""

    def subscriber_dropped(self) -> None:
        """A subscriber overflowed its buffer and was disconnected."""

    def live_changed(self, topics: int, registrations: int) -> None:
        """The live reader now follows this many topics, for this many registrations
        (a subscription counts once per topic); called as they come and go."""

    def store_error(self, operation: str) -> None:
        """A store operation failed."""

    def store_latency(self, operation: str, seconds: float) -> None:
        """A store operation completed in this time."""
