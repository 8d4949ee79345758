"""A live-read lane's connection, and the XREAD each lane sends.

``redis_live.LiveReader`` spreads the live topics over lanes, each one blocking
XREAD at a time on a connection of its own: a ``RawLink`` to a real Redis, or a
``ClientLink`` to the embedded store (fakeredis), whose reads ``LocalWrites``
wakes rather than fakeredis' blocking.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as redis
from redis.exceptions import ResponseError

from broker import constants as c
from broker.redis_options import REDIS_FAILURES
from broker.redis_raw import RawConnection

XREAD_HEAD = ("XREAD", "COUNT", c.LIVE_READ_COUNT, "BLOCK", c.LIVE_BLOCK_MS, "STREAMS")
XREAD_SHORT_HEAD = (
    *XREAD_HEAD[:4],
    c.LIVE_BLOCK_UNINTERRUPTIBLE_MS,
    "STREAMS",
)
"""A lane's live read, before its keys and ids; the short one blocks briefly, for a
Redis that refuses ``CLIENT UNBLOCK`` (see ``LiveReader._cannot_unblock``)."""


class RawLink:
    """A lane's connection to a real Redis: a ``RawConnection`` (through redis-py an
    XREAD of 128 keys cost 3-4 times the client CPU, most of it parsing its reply)."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self._connection = RawConnection(pool)

    @property
    def client_id(self) -> int | None:
        return self._connection.client_id

    async def open(self) -> None:
        await self._connection.open()

    async def call(self, command: bytes) -> Any:
        """The reply to a command packed already, as Redis sent it (an error reply as an
        exception instance)."""
        [reply] = await self._connection.exchange([command])
        return reply

    async def close(self) -> None:
        await self._connection.close()


class LocalWrites:
    """Which keys the embedded store just wrote, for the lanes waiting on them.

    fakeredis wakes every blocked client on any write to its database: each lane's
    XREAD ran again over all its keys, in this process, for every publish (10 ms a
    publish with 4,000 idle live topics, 0.8 on Redis). The embedded store's writes
    are all made in this process, so a lane's read waits here instead, woken only by
    a write to one of its keys (``RedisStreamStore`` calls ``written``).
    """

    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Event]] = {}

    def written(self, key: str) -> None:
        for woken in self._waiting.get(key, ()):
            woken.set()

    def watch(self, keys: list[str], woken: asyncio.Event) -> None:
        for key in keys:
            self._waiting.setdefault(key, set()).add(woken)

    def unwatch(self, keys: list[str], woken: asyncio.Event) -> None:
        for key in keys:
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.discard(woken)
                if not waiting:
                    del self._waiting[key]


class ClientLink:
    """A lane's connection to the embedded store: fakeredis has no socket to take
    over, so redis-py's client, with its XREAD reply left as Redis sends it. Given
    ``writes``, its XREADs do not block in fakeredis (see ``LocalWrites``)."""

    def __init__(self, client: redis.Redis, writes: LocalWrites | None = None) -> None:
        self._client = client
        client.set_response_callback("XREAD", _as_sent)
        self.client_id: int | None = None
        self._writes = writes
        self._woken: asyncio.Event | None = None  # while a read waits for a write

    async def open(self) -> None:
        self.client_id = int(await self._client.client_id())

    async def call(self, command: tuple[Any, ...]) -> Any:
        if self._writes is not None and command[: len(XREAD_HEAD)] == XREAD_HEAD:
            return await self._read_when_written(command)
        return await self._execute(command)

    async def _execute(self, command: tuple[Any, ...]) -> Any:
        try:
            if self.client_id is None:
                await self.open()
            return await self._client.execute_command(*command)  # type: ignore[no-untyped-call]
        except ResponseError as error:
            return error
        except REDIS_FAILURES:
            self.client_id = None  # a new connection has a new id
            raise

    async def _read_when_written(self, command: tuple[Any, ...]) -> Any:
        """The XREAD without its BLOCK; if it finds nothing, again once one of its keys
        was written (or ``unblock``), or nil once the block time passed."""
        assert self._writes is not None
        streams = command[len(XREAD_HEAD) :]
        keys = list(streams[: len(streams) // 2])
        at_once = ("XREAD", "COUNT", c.LIVE_READ_COUNT, "STREAMS", *streams)
        woken = self._woken = asyncio.Event()
        self._writes.watch(keys, woken)  # (before the first read: no write slips between)
        try:
            reply = await self._execute(at_once)
            if reply:
                return reply
            try:
                await asyncio.wait_for(woken.wait(), c.LIVE_BLOCK_MS / 1000)
            except TimeoutError:
                return None
            return await self._execute(at_once)
        finally:
            self._writes.unwatch(keys, woken)
            self._woken = None

    def unblock(self) -> bool:
        """CLIENT UNBLOCK's part for a read waiting here: False if none waits."""
        if self._woken is None:
            return False
        self._woken.set()
        return True

    async def close(self) -> None:
        await self._client.aclose()


def _as_sent(response: Any, **options: Any) -> Any:
    return response


Link = RawLink | ClientLink
"""The connection a lane reads on."""
