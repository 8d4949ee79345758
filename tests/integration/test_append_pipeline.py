"""The append pipeline: when Redis loses its scripts mid-batch (SCRIPT FLUSH, a restart);
and how long an append waits for others to travel with it.

The appends that ran before the flush stored their events; only the ones Redis
answered NOSCRIPT may be sent again, once, or each would be stored twice.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import hiredis
import pytest
import redis.asyncio as redis

from broker import NewEvent, StoreUnavailable
from broker import constants as c
from broker.ids import format_stream_id
from broker.redis_open import open_store
from broker.redis_raw import RawConnection
from broker.redis_store import RedisStreamStore
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer

Exchange = Callable[[RawConnection, list[bytes]], Awaitable[list[Any]]]


def appends_in(commands: list[bytes]) -> list[bytes]:
    """The EVALSHA commands among the packed commands the append pipeline sends."""
    return [each for each in commands if b"EVALSHA" in each]


@pytest.fixture
async def admin(private_redis: RedisServer) -> AsyncIterator[redis.Redis]:
    """A connection of the test's own, to flush scripts and look at what was stored."""
    client = redis.Redis.from_url(private_redis.url)
    yield client
    await client.aclose()


@pytest.fixture
async def store(private_redis: RedisServer) -> AsyncIterator[RedisStreamStore]:
    instance = open_store(private_redis.url)
    await instance.append(f"warm-{uuid.uuid4().hex[:8]}", [NewEvent("x")])  # script loaded
    yield instance
    await instance.close()


