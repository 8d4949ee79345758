"""Options of every Redis connection the store and its live reader open, in one place.

Both ``redis_store`` (commands) and ``redis_live`` (blocking reads) build their
connections from here, so neither imports the other for them.
"""

from __future__ import annotations

import contextlib
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
    TCP keepalives after 30 s idle are redis-py's default on every TCP connection
    (a NAT or load balancer between keeps an idle flow; a path gone silent is found
    before a command waits on it): leaned on, not given here (a ``unix://``
    connection refuses the options), and pinned by test_redis_connections.py.
    """
    return {
        "socket_connect_timeout": 2.0,
        "socket_timeout": c.REDIS_REPLY_TIMEOUT_SECONDS,
        "retry": Retry(NoBackoff(), 0),
    }


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
