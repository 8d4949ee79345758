"""What the heartbeat clock does to a subscription, on each of its ticks.

One clock serves every open stream of a process (``broker.heartbeat``), so no
stream holds a timer. On its tick a subscription beats straight to the socket
when a beat is due and its consumer is parked or waits on the store holding no
frame (a replay's page, a state read: a stalled store would hold it silent), else
it wakes the consumer, which beats; ends when its credentials expired or were
revoked; is dropped when its client stopped reading a burst it was handed whole;
and, more often when topics expire sooner, looks whether an origin its client holds
is due to be sent a later one (``broker.origins``).
"""

from __future__ import annotations

from collections.abc import Callable

from broker.heartbeat import HeartbeatClock
from broker.sink import StreamSink
from broker.subscription_replay import CatchUp


class ClockCalls(CatchUp):
    """The part of a ``Subscription`` the heartbeat clock calls: ``beat_if_due`` and
    ``look_at_origins``.

    A mixin over ``CatchUp`` (one chain of bases: two bases holding slots could not
    be combined): the state it reads is in its slots, ``CatchUp``'s and
    ``Subscription``'s, set by ``Subscription.__init__``.
    """

    __slots__ = ("_backlog_at_tick", "_ends_at", "_last_beat", "_trusted")
    # (their types; ``Subscription.__init__`` sets them)
    _trusted: Callable[[], bool] | None
    _ends_at: float | None
    _last_beat: float
    _backlog_at_tick: int | None
    _dropped: bool
    _consumer_idle: bool
    _pending_bytes: int
    _sink: StreamSink
    _heartbeats: HeartbeatClock

    def expire(self) -> None:
        """End the stream now (``Subscription``'s)."""
        raise NotImplementedError

    def abandon(self) -> None:
        """Cut its connection, so that its client resumes (``Subscription``'s)."""
        raise NotImplementedError

    def _overflow(self) -> None:
        """Drop it, or forget what is queued while catching up (``Subscription``'s)."""
        raise NotImplementedError

    def _wake(self, woken: bool) -> None:
        """Get the idle consumer going (``Subscription``'s)."""
        raise NotImplementedError

    def _parked_live(self) -> bool:
        """Live, nothing queued, and the consumer idle: nothing can be overtaken."""
        return self._consumer_idle and not self._pending and not self._resync

    def beat_if_due(self, now: float, due_after: float) -> None:
        """The heartbeat clock's call: end the stream if its credentials expired, else
        beat straight to the socket if we can."""
        if (self._ends_at is not None and now >= self._ends_at) or (
            self._trusted is not None and not self._trusted()
        ):
            self.expire()
            return
        if self._closed:
            return
        if self._stopped_reading():
            self._overflow()
            self._wake(True)  # (its consumer sees the drop)
            return
        if now - self._last_beat < due_after:
            return
        if (self._parked_live() or self._awaiting_store) and self._sink.write(self._beat):
            self._last_beat = now  # (waiting on the store: see CatchUp._from_store)
        else:
            self._wake(False)

    def look_at_origins(self, now: float) -> None:
        """The clock's call, more often than its beats when topics expire sooner: ask
        the consumer for later origins when one the client holds is due."""
        if self._closed or self._origins_due or self._origins is None:
            return
        if self._origins.due(self._positions, now):
            self._origins_due = True
            self._wake(True)  # (its consumer reads the store: see _later_origins)
        elif not self._origins:  # (left the origin: its log came; looked at no more)
            self._origins = None
            self._heartbeats.unwatch_origins(self)

    def _watch_origins(self) -> None:
        """Have the clock look at the origins its client holds (``look_at_origins``)."""
        self._heartbeats.watch_origins(self)

    def _stopped_reading(self) -> bool:
        """Past the buffer limit at two of the clock's ticks in a row (a third of a
        heartbeat interval apart), with nothing read between them: a burst taken whole
        that its client does not read. Without this, a client that stopped reading
        held it until its topic's next event (review: 18 MB each, for a multi-topic
        stream's own frames); judged at one tick, a reader at full speed, caught
        mid-burst, was dropped (second review). Not while catching up: ``offer``
        bounds the queue then, and the consumer is running."""
        if self._dropped or self._catching_up:
            self._backlog_at_tick = None
            return False
        backlog = self._sink.unsent_bytes() + self._pending_bytes
        before, self._backlog_at_tick = self._backlog_at_tick, backlog
        limit = self._buffer_limit
        return backlog > limit and before is not None and before > limit and backlog >= before
