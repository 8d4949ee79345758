"""The broker: publish into topic logs, subscribe with resume, read history.

This is the one object the HTTP edge talks to. It owns the store and the
process's fan-out hub, and takes plain arguments: configuration is read at the
edge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from broker import constants as c
from broker.errors import StoreUnavailable, TopicNotFound
from broker.fanout import Hub
from broker.health import StoreHealth
from broker.heartbeat import HeartbeatClock
from broker.ids import EventId, StreamPosition
from broker.listing import listing_for
from broker.model import AppendResult, IngestLines, LogEntry, LogState, NewEvent
from broker.observer import Observer
from broker.origins import refresh_tick_s
from broker.resume import Gap, earliest_point, resume_point
from broker.sink import StreamSink
from broker.store import Store
from broker.subscription import Subscription
from broker.subscription_replay import StartFrom
from broker.validation import check_idempotency_key, check_topic

log = logging.getLogger(__name__)
HISTORY_READ_ATTEMPTS = 3
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BrokerLimits:
    """Per-subscriber limits; retention and idempotency belong to the store."""

    subscriber_buffer_bytes: int = c.DEFAULT_SUBSCRIBER_BUFFER_BYTES
    heartbeat_seconds: float = c.DEFAULT_HEARTBEAT_SECONDS


@dataclass(frozen=True, slots=True)
class TopicInfo:
    topic: str
    length: int
    first_id: EventId | None
    last_id: EventId | None
    closed: bool


def _info(topic: str, state: LogState) -> TopicInfo:
    """``last_id``: the newest id the log issued, even if retention removed it since. A
    log that retention emptied said null, and a client that took null for "no event
    yet" and resumed such a topic from the origin was told ``trimmed`` of events it
    never asked for (review); after its newest id, it is told nothing."""
    newest = state.last_issued
    return TopicInfo(
        topic=topic,
        length=state.length,
        first_id=state.event_id(state.first) if state.first else None,
        last_id=state.event_id(newest) if newest != (0, 0) else None,
        closed=state.end is not None,
    )


@dataclass(frozen=True, slots=True)
class HistoryPage:
    events: list[LogEntry]
    next: EventId | None
    gap: Gap | None


class Broker:
    """Topics as resumable event logs, over one store and one fan-out hub."""

    def __init__(
        self,
        store: Store,
        *,
        limits: BrokerLimits | None = None,
        observer: Observer | None = None,
        live_block_ms: int = c.LIVE_BLOCK_MS,
    ) -> None:
        self.store = store
        self.limits = limits or BrokerLimits()
        self.observer = observer or Observer()
        self.hub = Hub(store, block_ms=live_block_ms, observer=self.observer)
        self.heartbeats = HeartbeatClock(
            self.limits.heartbeat_seconds, origins_tick_s=refresh_tick_s(store.policies)
        )
        self.health = StoreHealth()

    async def start(self) -> None:
        if not self.store.durable:
            log.warning(
                "store: %s: single instance, NOT durable, events are lost on exit",
                self.store.description,
            )
        else:
            log.info("store: %s", self.store.description)
        await self.store.open()
        self.hub.start()

    async def close(self) -> None:
        await self.heartbeats.close()
        await self.hub.close()
        await self.store.close()

    async def publish(
        self,
        topic: str,
        events: Sequence[NewEvent],
        *,
        idempotency_key: str | None = None,
        lines: IngestLines | None = None,
        close: bool = False,
        streaming: bool = False,
        log_epoch: str | None = None,
        after_entry: StreamPosition | None = None,
    ) -> AppendResult:
        """Append one event or a batch, atomically and in order; then close the topic
        if asked. ``lines``: an idempotency record per event (a streaming ingest's
        lines); ``streaming``, ``log_epoch``, ``after_entry``: a streaming ingest's (see
        ``Store.append``)."""
        check_topic(topic)
        check_idempotency_key(idempotency_key)
        started = time.perf_counter()
        try:
            result = await self.store.append(
                topic,
                events,
                idempotency_key=idempotency_key,
                lines=lines,
                close=close,
                streaming=streaming,
                log_epoch=log_epoch,
                after_entry=after_entry,
            )
        except StoreUnavailable as error:  # (``_told``, inline: the hottest call)
            self.observer.store_error("append")
            self.health.failed("publish", error)
            raise
        if self.health.failing_since is not None:
            self.health.answered()
        self.observer.store_latency("append", time.perf_counter() - started)
        self.observer.published(len(result.ids), replayed=result.replayed)
        return result

    async def close_topic(self, topic: str) -> AppendResult:
        """Close the topic: its log ends with ``broker.end``; closing again answers the same."""
        return await self.publish(topic, [], close=True)

    async def delete_topic(self, topic: str) -> bool:
        """Delete the topic now; its live streams get a ``deleted`` gap and end."""
        check_topic(topic)
        return await self._told("delete", self.store.delete(topic))

    async def list_topics(
        self,
        prefix: str,
        cursor: str | None,
        limit: int,
        shown: Callable[[str], bool] = lambda _: True,
        patterns: Iterable[str] | None = None,
    ) -> tuple[list[TopicInfo], str | None]:
        """A page of existing topics whose names start with ``prefix``, of those the
        caller may see (``shown``: neither the page nor its cursor names another).

        ``patterns``: what ``shown`` can let through (``*``: any run of characters;
        None: anything), so that the store looks only where those topics can be: a
        caller who may see nothing costs Redis nothing (an anonymous listing walked
        every key for an empty answer, 400 SCANs over 200,000 topics)."""
        listing = listing_for(prefix, patterns)
        if listing.empty:
            return [], None
        found, following = await self._told(
            "list", self.store.list_topics(listing, cursor, limit, shown)
        )
        return [_info(topic, state) for topic, state in found], following

    async def subscribe(
        self,
        starts: dict[str, StartFrom],
        *,
        sink: StreamSink | None = None,
        expires_at: float | None = None,
        trusted: Callable[[], bool] | None = None,
        positions: bool = False,
        beat_events: bool = False,
    ) -> Subscription:
        """An open subscription: iterate ``chunks()``, and ``close()`` it when done.

        ``sink`` is the client's connection, for edges that let the live reader write
        to it directly (see ``Subscription``); ``expires_at`` (unix time) ends the
        stream then, from the heartbeat clock (within a third of its interval), and
        so does ``trusted()`` turning false (its credentials were revoked);
        ``positions``: where the stream stands goes as ``broker.position`` events;
        ``beat_events``: its heartbeats go as ``broker.beat`` events, not comments.
        """
        for topic in starts:
            check_topic(topic)
        subscription = Subscription(
            self.store,
            self.hub,
            starts,
            sink=sink,
            buffer_bytes=self.limits.subscriber_buffer_bytes,
            heartbeats=self.heartbeats,
            observer=self.observer,
            expires_at=expires_at,
            trusted=trusted,
            positions=positions,
            beat_events=beat_events,
        )
        await self._told("subscribe", subscription.open())
        return subscription

    async def history(self, topic: str, after: EventId | None, limit: int) -> HistoryPage:
        """A page of retained events after ``after`` (from the oldest when None)."""
        check_topic(topic)
        return await self._told("history", self._history(topic, after, limit))

    async def _history(self, topic: str, after: EventId | None, limit: int) -> HistoryPage:
        for _ in range(HISTORY_READ_ATTEMPTS):
            state = await self.store.state(topic)
            ttl_ms = self.store.policies.for_topic(topic).ttl_ms
            position, gap = (
                resume_point(after, state, ttl_ms=ttl_ms)
                if after
                else (earliest_point(state), None)
            )
            page = await self.store.read_range(topic, position.stream_after, limit)
            if page.trimmed_through <= position.stream_after and page.epoch == state.epoch:
                break
            # Trimmed (or recreated) between the two reads: judge the cursor again.
        else:
            gap = Gap("trimmed", after or position, None)  # racing retention still: say so
        if gap is None and page.lost(position.stream_after):
            gap = Gap("unknown", position, position)  # as a stream says it (Subscription)
        entries = page.entries
        following = entries[-1].id if len(entries) == limit or page.cut_short else None
        # Where the log lost events after some of these (a failover): the page stops at
        # the first such place; the next one begins with the gap.
        losses = page.losses_passed(position.stream_after)
        while losses and not any(entry.position <= losses[0] for entry in entries):
            gap = gap or Gap("unknown", position, position)  # this page begins past it
            losses.pop(0)
        if losses:
            entries = [entry for entry in entries if entry.position <= losses[0]]
            following = entries[-1].id
        elif following is None:
            # The log's end: lost events after its last one, with nothing since, are
            # told as they would be past it (this page stops there, the next says so).
            at = entries[-1].position if entries else position.stream_after
            if page.losses_ahead(at):
                if entries:
                    following = entries[-1].id
                else:
                    gap = gap or Gap("unknown", position, position)
        return HistoryPage(events=entries, next=following, gap=gap)

    async def topic_info(self, topic: str) -> TopicInfo:
        check_topic(topic)
        state = await self._told("topic_info", self.store.state(topic))
        if not state.exists:
            raise TopicNotFound(topic)
        return _info(topic, state)

    async def _told(self, operation: str, work: Awaitable[T]) -> T:
        """``work``'s result; a store failure counted (``broker_store_errors_total``) and
        said in the log (``StoreHealth``), as a publish's is."""
        try:
            result = await work
        except StoreUnavailable as error:
            self.observer.store_error(operation)
            self.health.failed(operation, error)
            raise
        if self.health.failing_since is not None:
            self.health.answered()
        return result

    async def ready(self) -> bool:
        """Whether the store answers a PING within a second: a probe's own timeout is
        often one second (Kubernetes'), and a Redis that went silent took the reply
        timeout, 5 s, to be called down (audit)."""
        try:
            async with asyncio.timeout(c.READY_PING_TIMEOUT_S):
                await self.store.ping()
        except (StoreUnavailable, TimeoutError):
            return False
        return True
