"""An open-loop publisher: timestamped events at a fixed rate, whatever the server's pace.

Each event is sent at its scheduled time on an idle keep-alive connection, or a new
one, so a server that answers slowly does not lower the offered rate (no coordinated
omission), up to `max_connections` requests in flight.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

import orjson

from bench.progress import say
from bench.wire import KeepAliveClient, post_request

PROGRESS_EVERY_S = 5.0


class Pacer:
    """Publishes `{"t": <time_ns>}` events to one path; counts acknowledgements."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        max_connections: int = 64,
        encode: Callable[[list[Any]], list[bytes]] | None = None,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        # How the target takes one event: the request body (`{"data": ...}` by default).
        self.encode = encode or (lambda events: [orjson.dumps({"data": events[0]})])
        self.idle: list[KeepAliveClient] = []
        self.gate = asyncio.Semaphore(max_connections)
        self.sent = self.acknowledged = self.failed = 0
        self.failures: collections.Counter[str] = collections.Counter()  # by reason

    async def run(self, rate: float, count: int, until: float) -> None:
        """Send `count` events at `rate`/s, but none after `until` (monotonic)."""
        start = time.monotonic()
        in_flight: set[asyncio.Task[None]] = set()
        for slot in range(count):
            await asyncio.sleep(max(0.0, start + slot / rate - time.monotonic()))
            if time.monotonic() > until:
                break
            await self.gate.acquire()
            task = asyncio.create_task(self._publish_one())
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            if slot and slot % int(rate * PROGRESS_EVERY_S) == 0:
                say(f"  published {slot} of {count} events")
        await asyncio.gather(*in_flight)
        for client in self.idle:
            client.close()

    async def _publish_one(self) -> None:
        self.sent += 1
        try:
            client = self._idle_client() or await self._connect()
            (body,) = self.encode([{"t": time.time_ns()}])
            status, _ = await client.request(post_request(self.host, self.port, self.path, body))
        except (OSError, ConnectionError, RuntimeError) as error:  # (uvloop: a closed transport)
            self.failed += 1
            self.failures[f"{type(error).__name__}: {error}"] += 1
            return
        finally:
            self.gate.release()
        if status in (201, 202):  # Nchan answers 202 when it found no subscriber
            self.acknowledged += 1
        else:
            self.failed += 1
            self.failures[f"status {status}"] += 1
        if client.transport is not None and not client.transport.is_closing():
            self.idle.append(client)

    def _idle_client(self) -> KeepAliveClient | None:
        """An idle connection the server has not closed meanwhile (as any HTTP client
        checks before reusing one: servers close those idle too long)."""
        while self.idle:
            client = self.idle.pop()
            if client.usable:
                return client
        return None

    async def _connect(self) -> KeepAliveClient:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(KeepAliveClient, self.host, self.port)
        return client
