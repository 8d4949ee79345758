"""Options of every Redis connection the store and its live reader open, in one place.

Both ``redis_store`` (commands) and ``redis_live`` (blocking reads) build their
connections from here, so neither imports the other for them.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from broker import constants as c

REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)
"""What a call to Redis raises when the store fails: redis-py's errors, the socket's,
and the Cluster client's ``RedisClusterException`` (not a ``RedisError``: raised when
no node answers, say; uncaught, it was a 500 and an EventSource that never came back)."""


def client_options() -> dict[str, Any]:
    """Options of every connection the store opens.

    No automatic retries: a retried append after a timeout could store twice.
    Callers retry with an Idempotency-Key; the live reader reconnects itself.
    """
    return {
        "socket_connect_timeout": 2.0,
        "socket_timeout": c.REDIS_REPLY_TIMEOUT_SECONDS,
        "retry": Retry(NoBackoff(), 0),
    } | keepalive_options()


def keepalive_options() -> dict[str, Any]:
    """TCP keepalives on every connection (see ``REDIS_KEEPALIVE``): a connection that
    a middlebox dropped in silence while it idled failed its next command after the
    5 s reply timeout, every command on it with it (audit)."""
    names = ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")  # (Linux's; macOS lacks the first)
    tuning = {
        getattr(socket, name): value
        for name, value in zip(names, c.REDIS_KEEPALIVE, strict=True)
        if hasattr(socket, name)
    }
    return {"socket_keepalive": True, "socket_keepalive_options": tuning}


def reader_options() -> dict[str, Any]:
    """A blocking XREAD must outlive its BLOCK time before the socket times out."""
    return client_options() | {"socket_timeout": c.LIVE_BLOCK_MS / 1000 + 5}


def pool_options(size: int) -> dict[str, Any]:
    """A command pool of ``size`` connections; a command waits this long for a free one."""
    return client_options() | {"max_connections": size, "timeout": c.REDIS_POOL_WAIT_SECONDS}


async def drop_idle_connections(client: Any) -> None:
    """After a connection failed, the pooled ones likely did too (Redis restarted):
    drop them now, so the first commands once Redis is back do not fail on them."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        with contextlib.suppress(*REDIS_FAILURES):
            await pool.disconnect(inuse_connections=False)
