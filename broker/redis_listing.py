"""Listing topics on Redis: a page of them, found by SCAN, then looked up by name.

A page walks the meta keys (``broker:{topic}:meta``) that start with the listing's
prefix, one SCAN step after another (on a Cluster, each primary in turn, by a
client of that node), then takes the names the caller may see that need no walk
(``listing.Listing``). The cursor a page hands back says where the next one goes
on. The embedded store (fakeredis) takes every key in one SCAN instead: its cursor
cannot be trusted between two pages (``TopicListing._names_in_order``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol, TypeVar, cast

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster

from broker import constants as c
from broker.listing import Listing, glob_escaped
from broker.model import LogState

T = TypeVar("T")
NodeClientFactory = Callable[[str, int], redis.Redis]
"""Opens a client of one Cluster node (host, port), for the listing's SCANs."""


class Guarded(Protocol):
    """The store's ``_call``: a command's reply, its failures made the broker's errors."""

    def __call__(self, command: Awaitable[T], /) -> Awaitable[T]: ...


EMBEDDED_SCAN_ALL = 2**31  # (a COUNT past every key: the whole keyspace in one call)


def _list_position(cursor: str | None) -> tuple[int, int, tuple[str, ...]]:
    """A listing cursor: the node, the SCAN cursor, and the topics the pages before
    showed of the SCAN step they ended in (or the name the page before ended on)."""
    node, _, rest = (cursor or "0:0").partition(":")
    position, _, shown = rest.partition(":")
    return int(node), int(position or 0), tuple(shown.split(",")) if shown else ()


def _inside_step(node_index: int, step: int, shown: Collection[str]) -> str:
    """The cursor of a page that ended inside SCAN step ``step``, having shown ``shown``
    of it (with the pages before: a topic name holds no comma)."""
    return f"{node_index}:{step}:{','.join(sorted(shown))}"


def _named_page(
    names: tuple[str, ...], after: str | None, room: int, shown: Callable[[str], bool], pass_: int
) -> tuple[list[str], str | None]:
    """The names after ``after`` a page has room for, and the cursor past them (pass
    ``pass_``). Looked up, not walked for: those with no log drop out of the page."""
    left = [name for name in names if (after is None or name > after) and shown(name)]
    page = left[: max(room, 0)]
    if len(left) <= len(page):
        return page, None
    return page, f"{pass_}:0:{page[-1]}" if page else f"{pass_}:0"


