"""The live reader on a Redis Cluster: one connection per primary, polling.

An XREAD may name keys of one slot only, so a Cluster's live topics are not read
by blocking XREADs as one server's are (``redis_live.LiveReader``): each primary
is asked by a pipeline of non-blocking XREADs, one per slot, a node that fails or
hangs leaving only its own topics unread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any, NamedTuple

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster

from broker import constants as c
from broker.errors import StoreUnavailable
from broker.ids import StreamPosition, format_stream_id, parse_stream_id
from broker.model import LogEntry
from broker.observer import Observer
from broker.redis_options import REDIS_FAILURES
from broker.redis_slots import LiveRead, MigratingReads

log = logging.getLogger(__name__)

# A node that keeps failing while the others answer is logged this often at most
# (a poll runs every few ms while events flow); each failure is still counted.
_NODE_FAILURE_LOG_EVERY_S = 10.0
# The slot map is refreshed at most this often after such failures (s).
_REFRESH_EVERY_S = 1.0


_Reads = dict[LiveRead, dict[str, str]]
"""A node's live reads, each naming its keys and the positions after which to read."""
_Groups = dict[str, tuple[Any, _Reads]]
"""Each node's name: the node, and its reads."""


def _topics_of(slots: _Reads) -> list[str]:
    return [c.topic_of_key(key) for streams in slots.values() for key in streams]


class _NodeRead(NamedTuple):
    """A Cluster node's live read under way: its task, the slots (and positions) it
    asked, and when (loop time)."""

    task: asyncio.Task[Any]
    slots: _Reads
    asked_at: float


