"""The store's Lua scripts (``broker/lua``), read from the package and registered on its
client: each runs by EVALSHA, its text at hand for when Redis has lost it (NOSCRIPT).

One script per step that must be atomic, each header saying why: ``append`` (an
append: idempotency, epoch, close, retention, TTL), ``keep_lines`` (an open ingest's
line records kept answering), ``state`` and ``range`` (what a log says of itself,
and a page of it, in one read), ``delete``; and ``probe``, the rights tried at start.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript


def _lua(name: str) -> str:
    return resources.files("broker").joinpath("lua", name).read_text()


@dataclass(frozen=True, slots=True)
class StoreScripts:
    """Each of ``broker/lua``'s scripts, registered on one client."""

    append: AsyncScript
    keep_lines: AsyncScript
    state: AsyncScript
    range: AsyncScript
    delete: AsyncScript
    probe: AsyncScript

    @classmethod
    def registered_on(cls, client: redis.Redis | RedisCluster) -> StoreScripts:
        def registered(name: str) -> AsyncScript:
            return client.register_script(_lua(f"{name}.lua"))

        return cls(
            append=registered("append"),
            keep_lines=registered("keep_lines"),
            state=registered("state"),
            range=registered("range"),
            delete=registered("delete"),
            probe=registered("probe"),
        )
