"""The Redis Streams store: the only module that imports ``redis``.

One topic is one stream (``broker:{topic}:log``) with a meta hash beside it; the
hash tag keeps both, and the idempotency records, on one Cluster slot so the
append script can touch them atomically.

With no URL the same code runs over fakeredis in this process: the embedded
default store, for trying the broker out. Single instance, not durable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from broker import constants as c
from broker.errors import StoreUnavailable
from broker.ids import EventId, StreamPosition, format_stream_id, new_epoch, parse_stream_id
from broker.model import AppendResult, LogEntry, LogState, NewEvent

log = logging.getLogger(__name__)
T = TypeVar("T")

_LOG_KEY_HEAD = len(f"{c.KEY_PREFIX}:{{")
_LOG_KEY_TAIL = len("}:log")


def _lua(name: str) -> str:
    return resources.files("broker").joinpath("lua", name).read_text()


def _topic_of(key: bytes) -> str:
    return key[_LOG_KEY_HEAD:-_LOG_KEY_TAIL].decode()


def _position_or_none(raw: bytes | None) -> StreamPosition | None:
    return parse_stream_id(raw) if raw else None


class _SingleFlight:
    """Concurrent identical reads share one Redis round trip.

    A reconnect storm sends thousands of subscribers after the same range at
    once; they get one XRANGE between them, and one parsed result.
    """

    def __init__(self) -> None:
        self._inflight: dict[tuple[Any, ...], asyncio.Future[Any]] = {}

    async def run(self, key: tuple[Any, ...], call: Callable[[], Awaitable[T]]) -> T:
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await call()
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: no "never retrieved" warning if nobody waits
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[key]


class RedisStreamStore:
    """The event log on Redis Streams (or on fakeredis, for the embedded store)."""

    def __init__(
        self,
        client: redis.Redis,
        reader: redis.Redis,
        *,
        retention_maxlen: int = c.DEFAULT_RETENTION_MAXLEN,
        retention_seconds: float | None = None,
        idempotency_seconds: int = c.DEFAULT_IDEMPOTENCY_SECONDS,
        durable: bool = True,
        description: str = "redis",
    ) -> None:
        self._client = client
        self._reader = reader
        self._reader_id: int | None = None
        self._maxlen = retention_maxlen
        self._trim_slack = max(1, min(1000, retention_maxlen // 100))
        self._max_age_ms = int((retention_seconds or 0) * 1000)
        self._idempotency_seconds = idempotency_seconds
        self._append_script = client.register_script(_lua("append.lua"))
        self._state_script = client.register_script(_lua("state.lua"))
        self._reads = _SingleFlight()
        self.durable = durable
        self.description = description

    async def append(
        self, topic: str, events: Sequence[NewEvent], *, idempotency_key: str | None = None
    ) -> AppendResult:
        keys = [c.log_key(topic), c.meta_key(topic)]
        if idempotency_key is not None:
            keys.append(c.idempotency_key(topic, idempotency_key))
        args: list[str | int] = [
            new_epoch(),
            self._maxlen,
            self._trim_slack,
            self._max_age_ms,
            self._idempotency_seconds,
        ]
        for event in events:
            retry = "" if event.retry is None else str(event.retry)
            args += [event.kind, event.data, event.event or "", retry]
        replayed, answer = await self._call(self._append_script(keys=keys, args=args))
        return AppendResult(ids=_parse_answer(answer), replayed=bool(replayed))

    async def read_range(self, topic: str, after: StreamPosition, count: int) -> list[LogEntry]:
        return await self._reads.run(
            ("range", topic, after, count), lambda: self._read_range(topic, after, count)
        )

    async def _read_range(self, topic: str, after: StreamPosition, count: int) -> list[LogEntry]:
        start = "-" if after == (0, 0) else "(" + format_stream_id(after)
        raw: Any = await self._call(self._client.xrange(c.log_key(topic), start, "+", count=count))
        return [LogEntry(topic, parse_stream_id(id_), fields) for id_, fields in raw]

    async def read_live(
        self, positions: dict[str, StreamPosition], block_ms: int
    ) -> dict[str, list[LogEntry]]:
        streams: Any = {c.log_key(t): format_stream_id(pos) for t, pos in positions.items()}
        if self._reader_id is None:
            self._reader_id = int(await self._call(self._reader.client_id()))
        try:
            reply: Any = await self._reader.xread(streams, count=c.LIVE_READ_COUNT, block=block_ms)
        except RedisError as error:
            self._reader_id = None
            raise StoreUnavailable(f"live read failed: {error}") from error
        return {
            _topic_of(key): [LogEntry(_topic_of(key), parse_stream_id(i), f) for i, f in entries]
            for key, entries in (reply or [])
        }

    async def interrupt_live_read(self) -> bool:
        """Unblock the reader's XREAD; False when it was not (yet) blocked."""
        if self._reader_id is None:
            return False
        try:
            return bool(await self._client.client_unblock(self._reader_id))
        except RedisError:
            return False

    async def state(self, topic: str) -> LogState:
        return await self._reads.run(("state", topic), lambda: self._state(topic))

    async def _state(self, topic: str) -> LogState:
        keys = [c.log_key(topic), c.meta_key(topic)]
        epoch, trimmed, length, first, last = await self._call(self._state_script(keys=keys))
        return LogState(
            epoch=epoch.decode() if epoch else None,
            length=int(length),
            first=_position_or_none(first),
            last_entry=_position_or_none(last),
            trimmed_through=_position_or_none(trimmed) or (0, 0),
        )

    async def ping(self) -> None:
        await self._call(self._client.ping())

    async def close(self) -> None:
        await self._reader.aclose()
        await self._client.aclose()

    async def _call(self, command: Awaitable[T]) -> T:
        try:
            return await command
        except ResponseError as error:
            if "UNBLOCKED" in str(error):
                raise
            raise StoreUnavailable(f"redis refused the command: {error}") from error
        except (RedisError, OSError) as error:
            raise StoreUnavailable(f"redis is unreachable: {error}") from error


def _parse_answer(answer: bytes) -> list[EventId]:
    epoch, _, ids = answer.decode().partition("|")
    return [EventId(epoch, parse_stream_id(raw)) for raw in ids.split(",") if raw]


def _client_options(block_ms: int) -> dict[str, Any]:
    # No automatic retries: a retried append after a timeout could store twice.
    # Callers retry with an Idempotency-Key; the live reader reconnects itself.
    return {
        "socket_connect_timeout": 2.0,
        "socket_timeout": 5.0,
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
    }


def open_store(url: str | None, **options: Any) -> RedisStreamStore:
    """A store for a Redis URL, or the embedded store when ``url`` is empty."""
    if not url:
        return _embedded_store(**options)
    client = redis.Redis.from_url(url, **_client_options(c.LIVE_BLOCK_MS))
    reader_options = _client_options(c.LIVE_BLOCK_MS) | {
        "socket_timeout": c.LIVE_BLOCK_MS / 1000 + 5,
        "single_connection_client": True,
    }
    reader = redis.Redis.from_url(url, **reader_options)
    return RedisStreamStore(client, reader, description=_redact(url), **options)


def _embedded_store(**options: Any) -> RedisStreamStore:
    import fakeredis

    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)
    reader = fakeredis.FakeAsyncRedis(server=server, single_connection_client=True)
    return RedisStreamStore(
        client, reader, durable=False, description="embedded (in-process, not durable)", **options
    )


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://***@{tail}"