class ClusterLiveReader:
    """The live reader on a Redis Cluster: one connection per primary, polling.

    An XREAD may only name keys of one *slot* (CROSSSLOT otherwise), so one
    blocking XREAD per node is impossible, and one per slot would grow with the
    topics. Instead each primary gets one connection and one pipeline of
    non-blocking XREADs, one per slot, and all primaries are asked at once.
    While events flow it asks every ``CLUSTER_POLL_MIN_MS``; when nothing comes
    it backs off to ``CLUSTER_POLL_MAX_MS`` (the most a first event after a
    quiet spell waits).

    When no topic could be read (every node asked failed, or refused every
    slot), the read raises StoreUnavailable: the slot map is refreshed and the
    hub reads again from what it delivered. When some failed (a node, or one
    slot a node refused: migrating, moved) while others were read, what was
    read is returned (never dropped) and the failed topics are simply absent,
    so the hub reads them again from the same positions; each such failure is
    logged, counted as a ``live_read`` store error, and refreshes the slot map
    in the background (a failover or a migration's end moves the topics to the
    new owner at the next read), and the hub is told how long they went unread.
    A slot being migrated is no failure: its ``ASK`` and ``TRYAGAIN`` place its
    topics' reads anew (``MigratingReads``: key by key, a moved key asked of the
    importing node), read at the next poll, at once.
    """

    def __init__(
        self, cluster: RedisCluster, options: dict[str, Any], observer: Observer | None = None
    ) -> None:
        self._cluster = cluster
        self._options = options
        self._observer = observer or Observer()
        self._clients: dict[str, redis.Redis] = {}
        self._interrupted: asyncio.Event | None = None
        self._pause_ms = c.CLUSTER_POLL_MIN_MS
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at = -math.inf
        self._logged_at: dict[str, float] = {}  # node name -> when its failure was last logged
        self._unread_since: dict[str, float] = {}  # a failed node's topics -> since when
        self._unread_spells: dict[str, float] = {}  # topics read again -> how long not (ms)
        self._failing: set[str] = set()  # nodes whose read failed (in part) at the last poll
        # Each node's read under way, and the slots it asked: one node that hangs (a fork,
        # swapping, a lost path, SIGSTOP) held every node's topics until its socket timed
        # out (10 s, again and again until the cluster failed it over: 15-20 s of every
        # topic of the cluster stalled); it is waited for CLUSTER_NODE_POLL_S at most.
        self._in_flight: dict[str, _NodeRead] = {}
        self._migrating = MigratingReads(cluster)
        self._rerouted = False  # a migration moved some reads at the last poll
        self._owners: dict[str, str] = {}  # each key read -> its slot's node, at the last read

    async def open(self) -> None:
        """Nothing yet: a primary's connection opens with its first live topic."""

    async def read(
        self, positions: dict[str, StreamPosition], block_ms: int
    ) -> dict[str, list[LogEntry]]:
        streams = {c.log_key(t): format_stream_id(pos) for t, pos in positions.items()}
        groups = await self._group_by_node_and_slot(streams)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_ms / 1000
        interrupted = self._interrupted = asyncio.Event()
        while True:
            entries = await self._poll(groups)
            if entries:
                self._pause_ms = c.CLUSTER_POLL_MIN_MS
                return entries
            if interrupted.is_set() or loop.time() >= deadline:
                return {}
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(interrupted.wait(), self._pause_ms / 1000)
            if self._rerouted:  # (a migration's reads, placed anew: asked again soon)
                self._pause_ms = c.CLUSTER_POLL_MIN_MS
            else:
                self._pause_ms = min(self._pause_ms * 2, c.CLUSTER_POLL_MAX_MS)
            if self._failing or self._rerouted:
                # Some went unread (a node or a slot failed): ask where the refreshed slot
                # map says, not the old node again until the block time ends (a moved
                # slot's topic stalled 5 s while the others were quiet; review).
                groups = await self._group_by_node_and_slot(streams)

    async def _group_by_node_and_slot(self, streams: dict[str, str]) -> _Groups:
        """Each node's reads: one per slot; a migrating slot's, per key (MigratingReads)."""
        self._rerouted = False
        groups: _Groups = {}
        owners: dict[str, str] = {}
        try:
            if not self._cluster.nodes_manager.slots_cache:
                await self._cluster.initialize()
            for key, position in streams.items():
                owner = self._cluster.get_node_from_key(key)
                if owner is None:
                    raise StoreUnavailable(f"no cluster node serves {key}")
                owners[key] = owner.name
                node, read = self._migrating.place(key, self._cluster.keyslot(key), owner)
                reads = groups.setdefault(node.name, (node, {}))[1]
                reads.setdefault(read, {})[key] = position
        except REDIS_FAILURES as error:
            raise StoreUnavailable(f"cluster slot map unavailable: {error}") from error
        self._note_new_owners(owners)
        self._migrating.forget(streams, {read.slot for _, r in groups.values() for read in r})
        return groups

    def _note_new_owners(self, owners: dict[str, str]) -> None:
        """Topics whose slot another node serves than at the last read, with no failure
        of theirs seen: a primary froze a moment (its read not yet failed), its replica
        took over without the newest events, and another command's MOVED refreshed the
        slot map meanwhile. Read on at the new node from an entry it may lack, they are
        looked at again as a failed node's topics are (``take_unread_spells``: the hub
        checks that the log still holds what was read). A migration's end moves topics
        too: looked at for nothing then, one state read each. Only keys read at the last
        read are remembered: a topic read for the first time (or again) has no owner to
        compare with yet, and a failover just before its first read is left to the
        hub's check that entries follow in number."""
        now = asyncio.get_running_loop().time()
        for key, name in owners.items():
            if self._owners.get(key, name) != name:
                self._unread_since.setdefault(c.topic_of_key(key), now)
        self._owners = owners

    async def _poll(self, groups: _Groups) -> dict[str, list[LogEntry]]:
        polls, fresh = self._node_polls(groups)
        if fresh:  # (a read asked at a poll before is not waited for again)
            await asyncio.wait(fresh, timeout=c.CLUSTER_NODE_POLL_S)
        merged: dict[str, list[LogEntry]] = {}
        failed: dict[str, Exception] = {}  # topic -> why it went unread
        failures: dict[str, Exception] = {}  # node -> its (first) failure
        for name, slots, result in self._answers(polls, groups):
            if isinstance(result, Exception):  # the node: every topic of it
                failures[name] = result
                failed.update(dict.fromkeys(_topics_of(slots), result))
            elif isinstance(result, BaseException):
                raise result  # a cancellation, not a node's failure
            else:
                entries, refused = result
                merged.update(entries)
                unread = self._not_followed(name, slots, refused)
                failed.update(unread)
                if unread:
                    failures[name] = next(iter(unread.values()))
        if failed or self._unread_since:
            self._note_unread(groups, failed, merged)
        failing, self._failing = self._failing, set(failures)
        if not failed:
            return merged
        if not merged and len(failed) == sum(len(_topics_of(s)) for _, s in groups.values()):
            # Nothing read at all: the hub counts it, waits, and reads again.
            await self._refresh_now()
            failure = next(iter(failures.values()))
            raise StoreUnavailable(f"live read failed: {failure}") from failure
        for name, failure in failures.items():
            self._node_failed(name, failure, again=name in failing)
        return merged

    def _answers(
        self,
        polls: dict[str, _NodeRead],
        groups: _Groups,
    ) -> list[tuple[str, _Reads, Any]]:
        """Each node's answer (entries, or its failure), with the slots it asked. A node
        still reading is left out (its topics keep their positions) until its read has
        taken CLUSTER_NODE_STUCK_S: then it has failed (a TimeoutError), and its topics
        go unread as a failed node's do. (Taken for a failure at once, a node slower
        than a poll's wait was never delivered from: each late answer came as after a
        failure, and was checked against retention and dropped.)"""
        answers = []
        now = asyncio.get_running_loop().time()
        for name, read in polls.items():
            slots, poll = read.slots, read.task
            if not poll.done():
                if now - read.asked_at >= c.CLUSTER_NODE_STUCK_S:
                    answers.append((name, slots, _outcome(poll)))
                continue
            self._in_flight.pop(name, None)
            outcome = _outcome(poll)  # (read even when dropped: no exception unretrieved)
            if slots != groups[name][1]:
                # A read from a poll before, asked from other positions or of other
                # topics (the slot map moved, the hub went on): its entries could
                # repeat what was delivered since. Dropped: asked anew next poll.
                continue
            answers.append((name, slots, outcome))
        return answers

    def _not_followed(
        self, name: str, reads: _Reads, refused: dict[LiveRead, Exception]
    ) -> dict[str, Exception]:
        """The topics of the node's refused reads, with why, but for those a slot's
        migration sends elsewhere (ASK, TRYAGAIN): those are read there at once."""
        self._migrating.settle(name, reads, refused)
        unread: dict[str, Exception] = {}
        for read, error in refused.items():
            if self._migrating.follow(name, read, reads[read], error):
                self._rerouted = True
            else:
                unread.update(dict.fromkeys(map(c.topic_of_key, reads[read]), error))
        return unread

    def _node_polls(self, groups: _Groups) -> tuple[dict[str, _NodeRead], set[asyncio.Task[Any]]]:
        """Each node's read: a new one, or the one still under way from a poll before (a
        node that does not answer is not asked again on top of it); and the new ones."""
        loop = asyncio.get_running_loop()
        for name in [n for n, r in self._in_flight.items() if n not in groups and r.task.done()]:
            _outcome(self._in_flight.pop(name).task)  # (a node no longer asked: answer read)
        fresh = set()
        for name, (node, slots) in groups.items():
            if name not in self._in_flight:
                task = loop.create_task(self._poll_node(node, slots))
                self._in_flight[name] = _NodeRead(task, slots, loop.time())
                fresh.add(task)
        return {name: self._in_flight[name] for name in groups}, fresh

    def _note_unread(
        self,
        groups: _Groups,
        failed: dict[str, Exception],
        merged: dict[str, list[LogEntry]],
    ) -> None:
        """Which topics a failed node (or slot: migrating) left unread, and since when;
        once read with entries again, for how long (``take_unread_spells``: retention
        by age may have removed what they had not read meanwhile, which the hub
        checks). Topics no longer read are forgotten."""
        now = asyncio.get_running_loop().time()
        unread: dict[str, float] = {}
        for _, slots in groups.values():
            for topic in _topics_of(slots):
                since = self._unread_since.get(topic)
                if topic in failed:
                    unread[topic] = now if since is None else since
                elif since is not None and topic in merged:
                    self._unread_spells[topic] = (now - since) * 1000
                elif since is not None:
                    unread[topic] = since  # nothing new yet: checked when it comes
        self._unread_since = unread

    def take_unread_spells(self) -> dict[str, float]:
        """Topics read again by the last read after their node failed, with how long
        (ms) they went unread; each is told once."""
        spells, self._unread_spells = self._unread_spells, {}
        return spells

    def _node_failed(self, name: str, failure: Exception, *, again: bool) -> None:
        """A node (or a slot of it) failed while others answered: said (at most every
        ``_NODE_FAILURE_LOG_EVERY_S``), counted once a spell, and the slot map refreshed."""
        if not again:  # (the same spell, polled again: already counted)
            self._observer.store_error("live_read")
        now = asyncio.get_running_loop().time()
        if now - self._logged_at.get(name, -math.inf) >= _NODE_FAILURE_LOG_EVERY_S:
            self._logged_at[name] = now
            log.warning(
                "cluster: live read of node %s failed (its topics are read again): %s",
                name,
                failure,
            )
        self._start_refresh()

    async def _poll_node(
        self, node: Any, reads: _Reads
    ) -> tuple[dict[str, list[LogEntry]], dict[LiveRead, Exception]]:
        """The node's new entries, and the reads it refused (a slot migrating, or moved:
        ASK, MOVED, TRYAGAIN), with why: its other slots are read on (one refused read
        threw the node's whole answer away, and every topic of the node stalled while
        one slot moved). A read of an importing slot's key follows ``ASKING`` in the
        same write, on the same connection. Raises if the node fails."""
        client = self._clients.get(node.name)
        if client is None:
            client = redis.Redis(host=node.host, port=int(node.port), **self._options)
            self._clients[node.name] = client
        async with client.pipeline(transaction=False) as pipe:
            for read, streams in reads.items():
                if read.asking:
                    pipe.execute_command("ASKING")
                pipe.xread(streams, count=c.LIVE_READ_COUNT)  # type: ignore[arg-type]
            replies = iter(await pipe.execute(raise_on_error=False))
        entries: dict[str, list[LogEntry]] = {}
        refused: dict[LiveRead, Exception] = {}
        for read in reads:
            if read.asking:
                next(replies)  # (an ASKING refused: its XREAD is refused too, MOVED)
            reply = next(replies)
            if isinstance(reply, Exception):
                refused[read] = reply
                continue
            for key, items in reply or []:
                topic = c.topic_of_log_key(key)
                entries[topic] = [LogEntry(topic, parse_stream_id(i), f) for i, f in items]
        return entries, refused

    def _start_refresh(self) -> None:
        """Refresh the slot map in the background: the entries in hand go out first.

        One at a time and at most every ``_REFRESH_EVERY_S``: while events flow a
        poll runs every few milliseconds, and each would refresh again.
        """
        now = asyncio.get_running_loop().time()
        if (self._refresh and not self._refresh.done()) or now - self._refreshed_at < (
            _REFRESH_EVERY_S
        ):
            return
        self._refreshed_at = now
        self._refresh = asyncio.get_running_loop().create_task(self._refresh_slots())

    async def _refresh_now(self) -> None:
        """Refresh the slot map before going on (or wait for the refresh under way)."""
        if self._refresh is not None and not self._refresh.done():
            await asyncio.shield(self._refresh)
            return
        self._refreshed_at = asyncio.get_running_loop().time()
        await self._refresh_slots()

    async def _refresh_slots(self) -> None:
        try:
            await self._cluster.nodes_manager.initialize()
        except REDIS_FAILURES:
            log.warning("cluster: could not refresh the slot map yet")

    async def interrupt(self) -> bool:
        if self._interrupted is None:
            return False
        self._interrupted.set()
        return True

    async def close(self) -> None:
        for task in [self._refresh, *(read.task for read in self._in_flight.values())]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, *REDIS_FAILURES):
                    await task
        self._in_flight.clear()
        for client in self._clients.values():
            await client.aclose()


def _outcome(poll: asyncio.Task[Any]) -> Any:
    """A node's read: its answer, its failure, or (still under way) a TimeoutError."""
    if not poll.done():
        return TimeoutError(f"no answer in {c.CLUSTER_NODE_STUCK_S:g} s (asked again when it does)")
    if poll.cancelled():
        return asyncio.CancelledError()
    return poll.exception() or poll.result()
