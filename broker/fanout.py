"""Fan-out inside one process: ONE live reader for every topic any subscriber follows.

The reader runs one blocking XREAD over all live topics and re-arms it when
topics come and go. Each entry it reads is framed once (``LogEntry.frame``) and
the same object is offered to every subscriber of its topic; a subscriber's
own task turns what piled up into one write. The reader never waits for a
subscriber: a full buffer is the subscriber's problem (it is dropped and
resumes from its Last-Event-ID).

Nothing one subscriber does reaches another: a subscriber that raises while
being handed entries is cut (its client resumes by id) and the rest of the
batch goes on (a topic's ``Feed``, which hands them: ``broker.live_feed``). A
reader that falls further behind than retention (a burst longer than ``maxlen``)
reads on past entries it never saw; it checks for that whenever the store says it
was possible, and sends its subscribers back to the log, where their cursors are
judged and a ``trimmed`` gap is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from broker import constants as c
from broker.errors import StoreUnavailable
from broker.expiry import ExpiryWatch
from broker.ids import StreamPosition
from broker.live_feed import Feed, LiveSubscriber
from broker.model import LiveBatch, LogEntry, LogState
from broker.observer import Observer
from broker.store import Store

log = logging.getLogger(__name__)


class Hub:
    """Reads every live topic of this process with one XREAD, and fans entries out."""

    def __init__(
        self,
        store: Store,
        *,
        block_ms: int = c.LIVE_BLOCK_MS,
        linger_ms: int = c.LIVE_LINGER_MS,
        observer: Observer | None = None,
    ) -> None:
        self._store = store
        self._block_ms = block_ms
        self._linger_s = linger_ms / 1000
        self._observer = observer or Observer()
        self._feeds: dict[str, Feed] = {}
        self._topics_changed = asyncio.Event()
        self._reading = False
        self._topics_version = 0  # bumped whenever a topic starts
        self._armed_version = 0  # the version the running read was armed with
        self._unvalidated: set[str] = set()  # topics to check after an outage
        # (those of them whose entries did not follow, in number, the last one read)
        self._numbers_broke: set[str] = set()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._wake_task: asyncio.Task[None] | None = None
        self._registrations = 0
        self._expiry = ExpiryWatch()
        self._read_returned_at = time.monotonic()  # the previous live read's return
        self._revalidating: dict[str, asyncio.Task[LogState]] = {}  # states asked after an outage
        self._revalidate_after = 0.0  # (monotonic) no new ask before, after a failed one
        self._outage_began = False  # the first asks after an outage are waited for, briefly

    @property
    def topic_count(self) -> int:
        return len(self._feeds)

    @property
    def subscriber_count(self) -> int:
        """Registrations: a subscription counts once per topic it follows."""
        return self._registrations

    def start(self) -> None:
        self._task = asyncio.create_task(self._read_forever(), name="broker-live-reader")

    async def close(self) -> None:
        """Stop the reader. Its blocking XREAD is unblocked first: redis-py may
        swallow a cancellation in the middle of a read and read on."""
        self._closing = True
        for asked in self._revalidating.values():
            asked.cancel()
        self._rearm()  # the wake-up that re-arms reads for new topics ends this one
        for task in (self._wake_task, self._task):
            if task is not None:
                if task is self._task:
                    task.cancel()  # the wake-up is left to finish; the reader need not
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(task, 2)

    async def attach(self, topic: str, subscriber: LiveSubscriber) -> None:
        """Start offering the topic's live entries to the subscriber.

        Returns once the reader knows where the topic's log ends, so every entry
        appended after this call returns reaches the subscriber.
        """
        while True:
            feed = self._feeds.get(topic)
            if feed is None:
                feed = self._feeds[topic] = Feed()
                await self._start_feed(topic, feed)
            else:
                try:
                    await asyncio.shield(feed.ready)
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if feed.ready.cancelled() and not (task is not None and task.cancelling()):
                        continue  # the subscriber making the feed was cancelled, not us
                    raise
            # While we waited, every subscriber of the feed may have left and the
            # feed been dropped: joining it then would wait forever for entries.
            if self._feeds.get(topic) is feed:
                if subscriber not in feed.subscribers:
                    feed.subscribers.add(subscriber)
                    self._registrations += 1
                    self._observer.live_changed(len(self._feeds), self._registrations)
                return

    async def _start_feed(self, topic: str, feed: Feed) -> None:
        try:
            state = await self._store.state(topic)
        except BaseException as error:
            del self._feeds[topic]
            if isinstance(error, asyncio.CancelledError):
                feed.ready.cancel()  # its own cancellation, not the others': they go on
            else:
                feed.ready.set_exception(error)
                feed.ready.exception()
            raise
        feed.epoch = state.epoch
        feed.position = state.last_issued
        feed.number = state.issued
        if state.expires_in_ms is not None:
            self._expiry.note(topic, time.monotonic(), state.expires_in_ms / 1000)
        feed.ready.set_result(None)
        self._rearm()

    def detach(self, topic: str, subscriber: LiveSubscriber) -> None:
        feed = self._feeds.get(topic)
        if feed is None or subscriber not in feed.subscribers:
            return
        feed.subscribers.discard(subscriber)
        self._registrations -= 1
        if not feed.subscribers and feed.ready.done():
            # The running XREAD may still name it; its entries are then dropped.
            del self._feeds[topic]
            self._expiry.forget(topic)
        self._observer.live_changed(len(self._feeds), self._registrations)

    def _rearm(self) -> None:
        self._topics_version += 1
        self._topics_changed.set()
        if self._wake_task is None or self._wake_task.done():
            self._wake_task = asyncio.create_task(self._interrupt_reader())

    async def _interrupt_reader(self) -> None:
        """Unblock the running XREAD so it is re-armed with the new topic.

        Topic changes are numbered; each read records the number it was armed
        with. We interrupt until the running read is armed with the latest one:
        the XREAD may not have reached Redis yet when we ask (then we ask again),
        and an interrupt may hit the read before it, while a topic came after the
        current one was armed (then we go on). Bounded: a read ends on its own.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._block_ms / 1000 + 1
        while self._reading and self._armed_version < self._topics_version:
            if loop.time() > deadline:
                return
            armed = self._armed_version
            if await self._store.interrupt_live_read():
                while self._reading and self._armed_version == armed and loop.time() < deadline:
                    await asyncio.sleep(0.001)  # until the reader has re-armed
            else:
                await asyncio.sleep(0.002)

    async def _read_forever(self) -> None:
        backoff = c.RECONNECT_BACKOFF_MIN
        # redis-py may turn the cancellation of a blocked read into a connection
        # error, so the loop also ends on its own flag, not only on CancelledError.
        while not self._closing:
            try:
                await self._read_once()
                backoff = c.RECONNECT_BACKOFF_MIN
            except StoreUnavailable as error:
                self._observer.store_error("live_read")
                log.warning("live reader: %s; retrying in %.2fs", error, backoff)
                self._unvalidated = {t for t, f in self._feeds.items() if f.ready.done()}
                self._outage_began, self._revalidate_after = True, 0.0
                for asked in self._revalidating.values():
                    asked.cancel()  # asked before this outage: asked again after it
                self._revalidating.clear()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, c.RECONNECT_BACKOFF_MAX)
            except Exception:
                log.exception("live reader failed; restarting it")
                await asyncio.sleep(backoff)

    async def _read_once(self) -> None:
        if self._unvalidated:
            await self._revalidate_feeds()
        await self._look_for_expired()
        positions = {
            t: f.position
            for t, f in self._feeds.items()
            if f.ready.done() and t not in self._unvalidated
        }
        self._armed_version = self._topics_version
        self._topics_changed.clear()
        if not positions:
            if self._unvalidated:
                # Topics whose state is still to be asked again (it failed, maybe
                # after the reader stopped waiting for it): nothing else will wake
                # the reader for them.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(c.REVALIDATE_RETRY_S):
                        await self._topics_changed.wait()
            else:
                await self._topics_changed.wait()
            return
        block_ms = self._block_ms
        if self._unvalidated:  # (their states are asked again between reads)
            block_ms = min(block_ms, int(c.REVALIDATE_RETRY_S * 1000))
        next_expiry = self._expiry.seconds_until_next(time.monotonic())
        if next_expiry is not None:
            block_ms = max(1, min(block_ms, int(next_expiry * 1000) + 1))
        self._reading = True
        try:
            batches = await self._store.read_live(positions, block_ms)
        finally:
            self._reading = False
        returned_at, self._read_returned_at = self._read_returned_at, time.monotonic()
        away_ms = (self._read_returned_at - returned_at) * 1000
        await self._check_trimmed_past(positions, batches, away_ms)
        self._dispatch(batches, positions)
        if batches and self._linger_s:
            # Under load, let events gather in Redis for a moment: the next read
            # returns them together, and each subscriber gets them in one write
            # (the socket write is most of a delivery's cost). When idle, the
            # first event still goes out at once: this only follows a dispatch.
            await asyncio.sleep(self._linger_s)

    def _dispatch(
        self, batches: dict[str, list[LogEntry]], armed: dict[str, StreamPosition]
    ) -> None:
        """Offer each topic's entries to its subscribers. ``armed``: where the read
        that returned them started, topic by topic."""
        policies = self._store.policies
        now = time.monotonic()
        delivered = 0  # counted once per read: a metric update per topic cost 1-2% of a token
        for topic, entries in batches.items():
            feed = self._feeds.get(topic)
            if feed is None or not entries:
                continue
            # A topic that did not exist is read from (0, 0): its new log from the start.
            from_origin = feed.epoch is None and armed.get(topic) == (0, 0)
            batch = LiveBatch(entries, from_origin=from_origin)
            feed.position = entries[-1].position
            feed.epoch = entries[-1].epoch
            feed.number = entries[-1].number
            if policies.expiring and (ttl_ms := policies.for_topic(topic).ttl_ms):
                self._expiry.note(topic, now, ttl_ms / 1000)  # an append moved its expiry
            delivered += feed.offer(topic, batch)
        if delivered:
            self._observer.delivered(delivered)

    async def _look_for_expired(self) -> None:
        """Topics that may have expired by now: tell the subscribers of those that did
        (they judge their cursors again: an ``unknown`` gap), never leave them waiting
        on a log that is gone. Those still there are looked at again when due."""
        topics = [t for t in self._expiry.due(time.monotonic()) if t in self._feeds]
        if not topics:
            return
        try:
            states = await asyncio.gather(*(self._store.state(t) for t in topics))
        except BaseException:
            # Due still: looked at again once the store answers (forgotten, a topic that
            # expired meanwhile left its subscribers waiting for good).
            now = time.monotonic()
            for topic in topics:
                self._expiry.note(topic, now, 0.0)
            raise
        now = time.monotonic()
        for topic, state in zip(topics, states, strict=True):
            feed = self._feeds.get(topic)
            if feed is None:
                continue
            if state.exists and state.expires_in_ms is not None:
                self._expiry.note(topic, now, state.expires_in_ms / 1000)
            elif not state.exists and feed.epoch is not None:
                log.info("topic %s expired", topic)
                feed.epoch, feed.position, feed.number = None, (0, 0), 0
                feed.reset_subscribers(topic)

    async def _check_trimmed_past(
        self,
        positions: dict[str, StreamPosition],
        batches: dict[str, list[LogEntry]],
        away_ms: float,
    ) -> None:
        """Before a read's entries are delivered: revalidate the topics whose entries do
        not follow what the reader read (or whose Cluster node failed meanwhile), and
        send a topic's subscribers back to the log if retention removed entries between
        where the reader was and what it read now, where numbers cannot tell (it fell
        that far behind, or was away ``away_ms`` since its previous read came back)."""
        unread = self._store.take_unread_spells()  # (a Cluster node failed a while)
        # Looked at again, as after an outage, before what this read returned of them
        # is delivered (it is read again from where its log says: delivered now, the
        # reader would have moved past the entry whose absence tells of a loss):
        # - topics whose Cluster node failed while the others answered (no outage was
        #   raised): the node that took over may hold another log of each, a shorter
        #   one, or one that lost what the reader read and was appended to since;
        # - topics whose entries do not follow, in number, the last one read: entries
        #   were removed between (retention, this instance's or another's with a
        #   smaller one), or the log lost what the reader read and went on (a failover
        #   while the reader's connection, idle between two reads, was reopened
        #   without an error: no outage was raised).
        follows = {
            topic: self._follows(topic, positions[topic], entries)
            for topic, entries in batches.items()
            if entries
        }  # (once per topic of the read: this runs for every live read)
        broken = {t for t in unread if t in self._feeds}
        numbers_broke = {topic for topic, follow in follows.items() if follow is False}
        self._numbers_broke |= numbers_broke
        broken |= numbers_broke
        self._unvalidated |= broken
        for topic in broken | unread.keys():
            batches.pop(topic, None)
        suspects = [
            topic
            for topic, entries in batches.items()
            if entries
            and follows[topic] is None
            and self._store.may_have_trimmed(
                topic, positions[topic], entries, away_ms + unread.get(topic, 0.0)
            )
        ]
        if not suspects:
            return
        states = await asyncio.gather(*(self._store.state(topic) for topic in suspects))
        for topic, state in zip(suspects, states, strict=True):
            feed = self._feeds.get(topic)
            if feed is None:
                continue
            # A log read from its start (it did not exist at the last read) is
            # offered to subscribers as such (LiveBatch.from_origin): what retention
            # removed before this first read must be told as well.
            new_log = feed.epoch is None and positions[topic] == (0, 0)
            if state.epoch != (batches[topic][-1].epoch if new_log else feed.epoch):
                continue  # another epoch: the entries themselves say so to subscribers
            if state.trimmed_through > positions[topic]:
                log.warning("topic %s: the live reader fell behind retention", topic)
                feed.reset_subscribers(topic)

    def _follows(self, topic: str, armed: StreamPosition, entries: list[LogEntry]) -> bool | None:
        """``Feed.follows`` of the topic's feed (None: no feed: no longer live)."""
        feed = self._feeds.get(topic)
        return None if feed is None else feed.follows(armed, entries)

    async def _revalidate_feeds(self) -> None:
        """After an outage: keep each topic's position if its log survived, else start over.

        Redis restarted with its data (AOF): same epoch, the reader goes on from
        the last entry it delivered, and live subscribers miss nothing. Restarted
        without it, or failed over to a replica that lacked the log: a new epoch
        (or none yet); subscribers are told, and each judges its own cursor.

        Every topic's state is asked at once. Those that answer within
        ``REVALIDATE_WAIT_S`` are read at once; a topic whose state has not answered
        (its Cluster node is still down: a connect timeout) is left out of reads until
        it does, then joins them, and one that failed is asked again after
        ``REVALIDATE_RETRY_S``: one lost node does not hold up every topic.
        """
        started = []
        if time.monotonic() >= self._revalidate_after:
            for topic in self._unvalidated - self._revalidating.keys():
                if topic in self._feeds:
                    started.append(self._ask_state(topic))
        self._unvalidated &= set(self._feeds) | self._revalidating.keys()
        self._numbers_broke &= self._unvalidated
        if not (started and self._outage_began):
            return  # asked again later: the answers join the reads as they come
        self._outage_began = False
        done, pending = await asyncio.wait(started, timeout=c.REVALIDATE_WAIT_S)
        failures = [e for t in done if not t.cancelled() and (e := t.exception()) is not None]
        if failures:
            self._revalidate_after = time.monotonic() + c.REVALIDATE_RETRY_S
            if len(failures) == len(done) and not pending:
                self._outage_began = True
                raise failures[0]  # nothing answered: back off as for any outage

    def _ask_state(self, topic: str) -> asyncio.Task[LogState]:
        feed = self._feeds[topic]
        if feed.epoch is not None and feed.position != (0, 0):
            # (and whether the log still holds what the reader read: lua/state.lua)
            asking = self._store.revalidate(topic, feed.epoch, feed.position, feed.number)
        else:
            asking = self._store.state(topic)
        asked = asyncio.ensure_future(asking)
        self._revalidating[topic] = asked
        asked.add_done_callback(lambda _: self._state_answered(topic, asked))
        return asked

    def _state_answered(self, topic: str, asked: asyncio.Task[LogState]) -> None:
        """A state asked after an outage: the topic is read again from where its log
        says (joining the running read if it answered late); or asked again later."""
        if self._revalidating.get(topic) is asked:
            del self._revalidating[topic]
        if asked.cancelled():
            return
        if asked.exception() is not None:
            self._revalidate_after = time.monotonic() + c.REVALIDATE_RETRY_S
            return
        feed = self._feeds.get(topic)  # (None: its last subscriber left meanwhile)
        if feed is None or topic not in self._unvalidated:
            return
        self._unvalidated.discard(topic)
        self._revalidate_feed(topic, feed, asked.result())
        self._rearm()  # the running read (or the wait for a topic to read) must name it

    def _revalidate_feed(self, topic: str, feed: Feed, state: LogState) -> None:
        numbers_broke = topic in self._numbers_broke
        self._numbers_broke.discard(topic)
        if state.epoch == feed.epoch:
            # AOF everysec may have lost the last second: read on from what is there.
            if state.lost_after is not None:
                # The log no longer holds what the reader read (the revalidation recorded
                # the loss for clients that were away, even if the log was appended to
                # since). Its subscribers saw events that are gone: each judges its cursor
                # again now (an "unknown" gap), before new ones, whose ids may fall at or
                # before what they saw (a new primary whose clock lags), would be skipped
                # as seen.
                log.warning("topic %s: its log lost events the live reader had read", topic)
                feed.position, feed.number = state.lost_after, None
                feed.reset_subscribers(topic)
                return
            if state.trimmed_through > feed.position:
                # Retention (by age: any read of the state trims; or another instance's)
                # removed entries the reader had not read yet: its subscribers judge
                # their cursors again, and the reader reads on from what is left (from
                # where it was, it would find them missing again).
                log.warning("topic %s: retention trimmed past the live reader", topic)
                feed.position, feed.number = state.trimmed_through, None
                feed.reset_subscribers(topic)
            elif numbers_broke:
                # Its log holds what it read and retention removed nothing after it,
                # yet the next entry does not follow: another instance's reader found
                # that the log lost entries this one never read (its primary changed
                # first: a failover), recorded where, and numbered on past them
                # (lua/state.lua). Its subscribers judge their cursors again: a replay
                # tells them there. The reader reads on from where it is with no number:
                # the next entries it reads are judged by retention's bounds alone
                # (_follows: None), and set the number the ones after them must follow.
                log.warning("topic %s: its log lost events another instance read", topic)
                feed.number = None
                feed.reset_subscribers(topic)
            return
        log.warning("topic %s: its log changed under the live reader", topic)
        feed.epoch = state.epoch
        feed.position = state.last_issued
        feed.number = state.issued
        feed.reset_subscribers(topic)
