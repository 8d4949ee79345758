"""The parts of redis-py (and hiredis) below their public API that the store relies on.

No server: each surface is checked for its shape (there, callable, async or
not, the parameters we pass). A redis-py upgrade that renames or reshapes one
fails here, naming it and the module that uses it, before it fails in
production as an AttributeError on the first reconnect or failover. The list
is kept in ``broker/redis_pools.py``'s docstring too.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Sized
from dataclasses import dataclass
from typing import Any, Literal

import hiredis
import pytest
import redis.asyncio as redis
from redis._parsers.base import BaseParser
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, NodesManager, RedisCluster
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    MaxConnectionsError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

POOLS = "broker/redis_pools.py"
STORE = "broker/redis_store.py"
SLOTS = "broker/redis_slots.py"
APPENDS = "broker/redis_append_pipeline.py"
LIVE = "broker/redis_live_cluster.py"
OPTIONS = "broker/redis_options.py"
OPEN = "broker/redis_open.py"
RAW = "broker/redis_raw.py"
LIVE_LINKS = "broker/redis_live_links.py (embedded store)"
PACKING = "broker/redis_packing.py"


@dataclass(frozen=True)
class Method:
    """``owner.name`` is a method, async or not, that accepts ``params`` by these names."""

    owner: type[Any]
    name: str
    kind: Literal["async", "sync"]
    used_in: str
    params: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.owner.__module__}.{self.owner.__qualname__}.{self.name}"


METHODS = [
    Method(BlockingConnectionPool, "get_connection", "async", POOLS),
    Method(BlockingConnectionPool, "release", "async", POOLS, ("connection",)),
    Method(BlockingConnectionPool, "make_connection", "sync", f"{POOLS}, {RAW}"),
    Method(BlockingConnectionPool, "disconnect", "async", OPTIONS, ("inuse_connections",)),
    Method(BlockingConnectionPool, "aclose", "async", POOLS),
    Method(AbstractConnection, "register_connect_callback", "sync", POOLS, ("callback",)),
    Method(AbstractConnection, "connect", "async", f"{POOLS}, {RAW}"),
    Method(AbstractConnection, "send_command", "async", RAW),
    Method(AbstractConnection, "read_response", "async", RAW),
    Method(redis.Redis, "set_response_callback", "sync", LIVE_LINKS, ("command", "callback")),
    Method(ClusterNode, "acquire_connection", "sync", POOLS),
    Method(ClusterNode, "release", "sync", POOLS, ("connection",)),
    Method(ClusterNode, "__init__", "sync", OPEN, ("host", "port", "max_connections")),
    Method(RedisCluster, "execute_command", "async", POOLS, ("args", "kwargs")),
    Method(RedisCluster, "initialize", "async", f"{POOLS}, {SLOTS}, {LIVE}"),
    Method(RedisCluster, "get_primaries", "sync", POOLS),
    Method(RedisCluster, "get_node_from_key", "sync", f"{SLOTS}, {LIVE}", ("key",)),
    Method(RedisCluster, "keyslot", "sync", LIVE, ("key",)),
    Method(NodesManager, "initialize", "async", f"{SLOTS}, {LIVE}"),
    Method(AsyncScript, "__call__", "async", STORE, ("keys", "args", "client")),
    Method(Pipeline, "execute", "async", f"{STORE}, {APPENDS}", ("raise_on_error",)),
    Method(Sentinel, "master_for", "sync", OPEN, ("service_name", "connection_pool_class")),
    Method(SentinelConnectionPool, "__init__", "sync", OPEN, ("service_name", "sentinel_manager")),
    Method(redis.Redis, "from_pool", "sync", OPEN, ("connection_pool",)),
]


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_a_method_the_store_calls_keeps_its_shape(method: Method) -> None:
    where = f"redis-py surface {method} (used by {method.used_in})"
    function = getattr(method.owner, method.name, None)
    assert callable(function), f"{where}: gone"
    is_async = inspect.iscoroutinefunction(function)
    assert is_async == (method.kind == "async"), f"{where}: no longer {method.kind}"
    accepted = inspect.signature(function).parameters
    missing = [name for name in method.params if name not in accepted]
    assert not missing, f"{where}: no parameter {missing}; it takes {list(accepted)}"


@pytest.fixture
async def pool() -> AsyncIterator[BlockingConnectionPool]:
    instance = BlockingConnectionPool(max_connections=3)  # opens nothing
    yield instance
    await instance.aclose()


async def test_a_blocking_pool_counts_its_connections_in_use(pool: BlockingConnectionPool) -> None:
    where = f"redis-py surface BlockingConnectionPool._in_use_connections (used by {POOLS})"
    in_use = getattr(pool, "_in_use_connections", None)
    assert isinstance(in_use, Sized), f"{where}: gone, or not a sized collection"
    assert len(in_use) == 0, f"{where}: not empty on a new pool"
    assert pool.max_connections == 3, f"BlockingConnectionPool.max_connections (used by {POOLS})"


async def test_a_blocking_pool_keeps_idle_connections_in_a_list(
    pool: BlockingConnectionPool,
) -> None:
    """FixedPool's fast path hands out ``_available_connections[-1]`` itself (as the
    library's ``get_available_connection`` pops it), moves it to the in-use set, and
    takes the library's path while ``_in_maintenance``."""
    where = f"redis-py surface BlockingConnectionPool (used by {POOLS}'s fast path)"
    assert isinstance(getattr(pool, "_available_connections", None), list), f"{where}: idle list"
    assert isinstance(getattr(pool, "_in_use_connections", None), set), f"{where}: in-use set"
    assert getattr(pool, "_in_maintenance", None) is False, f"{where}: _in_maintenance"
    connection = pool.get_available_connection()  # type: ignore[no-untyped-call]
    assert connection in pool._in_use_connections, f"{where}: in-use after a take"
    await pool.release(connection)
    assert pool._available_connections == [connection], f"{where}: idle after release"