class TopicListing:
    """The topics of a listing, a page at a time, with their states (``list_topics``)."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        call: Guarded,
        state: Callable[[str], Awaitable[LogState]],
        open_node_client: NodeClientFactory,
        *,
        durable: bool,
    ) -> None:
        """``call`` and ``state``: the store's; ``durable``: False for the embedded store."""
        self._client = client
        self._call = call
        self._state = state
        self._open_node_client = open_node_client
        self._node_clients: dict[str, redis.Redis] = {}
        self._durable = durable

    async def list_topics(
        self,
        listing: Listing,
        cursor: str | None,
        limit: int,
        shown: Callable[[str], bool] = lambda _: True,
    ) -> tuple[list[tuple[str, LogState]], str | None]:
        """At most ``limit`` topics of ``listing`` that ``shown`` lets the caller see, with
        their states; and the cursor to go on from (None: done). Those starting with
        ``listing.prefix`` are found by SCAN (never KEYS), then ``listing.names`` are
        looked up by name.

        The cursor is ``<pass>:<scan cursor>``: a pass per node (a Cluster walks each
        primary in turn), then one past the last for the names; with ``:<topic>`` when
        the page ended inside a SCAN step (the next page takes that step again and goes
        on after that topic, the page's last, which the caller was shown) or among the
        names. SCAN's own promise holds: a topic there all along is listed, perhaps
        twice, never skipped; except on a Cluster whose primaries change between two
        pages, a failover or a resharding, as the node is named by its place among the
        primaries: README, API.
        """
        position = _list_position(cursor)
        last = position[2][-1] if position[2] else None
        if not self._durable:
            page, following = await self._names_in_order(listing, last, limit, shown)
            return await self._with_states(page), following
        nodes = self.scan_targets()
        walked: list[str] = []
        after = last if position[0] >= len(nodes) else None
        if listing.prefix is not None and position[0] < len(nodes):
            walked, following = await self._walked(nodes, listing.prefix, position, limit, shown)
            if following is not None:
                return await self._with_states(walked), following
        room = limit - len(walked)
        named, following = _named_page(listing.names, after, room, shown, len(nodes))
        return await self._with_states(walked + named), following

    async def _walked(
        self,
        nodes: list[Any],
        prefix: str,
        position: tuple[int, int, tuple[str, ...]],
        limit: int,
        shown: Callable[[str], bool],
    ) -> tuple[list[str], str | None]:
        """Up to ``limit`` topics starting with ``prefix`` that ``shown`` lets through, by
        at most LIST_SCAN_ROUNDS SCAN steps over the nodes from ``position``; and where
        the walk goes on (None: it is over).

        A step with more topics than the page has room for, even at COUNT 1 (one bucket
        of Redis's keyspace, at ``limit=1`` often), is split across pages: each takes it
        again and leaves out those the pages before showed of it, named in the cursor.
        By name, not by place: Redis rehashing its keyspace between two pages reorders a
        step, or moves keys into or out of it; by place, the page after went on past a
        topic it had never shown (a limit=1 listing skipped one in about 10 of 12
        topics). Taken again, the step is a SCAN call from a cursor SCAN returned, so its
        promise holds: what it no longer finds, a later step does."""
        node_index, scan_cursor, step_shown = position
        pattern = c.meta_key(glob_escaped(prefix) + "*")  # broker:{prefix*}:meta
        names: list[str] = []
        before = frozenset(step_shown)  # (of the step the walk starts in)
        # About twice the page's limit (a topic is two keys or more, and one SCAN step
        # should fit the page: it is not split), grown while steps find little.
        scan_count = min(c.LIST_SCAN_COUNT, max(2 * limit, c.LIST_SCAN_MIN_COUNT))
        for _ in range(c.LIST_SCAN_ROUNDS):
            if node_index >= len(nodes):
                break
            step = scan_cursor
            room = limit - len(names)
            scan_cursor, found, used = await self._scan_step(
                nodes[node_index], step, pattern, scan_count, room, shown, before
            )
            # The COUNT that fitted goes on (taken from the full one again each step, a
            # dense keyspace cost 10 times the calls; review), doubled back when a step
            # found little: a page's calls follow how densely its keys match.
            scan_count = used * 2 if len(found) * 4 < room else used
            scan_count = min(scan_count, c.LIST_SCAN_COUNT)
            if len(found) > room and names:
                return names, f"{node_index}:{step}"  # (the next page takes that step)
            if len(found) > room:  # (one SCAN step alone past the page's limit)
                if len(before) + room > c.LIST_STEP_SHOWN_MAX:  # (never seen: see the constant)
                    room = len(found)
                else:
                    return found[:room], _inside_step(node_index, step, before | set(found[:room]))
            names += found
            before = frozenset()
            if scan_cursor == 0:
                node_index, scan_cursor = node_index + 1, 0
            if len(names) >= limit:
                break
        return names, (f"{node_index}:{scan_cursor}" if node_index < len(nodes) else None)

    async def _scan_step(
        self,
        node: Any,
        step: int,
        pattern: str,
        count: int,
        room: int,
        shown: Callable[[str], bool],
        left_out: frozenset[str],
    ) -> tuple[int, list[str], int]:
        """One SCAN step from ``step``: its next cursor, the topics it found that
        ``shown`` lets through and ``left_out`` does not name, and the COUNT it took. A
        step that finds more than the page has ``room`` for is taken again from ``step``
        with a quarter of the COUNT, down to 1, so that the page can end where a step
        ends (and one that still finds too many is split across pages, ``_walked``):
        SCAN's promise holds from a cursor it returned."""
        while True:
            following, keys = await self._call(node.scan(step, match=pattern, count=count))
            found = [
                name
                for name in map(_topic_of_meta, keys)
                if name is not None and name not in left_out and shown(name)
            ]
            if len(found) <= room or count == 1:
                return following, found, count  # (count 1: split, or the page ends before it)
            count = max(count // 4, 1)

    async def _with_states(self, names: list[str]) -> list[tuple[str, LogState]]:
        states = await asyncio.gather(*(self._state(name) for name in names))
        return [(name, state) for name, state in zip(names, states, strict=True) if state.exists]

    async def _names_in_order(
        self, listing: Listing, after: str | None, limit: int, shown: Callable[[str], bool]
    ) -> tuple[list[str], str | None]:
        """The embedded store's page: the topics after ``after`` by name, from one SCAN
        that takes every key at once. fakeredis keeps a SCAN's place by its cursor
        number alone, the same numbers in every listing: another listing between two
        pages took this one's place, and expired keys moved it on, topics there all
        along skipped (not on Redis, whose cursor is a place in its hash table)."""
        topics = set(listing.names)
        if listing.prefix is not None:
            pattern = c.meta_key(glob_escaped(listing.prefix) + "*")
            _, keys = await self._call(self._client.scan(0, match=pattern, count=EMBEDDED_SCAN_ALL))
            topics.update(name for name in map(_topic_of_meta, cast(list[bytes], keys)) if name)
        ordered = sorted(name for name in topics if (after is None or name > after) and shown(name))
        if len(ordered) <= limit:
            return ordered, None
        page = ordered[:limit]
        return page, f"0:0:{page[-1]}"

    def scan_targets(self) -> list[Any]:
        """Where topics' keys live: the one server, or each Cluster primary."""
        if isinstance(self._client, RedisCluster):
            return [self._client_of(node) for node in self._primaries()]
        return [self._client]

    def _primaries(self) -> list[Any]:
        assert isinstance(self._client, RedisCluster)
        return sorted(self._client.get_primaries(), key=lambda node: node.name)

    def _client_of(self, node: Any) -> redis.Redis:
        """The client of one Cluster node, opened once and kept."""
        client = self._node_clients.get(node.name)
        if client is None:
            client = self._node_clients[node.name] = self._open_node_client(
                node.host, int(node.port)
            )
        return client

    async def close(self) -> None:
        for node_client in self._node_clients.values():
            await node_client.aclose()


def _topic_of_meta(key: bytes) -> str | None:
    """The topic whose meta key this is; None for another key that the pattern also
    matches (an idempotency record whose key ends in ``}:meta``)."""
    name = c.topic_of_key(key)
    return name if c.meta_key(name).encode() == key else None
