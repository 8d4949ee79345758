"""The event-stream response: a raw ASGI callable that writes a subscription out.

Under ``broker serve`` a stream that is its connection's first request is served
by ``api.connections`` instead; this serves the others (a stream on a reused
keep-alive connection) and the app under any other ASGI server.

Deliberately not Starlette's StreamingResponse: it writes the coalesced chunks
the subscription hands it (one ``send`` per wake-up, not per event), it knows
how to end cleanly when the instance drains, and it frees the subscription the
moment the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, Protocol, cast

from starlette.types import Receive, Scope, Send

from api.cors import cors_headers
from api.metrics import SUBSCRIBERS
from broker import SubscriberTooSlow, Subscription
from broker.framing import retry_hint, seconds_text
from broker.health import ThrottledLog

log = logging.getLogger(__name__)
DROPS = ThrottledLog(10.0, log, logging.INFO)
"""Slow subscribers dropped, said at most every 10 s (with how many since): a network
stall under a broadcast wrote a line per subscriber, thousands at once."""

STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),  # (first: see come_back_later)
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
    (b"x-content-type-options", b"nosniff"),  # (as every answer: api.problems.NOT_SNIFFED)
]
HEARTBEAT_HEADER = b"broker-heartbeat"
"""Says ``BROKER_HEARTBEAT_SECONDS`` on every stream: a client that reads it knows how
long a live stream may stay silent, where it had to guess (the Python subscriber waited
45 s whatever the interval). A header, not a first comment line: proxies pass it as it
is, and a client reads it before the body (an ``EventSource`` sees neither)."""


def stream_headers(heartbeat_seconds: float) -> list[tuple[bytes, bytes]]:
    """The headers of every stream of an app whose heartbeat is ``heartbeat_seconds``:
    built once, when the app is (``app.state.stream_headers``), not per stream."""
    return [*STREAM_HEADERS, (HEARTBEAT_HEADER, seconds_text(heartbeat_seconds))]


class Closable(Protocol):
    def close(self) -> None:
        """End the stream now, cleanly where the socket allows."""


class OpenStreams:
    """Every open stream of this process, so a drain can end them all."""

    def __init__(self) -> None:
        self._streams: set[Closable] = set()
        self.draining = False

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, stream: Closable) -> None:
        self._streams.add(stream)

    def discard(self, stream: Closable) -> None:
        self._streams.discard(stream)

    def drain(self) -> None:
        """End every open stream now; their clients reconnect elsewhere."""
        self.draining = True
        for stream in list(self._streams):
            stream.close()


class EventStreamResponse:
    """Streams one subscription to one client until either side ends it.

    Its task pulls ``chunks()``: each wake-up writes what piled up in one ``send``.
    Under uvicorn, the live reader also writes caught-up entries straight through
    ``send`` (``write``), driven by hand: uvicorn's send awaits only *before* it
    writes (while the socket is full), so an attempt that would wait has written
    nothing and is dropped. That is a private trait of uvicorn, pinned in
    ``pyproject.toml`` and checked by ``tests/unit/test_private_surfaces*``;
    without it (measured: the slow-subscriber test) a reader that keeps up
    behind a busy topic overflows its buffer while its task waits its turn.
    """

    def __init__(
        self, streams: OpenStreams, retry_ms: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """``headers``: the app's ``stream_headers`` (CORS is added per request)."""
        self._streams = streams
        self._retry_ms = retry_ms
        self._headers = headers
        self._subscription: Subscription | None = None
        self._send: Send | None = None  # uvicorn's, for writes outside the task
        self._writer: asyncio.Task[object] | None = None
        self._blocked_in_send = False
        self._dropped = False

    def attach(self, subscription: Subscription) -> EventStreamResponse:
        """The subscription it streams, opened with this response as its sink."""
        self._subscription = subscription
        return self

    # -- StreamSink -------------------------------------------------------------

    def write(self, chunk: bytes) -> bool:
        """Write without a task switch; False (nothing written) if it cannot."""
        if self._send is None:
            return False
        sending = cast(Coroutine[Any, Any, None], self._send(_body(chunk)))
        try:
            sending.send(None)
        except StopIteration:
            return True
        # uvicorn waits for the client to drain *before* writing anything: drop
        # this attempt; the subscription queues the chunk for its own task.
        sending.close()
        return False

    def unsent_bytes(self) -> int:
        return 0

    def wanted(self) -> None:
        """Its task is always parked in the subscription's wait, which is woken."""

    def ended(self) -> None:
        """``chunks()`` ends by itself."""

    def dropped(self) -> None:
        """The subscription overflowed: if we are stuck writing to it, stop now."""
        self._dropped = True
        if self._blocked_in_send and self._writer is not None:
            self._writer.cancel()

    # -- ASGI --------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        subscription = self._subscription
        assert subscription is not None, "attach() the subscription first"
        self._streams.add(subscription)
        SUBSCRIBERS.inc()
        self._writer = asyncio.current_task()
        if _completes_synchronously(send):
            self._send = send
        watcher = asyncio.create_task(self._close_on_disconnect(subscription, receive))
        try:
            headers = [*self._headers, *cors_headers(scope)]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send(_body(retry_hint(self._retry_ms) + subscription.opening_beat))
            async for chunk in subscription.chunks():
                self._blocked_in_send = True
                await send(_body(chunk))
                self._blocked_in_send = False
        except SubscriberTooSlow:
            DROPS.say("dropped a subscriber that could not keep up")
        except asyncio.CancelledError:
            if not self._dropped:
                raise
            # Our own cancel: the client stopped reading and its socket is full,
            # so no clean end can be written. Returning closes the connection.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            DROPS.say("dropped a subscriber that stopped reading")
            return
        finally:
            self._send = None
            subscription.close()
            self._streams.discard(subscription)
            SUBSCRIBERS.dec()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _close_on_disconnect(subscription: Subscription, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        subscription.close()


def _completes_synchronously(send: Send) -> bool:
    """Whether ``send`` is uvicorn's HTTP send, which awaits only before it writes.

    Other servers get the queued path.
    """
    owner = getattr(send, "__self__", None)
    return type(owner).__module__.startswith("uvicorn.protocols.http.")


def _body(chunk: bytes) -> dict[str, object]:
    return {"type": "http.response.body", "body": chunk, "more_body": True}