async def test_a_connection_shows_its_reader_and_state(pool: BlockingConnectionPool) -> None:
    """What the fast path checks before reusing an idle connection: connected, its
    ``asyncio.StreamReader`` (``_reader``: at EOF, or with unread bytes in ``_buffer``),
    and ``should_reconnect()``."""
    connection = pool.make_connection()  # type: ignore[no-untyped-call]
    where = f"redis-py surface AbstractConnection (used by {POOLS}'s fast path)"
    assert connection.is_connected is False, f"{where}: is_connected (a property)"
    assert connection._reader is None, f"{where}: _reader, None until connected"
    assert connection.should_reconnect() is False, f"{where}: should_reconnect()"  # type: ignore[no-untyped-call]
    reader = asyncio.StreamReader()
    assert reader.at_eof() is False and isinstance(reader._buffer, bytearray), (  # type: ignore[attr-defined]
        f"asyncio.StreamReader._buffer (used by {POOLS}'s fast path): gone"
    )


async def test_a_new_connection_takes_connect_callbacks(pool: BlockingConnectionPool) -> None:
    connection = pool.make_connection()  # type: ignore[no-untyped-call]
    where = f"redis-py surface AbstractConnection (used by {POOLS})"
    assert isinstance(connection, AbstractConnection), f"{where}: make_connection returns that"
    # A bound method, as FixedPool's: redis-py keeps it by weak reference, and calls
    # what is still alive of its list at each (re)connect.
    connection.register_connect_callback(pool.__repr__)  # type: ignore[no-untyped-call]
    kept = [ref() for ref in getattr(connection, "_connect_callbacks", [])]
    assert pool.__repr__ in kept, f"{where}: register_connect_callback did not keep it"


async def test_a_cluster_node_bounds_its_connections() -> None:
    node = ClusterNode("127.0.0.1", 6379, max_connections=2)  # opens nothing
    where = f"redis-py surface ClusterNode (used by {POOLS}, {LIVE})"
    try:
        assert node.max_connections == 2, f"{where}: max_connections"
        assert (node.name, node.host, node.port) == ("127.0.0.1:6379", "127.0.0.1", 6379), where
        held = [node.acquire_connection(), node.acquire_connection()]
        with pytest.raises(MaxConnectionsError):  # what open_cluster_pools stops on
            node.acquire_connection()
        for connection in held:
            node.release(connection)
    finally:
        await node.disconnect()


async def test_a_cluster_client_keeps_its_slot_map_in_its_nodes_manager() -> None:
    cluster = RedisCluster(host="127.0.0.1", port=6379)  # connects on first use only
    where = f"redis-py surface RedisCluster.nodes_manager.slots_cache (used by {SLOTS}, {LIVE})"
    try:
        manager = getattr(cluster, "nodes_manager", None)
        assert isinstance(manager, NodesManager), f"{where}: no nodes_manager"
        assert getattr(manager, "slots_cache", None) == {}, f"{where}: not an empty dict at first"
    finally:
        await cluster.aclose()


async def test_a_registered_script_knows_its_text_and_sha() -> None:
    client = redis.Redis()  # connects on first use only
    try:
        script = client.register_script("return 1")
    finally:
        await client.aclose()
    where = f"redis-py surface AsyncScript.sha / .script (used by {APPENDS})"
    assert isinstance(script, AsyncScript), where
    assert script.script == "return 1", where
    assert isinstance(script.sha, str) and len(script.sha) == 40, where


def test_a_lost_script_is_a_response_error_of_its_own() -> None:
    """The pipeline tells NOSCRIPT from other errors by type, read per command."""
    where = f"redis-py NoScriptError (used by {APPENDS})"
    assert issubclass(NoScriptError, ResponseError), where
    assert issubclass(MaxConnectionsError, RedisError), f"MaxConnectionsError (used by {POOLS})"


