"""What a subscription writes to: the edge's side of one client's connection.

The core calls these; ``api.connections`` (a socket served lean), ``api.sse``
(an ASGI response) and the tests' consumers implement them. The states they
are called in are written down in ``broker.subscription``.
"""

from __future__ import annotations

from typing import Protocol


class StreamSink(Protocol):
    """The edge a subscription writes to: one client's connection."""

    def write(self, chunk: bytes) -> bool:
        """Write now, without blocking: True if written, False (nothing written) if
        the client's socket is full or this edge cannot write outside its consumer."""

    def unsent_bytes(self) -> int:
        """What it holds written but not yet sent to the client."""

    def wanted(self) -> None:
        """Something is queued and no consumer runs: start one (pushed edges only)."""

    def dropped(self) -> None:
        """The subscriber could not keep up and was dropped: cut the connection."""

    def ended(self) -> None:
        """The subscription ended on its own (``expire``): end the response cleanly."""


class PulledSink:
    """The sink of an edge that only pulls ``chunks()``: nothing is written around it."""

    def write(self, chunk: bytes) -> bool:
        return False

    def unsent_bytes(self) -> int:
        return 0

    def wanted(self) -> None:
        """A pulled consumer is always parked in ``_wait``, which is woken instead."""

    def dropped(self) -> None:
        """``chunks`` raises SubscriberTooSlow to the consumer."""

    def ended(self) -> None:
        """``chunks`` ends by itself."""
