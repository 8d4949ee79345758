"""``RawConnection`` (``broker.redis_raw``: the appends' connection, and each live-read
lane's) against a real redis-server: replies matched to their commands in order whatever
happens to a caller, its client id known, and every way the connection can fail ends the
commands that wait, then gives way to a new one."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import hiredis
import pytest
import redis.asyncio as redis
from redis.exceptions import NoScriptError, ReadOnlyError, RedisError, ResponseError

from broker import NewEvent
from broker.redis_open import open_store
from broker.redis_raw import RawConnection
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer, free_port
from tests.support.tls import TlsFiles

TIMEOUT = 0.5


def packed(*command: str | int) -> bytes:
    return bytes(hiredis.pack_command(command))


@pytest.fixture
async def pool(private_redis: RedisServer) -> AsyncIterator[redis.ConnectionPool]:
    instance = redis.ConnectionPool.from_url(private_redis.url)
    yield instance
    await instance.aclose()


@pytest.fixture
async def raw(pool: redis.ConnectionPool) -> AsyncIterator[RawConnection]:
    connection = RawConnection(pool, timeout=TIMEOUT)
    yield connection
    await connection.close()


@pytest.fixture
async def admin(private_redis: RedisServer) -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(private_redis.url)
    yield client
    await client.aclose()


async def own_client_id(raw: RawConnection) -> int:
    """Its client id as Redis tells it, checked against the one it keeps (for CLIENT UNBLOCK)."""
    [client_id] = await raw.exchange([packed("CLIENT", "ID")])
    assert raw.client_id == int(client_id)
    return int(client_id)


async def test_a_batch_gets_each_reply_in_order_and_errors_as_values(
    raw: RawConnection,
) -> None:
    replies = await raw.exchange(
        [
            packed("SET", "k", "v"),
            packed("EVALSHA", "0" * 40, 0),
            packed("GET", "k"),
            packed("INCR", "k"),
            packed("PING"),
        ]
    )
    assert replies[0] == b"OK"
    assert isinstance(replies[1], NoScriptError)  # what the pipeline reloads the script on
    assert replies[2] == b"v"
    assert isinstance(replies[3], ResponseError) and "integer" in str(replies[3])
    assert replies[4] == b"PONG"


async def test_a_batch_cut_by_the_connection_keeps_the_replies_that_came(
    raw: RawConnection,
) -> None:
    """Redis closes the connection after its reply to CLIENT KILL of itself: the replies
    before stand (exchange_each: an append Redis ran is not told failed), the rest get
    the connection's failure; exchange raises it."""
    own = await own_client_id(raw)
    kill = packed("CLIENT", "KILL", "ID", own, "SKIPME", "no")
    replies = await raw.exchange_each([packed("PING"), kill, packed("PING"), packed("PING")])
    assert replies[:2] == [b"PONG", 1]
    assert all(isinstance(r, redis.ConnectionError) for r in replies[2:]), replies
    own = await own_client_id(raw)
    with pytest.raises(redis.ConnectionError):
        await raw.exchange([packed("CLIENT", "KILL", "ID", own, "SKIPME", "no"), packed("PING")])


async def test_an_empty_batch_leaves_the_next_ones_their_replies_and_deadlines(
    raw: RawConnection,
) -> None:
    """It was kept waiting for no reply: the next batch's replies counted against it, so
    that batch's deadline was never cancelled, and fired: the connection, sound, was
    dropped one timeout later."""
    first = await own_client_id(raw)
    assert await raw.exchange([]) == []
    assert await raw.exchange_each([]) == []
    assert await raw.exchange([packed("ECHO", "mine")]) == [b"mine"]
    await asyncio.sleep(TIMEOUT * 2)  # (past the deadline the batch had: it must be off)
    assert await own_client_id(raw) == first, "the connection was dropped"