def test_hiredis_packs_a_pipeline() -> None:
    where = f"hiredis.pack_command (used by {PACKING}: the store's appends, the live reads)"
    command: tuple[Any, ...] = ("EVALSHA", "ab", 1, "k", 2)  # as the store builds them
    packed = hiredis.pack_command(command)
    assert packed == b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$1\r\nk\r\n$1\r\n2\r\n", where


async def test_a_connection_hands_over_its_streams(pool: BlockingConnectionPool) -> None:
    """The appends' connection takes a connected redis-py connection's socket: its
    ``_writer`` (an ``asyncio.StreamWriter``: the transport) and ``_reader`` (nothing
    may be unread in its ``_buffer``), both None until connected and once let go of,
    which is also what tells redis-py it holds no socket (no close, no warning)."""
    connection = pool.make_connection()  # type: ignore[no-untyped-call]
    where = f"redis-py surface AbstractConnection._writer/_reader (used by {RAW})"
    assert connection._writer is None and connection._reader is None, where
    assert connection.is_connected is False, f"{where}: is_connected follows them"


def test_an_error_reply_becomes_redis_py_s_exception() -> None:
    where = f"redis-py surface BaseParser.parse_error (used by {RAW})"
    noscript = BaseParser.parse_error("NOSCRIPT No matching script.")  # type: ignore[no-untyped-call]
    readonly = BaseParser.parse_error("READONLY You can't write against a read only replica.")  # type: ignore[no-untyped-call]
    other = BaseParser.parse_error("ERR value is not an integer")  # type: ignore[no-untyped-call]
    assert isinstance(noscript, NoScriptError), where
    assert isinstance(readonly, ReadOnlyError), where
    assert type(other) is ResponseError and "integer" in str(other), where


def test_hiredis_reads_replies_one_at_a_time() -> None:
    """``_Replies`` feeds what the socket brings and takes whole replies until False."""
    where = f"hiredis.Reader (used by {RAW})"
    reader = hiredis.Reader()
    reader.feed(b"-NOSCRIPT No matching script.\r\n+OK\r\n$3\r\nab")
    error = reader.gets()
    assert isinstance(error, hiredis.ReplyError) and str(error).startswith("NOSCRIPT"), where
    assert reader.gets() == b"OK", where
    assert reader.gets() is False, f"{where}: an incomplete reply"
    reader.feed(b"c\r\n")
    assert reader.gets() == b"abc", where


def test_refusals_that_stop_the_broker_at_start_and_those_that_do_not() -> None:
    """What waiting will not mend stops it; an outage, a load, a failover do not."""
    from redis import exceptions as e

    from broker.redis_checks import is_misconfiguration

    lasting = [
        e.AuthenticationError("WRONGPASS invalid username-password pair"),
        e.NoPermissionError("this user has no permissions to run the 'evalsha' command"),
        e.ReadOnlyError("You can't write against a read only replica."),
        e.ResponseError("DB index is out of range"),
        e.ResponseError("The user executing the script can't run this command or subcommand"),
    ]
    passing = [
        e.ConnectionError("Connection refused"),
        e.BusyLoadingError("Redis is loading the dataset in memory"),
        e.TimeoutError("Timeout reading from socket"),
        e.ResponseError("MASTERDOWN Link with MASTER is down"),
        e.TryAgainError("Multiple keys request during rehashing of slot"),
    ]
    assert all(is_misconfiguration(error) for error in lasting)
    assert not any(is_misconfiguration(error) for error in passing)
    readonly = e.ReadOnlyError("You can't write against a read only replica.")
    assert not is_misconfiguration(readonly, follows_primary=True)  # (a failover under way)


def test_a_cluster_node_sends_and_reads_on_a_connection_it_lends() -> None:
    """SlotCommands sends ASKING and the command in one write on one node connection."""
    where = "redis-py surface (used by broker/redis_slots.py)"
    for name in ("acquire_connection", "release", "parse_response"):
        assert callable(getattr(ClusterNode, name, None)), f"{where}: ClusterNode.{name}"
    assert inspect.iscoroutinefunction(ClusterNode.parse_response), where
    for name in ("pack_command", "pack_commands", "send_packed_command", "read_response"):
        assert callable(getattr(AbstractConnection, name, None)), f"{where}: connection.{name}"
    assert "nowait" in inspect.signature(AbstractConnection.disconnect).parameters, where
    assert {"host", "port"} <= set(inspect.signature(RedisCluster.get_node).parameters), where
    assert inspect.iscoroutinefunction(NodesManager.move_slot), f"{where}: move_slot"
    assert issubclass(MovedError, AskError), f"{where}: MOVED caught before ASK"
    assert issubclass(TryAgainError, ResponseError), where
