"""A failover that lost an ingest's newest lines, done by hand on one redis-server.

Replication is asynchronous: a replica promoted before it received the newest appends
holds the log as it was before them, its epoch unchanged. A script's writes replicate
whole, so what is lost is whole appends: here, undone exactly as ``broker/lua/append.lua``
wrote them, with a raw client (real Redis or the embedded store's fakeredis).
"""

from __future__ import annotations

from typing import Any

from broker import constants as c

META_WRITTEN = ("n", "keyless")
"""The meta's fields an ingest's appends write (``keyless``: one without a key)."""


class IngestAppends:
    """What an ingest's appends write beyond their entries and line records (append.lua:
    the meta's ``META_WRITTEN``, the ingest's head ``K\\n`` = ``top|since`` and highest
    line ``K\\nh`` = ``high|since``, and when it last wrote, in the lines' sorted set),
    read before some appends so that a failover can undo them. An ingest without an
    Idempotency-Key (``key`` None) writes its entries and the meta's fields only."""

    def __init__(
        self,
        topic: str,
        key: str | None,
        meta: list[bytes],
        head: list[bytes | None],
        at: float | None,
    ) -> None:
        self.topic, self.key = topic, key
        self.meta, self.head, self.high, self.at = meta, head[0], head[1], at

    @classmethod
    async def read(cls, client: Any, topic: str, key: str | None) -> IngestAppends:
        """``client``: a redis.asyncio client (or fakeredis's) of the topic's server. The
        topic's log must exist; the ingest may have stored no line yet (a failover that
        loses all of them leaves nothing of it)."""
        meta = await client.hmget(c.meta_key(topic), *META_WRITTEN)
        assert meta[0], "the topic has no log yet"
        if key is None:
            return cls(topic, key, meta, [None, None], None)
        head = await client.hmget(c.line_records_key(topic), f"{key}\n", f"{key}\nh")
        at = await client.zscore(c.line_times_key(topic), key)
        assert (head[0] is None) == (at is None), (head, at)
        return cls(topic, key, meta, head, at)

    async def lose_since(self, client: Any, lines: int) -> None:
        """The failover: the ``lines`` lines appended since (the log's newest entries,
        the ingest's lines ``top+1``..) are gone, and all else is as it was before them."""
        log, records = c.log_key(self.topic), c.line_records_key(self.topic)
        newest = await client.xrevrange(log, "+", "-", count=lines)
        assert len(newest) == lines, newest
        assert await client.xdel(log, *(entry_id for entry_id, _ in newest)) == lines
        meta = dict(zip(META_WRITTEN, self.meta, strict=True))
        await client.hset(c.meta_key(self.topic), mapping={f: v for f, v in meta.items() if v})
        unset = [field for field, value in meta.items() if not value]
        if unset:
            await client.hdel(c.meta_key(self.topic), *unset)
        if self.key is None:  # (no line records)
            return
        top = 0 if self.head is None else int(self.head.split(b"|")[0])
        numbers = range(top + 1, top + 1 + lines)
        assert await client.hdel(records, *(f"{self.key}\n{n}" for n in numbers)) == lines
        if self.head is None or self.at is None:  # (none of its lines had come)
            await client.hdel(records, f"{self.key}\n", f"{self.key}\nh")
            await client.zrem(c.line_times_key(self.topic), self.key)
        else:
            await client.hset(records, f"{self.key}\n", self.head)
            if self.high is None:  # (written by an older broker)
                await client.hdel(records, f"{self.key}\nh")
            else:
                await client.hset(records, f"{self.key}\nh", self.high)
            await client.zadd(c.line_times_key(self.topic), {self.key: self.at})