async def test_a_caller_that_gives_up_does_not_shift_the_replies_of_the_next(
    raw: RawConnection,
) -> None:
    """Redis answers in order: the abandoned command's reply is dropped, not handed on."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(raw.exchange([packed("BLPOP", "nothing", "0.3")]), 0.05)
    assert await raw.exchange([packed("ECHO", "mine")]) == [b"mine"]


async def test_a_connection_redis_closed_is_replaced_on_the_next_batch(
    raw: RawConnection, admin: redis.Redis
) -> None:
    first = await own_client_id(raw)
    await admin.client_kill_filter(_id=first)

    def seen_broken() -> bool:
        replies = raw._replies
        return replies is not None and replies.broken

    await await_until(seen_broken, timeout=5, what="the killed connection seen as broken")
    assert await raw.exchange([packed("PING")]) == [b"PONG"], "the first after a kill"
    assert await own_client_id(raw) != first


async def test_replies_that_do_not_come_in_time_fail_the_batch_then_a_new_connection_serves(
    raw: RawConnection, private_redis: RedisServer
) -> None:
    first = await own_client_id(raw)
    assert private_redis.process is not None
    os.kill(private_redis.process.pid, signal.SIGSTOP)
    try:
        async with asyncio.timeout(TIMEOUT * 6):  # failed by the connection's own deadline
            with pytest.raises(RedisError, match="did not answer"):
                await raw.exchange([packed("PING"), packed("PING")])
    finally:
        os.kill(private_redis.process.pid, signal.SIGCONT)
    assert await raw.exchange([packed("PING")]) == [b"PONG"]
    assert await own_client_id(raw) != first


async def test_a_demoted_primary_is_left_for_a_new_connection(
    raw: RawConnection, admin: redis.Redis, redis_server: RedisServer
) -> None:
    """After a failover the old primary answers READONLY: the connection is dropped so
    that the next one asks again (through Sentinel, the new primary)."""
    first = await own_client_id(raw)
    await admin.execute_command("REPLICAOF", "127.0.0.1", str(redis_server.port))
    try:
        [refused] = await raw.exchange([packed("SET", "k", "v")])
        assert isinstance(refused, ReadOnlyError)
    finally:
        await admin.execute_command("REPLICAOF", "NO", "ONE")
    assert await raw.exchange([packed("SET", "k", "v")]) == [b"OK"]
    assert await own_client_id(raw) != first


async def test_a_redis_that_is_down_fails_the_batch_and_one_that_is_back_serves(
    raw: RawConnection, private_redis: RedisServer
) -> None:
    private_redis.stop()
    with pytest.raises(RedisError):
        await raw.exchange([packed("PING")])
    private_redis.start()
    assert await raw.exchange([packed("PING")]) == [b"PONG"]


async def test_appends_travel_over_tls_when_the_url_asks_for_it(tmp_path: Path) -> None:
    """``rediss://``: redis-py opens the connection with TLS, and the protocol that takes
    the socket over reads and writes through it (the URL names only the TLS port)."""
    files = TlsFiles.make(tmp_path)
    tls_port = free_port()
    server = RedisServer(extra_args=files.server_args(tls_port)).start()
    store = open_store(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={files.ca}")
    try:
        await store.open()
        results = await asyncio.gather(*(store.append("tls", [NewEvent(f"{n}")]) for n in range(5)))
        page = await store.read_range("tls", (0, 0), 10)
        assert [entry.id for entry in page.entries] == [r.ids[0] for r in results]
        replies = store._pipeline._connection._replies  # type: ignore[union-attr]
        assert replies is not None and replies._transport.get_extra_info("ssl_object"), (
            "the raw did not travel on the appends' own connection, over TLS"
        )
    finally:
        await store.close()
        server.close()


async def test_out_of_band_messages_of_resp3_are_not_taken_for_replies(
    private_redis: RedisServer, admin: redis.Redis
) -> None:
    """RESP3 (redis-py's default since 8; the URL says so here to be sure) has server
    pushes (here a client-tracking invalidation) arriving between replies: each reply
    must still go to its own command, on the same connection."""
    pool = redis.ConnectionPool.from_url(private_redis.url + "?protocol=3")
    raw = RawConnection(pool, timeout=TIMEOUT)
    try:
        await raw.exchange([packed("CLIENT", "TRACKING", "ON"), packed("GET", "tracked")])
        first = await own_client_id(raw)
        await admin.set("tracked", "changed")  # the server pushes an invalidation
        for _ in range(20):  # replies after the push, whenever it came
            assert await raw.exchange([packed("ECHO", "after")]) == [b"after"]
        assert await own_client_id(raw) == first, "the push broke the connection"
    finally:
        await raw.close()
        await pool.aclose()