async def test_a_script_flush_mid_pipeline_stores_each_append_once(
    store: RedisStreamStore, admin: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first append of a batch runs, then Redis loses its scripts before the others."""
    topics = [f"ns-{uuid.uuid4().hex[:8]}-{n}" for n in range(3)]
    original: Exchange = RawConnection.exchange_each
    batches: list[int] = []

    async def send_with_a_flush_after_the_first(
        self: RawConnection, commands: list[bytes]
    ) -> list[Any]:
        appends = appends_in(commands)
        batches.append(len(appends))
        if len(batches) > 1 or len(appends) < 3:  # only the batch under test, only once
            return await original(self, commands)
        first, *rest = commands
        replies = await original(self, [first])

        async def first_stored() -> bool:
            return bool(await admin.xlen(c.log_key(topics[0])))

        await await_until(first_stored, timeout=5, what="the first append ran", interval=0.005)
        await admin.script_flush()
        return replies + await original(self, rest)

    monkeypatch.setattr(RawConnection, "exchange_each", send_with_a_flush_after_the_first)
    async with asyncio.timeout(10):
        results = await asyncio.gather(
            *(store.append(t, [NewEvent(f"e{n}")]) for n, t in enumerate(topics))
        )
    monkeypatch.undo()

    assert batches[0] == 3, "the three appends did not travel as one batch"
    for topic, result, n in zip(topics, results, range(3), strict=True):
        stored: Any = await admin.xrange(c.log_key(topic))
        assert len(stored) == 1, f"{topic}: stored {len(stored)} times"
        assert stored[0][1][c.FIELD_DATA] == f"e{n}".encode()
        assert [format_stream_id(i.position) for i in result.ids] == [stored[0][0].decode()]


async def test_a_connection_lost_mid_batch_fails_only_the_appends_it_did_not_answer(
    store: RedisStreamStore, admin: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis ran the first append of a batch and answered it, then the connection went
    (here: it is killed right after). The first publisher gets its ids; only the
    others fail (503: they were not run, and may be retried). Failing the first too
    would have a publisher without an Idempotency-Key store its event twice."""
    topics = [f"lost-{uuid.uuid4().hex[:8]}-{n}" for n in range(3)]
    original: Exchange = RawConnection.exchange_each
    killed: list[bool] = []

    async def kill_after_the_first(self: RawConnection, commands: list[bytes]) -> list[Any]:
        if killed or len(appends_in(commands)) < 3:  # only the batch under test, only once
            return await original(self, commands)
        killed.append(True)
        first, *rest = commands
        # Redis answers CLIENT KILL of the caller itself, then closes: what follows in
        # the same write is neither run nor answered.
        kill = hiredis.pack_command(("CLIENT", "KILL", "ID", str(self.client_id), "SKIPME", "no"))
        replies = await original(self, [first, kill, *rest])
        return [replies[0], *replies[2:]]

    monkeypatch.setattr(RawConnection, "exchange_each", kill_after_the_first)
    async with asyncio.timeout(10):
        results = await asyncio.gather(
            *(store.append(t, [NewEvent(f"e{n}")]) for n, t in enumerate(topics)),
            return_exceptions=True,
        )
    monkeypatch.undo()

    assert killed, "the three appends did not travel as one batch"
    first, *others = results
    assert not isinstance(first, BaseException), f"a stored append was told: {first!r}"
    stored: Any = await admin.xrange(c.log_key(topics[0]))
    assert [format_stream_id(i.position) for i in first.ids] == [stored[0][0].decode()]
    for topic, result in zip(topics[1:], others, strict=True):
        assert isinstance(result, StoreUnavailable), result
        assert await admin.xlen(c.log_key(topic)) == 0


async def test_a_script_lost_again_fails_the_append_instead_of_looping(
    store: RedisStreamStore, admin: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis keeps losing the script: the append fails (the publisher may retry), in bounds."""
    original: Exchange = RawConnection.exchange_each
    sends: list[int] = []

    async def flush_before_each_append(self: RawConnection, commands: list[bytes]) -> list[Any]:
        if appends_in(commands):
            sends.append(1)
            await admin.script_flush()
        return await original(self, commands)

    monkeypatch.setattr(RawConnection, "exchange_each", flush_before_each_append)
    topic = f"ns-{uuid.uuid4().hex[:8]}"
    with pytest.raises(StoreUnavailable, match="script"):
        async with asyncio.timeout(10):
            await store.append(topic, [NewEvent("1")])
    monkeypatch.undo()
    assert len(sends) == 2, "one send, one resend after reloading the script"
    assert await admin.xlen(c.log_key(topic)) == 0


# -- a streaming ingest's appends wait a moment for company -------------------------------


def count_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of appends in each write the pipeline makes, from now on."""
    original: Exchange = RawConnection.exchange_each
    batches: list[int] = []

    async def counted(self: RawConnection, commands: list[bytes]) -> list[Any]:
        batches.append(len(appends_in(commands)))
        return await original(self, commands)

    monkeypatch.setattr(RawConnection, "exchange_each", counted)
    return batches


async def test_streaming_appends_made_apart_travel_together(
    store: RedisStreamStore, admin: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(c, "STREAMING_APPEND_LINGER_MS", 500)
    batches = count_batches(monkeypatch)
    topics = [f"ln-{uuid.uuid4().hex[:8]}-{n}" for n in range(2)]
    async with asyncio.timeout(10):
        first = asyncio.ensure_future(store.append(topics[0], [NewEvent("a")], streaming=True))
        await asyncio.sleep(0.01)  # many turns of the loop later
        second = asyncio.ensure_future(store.append(topics[1], [NewEvent("b")], streaming=True))
        await asyncio.gather(first, second)
    assert batches == [2], "streaming appends made apart did not wait for each other"
    assert [await admin.xlen(c.log_key(t)) for t in topics] == [1, 1]


async def test_an_append_that_may_not_wait_takes_the_lingering_ones_along(
    store: RedisStreamStore, admin: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A POST's append goes at the end of its turn, with whatever lingers (here for 60 s)."""
    monkeypatch.setattr(c, "STREAMING_APPEND_LINGER_MS", 60_000)
    batches = count_batches(monkeypatch)
    topic = f"ln-{uuid.uuid4().hex[:8]}"
    async with asyncio.timeout(10):
        lingering = asyncio.ensure_future(store.append(topic, [NewEvent("1")], streaming=True))
        await asyncio.sleep(0.01)
        await store.append(topic, [NewEvent("2")])
        await lingering
    assert batches == [2]
    stored: Any = await admin.xrange(c.log_key(topic))
    assert [fields[c.FIELD_DATA] for _, fields in stored] == [b"1", b"2"]  # in order made


async def test_a_lone_streaming_append_is_sent_when_its_linger_ends(
    store: RedisStreamStore, admin: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = count_batches(monkeypatch)
    topic = f"ln-{uuid.uuid4().hex[:8]}"
    async with asyncio.timeout(10):
        await store.append(topic, [NewEvent("alone")], streaming=True)
        await store.append(topic, [NewEvent("again")], streaming=True)
    assert batches == [1, 1]
    assert await admin.xlen(c.log_key(topic)) == 2


@pytest.fixture
async def silent_redis() -> AsyncIterator[int]:
    """A port that accepts connections and never answers: a primary frozen mid-failover."""

    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # until the client goes

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    for writer in held:
        writer.close()
    await server.wait_closed()


async def test_a_connection_dropped_while_it_opens_fails_its_commands_as_a_connection_error(
    silent_redis: int,
) -> None:
    """``close`` while the connection opens (the primary watch drops connections while
    appends reconnect to a frozen primary): each waiting command gets a ConnectionError
    (the store's 503), not the opening's CancelledError, which ended a publish's request
    unanswered; nor does a later command get it, once the opener's own caller is gone."""
    pool = redis.ConnectionPool(host="127.0.0.1", port=silent_redis, socket_timeout=30)
    connection = RawConnection(pool)
    waiting = asyncio.ensure_future(connection.exchange_each([b"PING\r\n"]))
    await asyncio.sleep(0.2)  # (the handshake waits for an answer that never comes)
    await connection.close("the primary moved")
    with pytest.raises(redis.ConnectionError, match="dropped while it opened"):
        await waiting
    gone = asyncio.ensure_future(connection.exchange_each([b"PING\r\n"]))
    await asyncio.sleep(0.2)
    gone.cancel()  # the opener's own caller goes first
    await asyncio.sleep(0)
    await connection.close()
    later = asyncio.ensure_future(connection.exchange_each([b"PING\r\n"]))
    await asyncio.sleep(0.2)
    assert not later.done()  # opening anew, not failed with the old opening's cancel
    await connection.close()
    with pytest.raises(redis.ConnectionError):
        await later
    await pool.aclose()


class _PackedSpy:
    """Stands for the pipeline's packer, keeping each command it packed."""

    def __init__(self, packer: Any) -> None:
        self._packer = packer
        self.packed: list[bytes] = []

    def pack(self, command: Any) -> bytes:
        packed: bytes = self._packer.pack(command)
        self.packed.append(packed)
        return packed


@pytest.mark.parametrize(
    "maxlen", [3600, 1000], ids=["packed-as-the-kept-int", "packed-by-hiredis"]
)
async def test_a_float_idempotency_window_is_read_alike_however_it_is_packed(
    private_redis: RedisServer, admin: redis.Redis, maxlen: int
) -> None:
    """``idempotency_seconds=3600.0`` (typed int, not checked): after a maxlen of 3600 in
    the same command the packer sends the kept ``3600``, else hiredis' ``3600.0``. The
    append script reads both with ``tonumber``: the same window either way."""
    store = open_store(private_redis.url, retention_maxlen=maxlen, idempotency_seconds=3600.0)
    assert store._pipeline is not None
    spy = _PackedSpy(store._pipeline._packer)
    store._pipeline._packer = spy  # type: ignore[assignment]
    topic = f"t-{uuid.uuid4().hex[:12]}"
    try:
        result = await store.append(topic, [NewEvent(data="1")], idempotency_key="once")
        again = await store.append(topic, [NewEvent(data="1")], idempotency_key="once")
    finally:
        await store.close()
    [packed] = appends_in(spy.packed)[:1]
    assert (b"$6\r\n3600.0\r\n" in packed) is (maxlen != 3600), packed
    assert again.ids == result.ids and again.replayed
    window_ms = await admin.pttl(c.records_key(topic))
    assert 3_590_000 < window_ms <= 3_600_000, window_ms
