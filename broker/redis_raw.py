"""Redis connections read by a protocol rather than redis-py: for appends and live reads.

Through redis-py's asyncio connection a command's round trip costs a pool
checkout and release, a write and ``drain``, then for each reply its parser's
layers, a ``StreamReader`` wait (through ``asyncio.wait_for``, a task per read)
and a deadline, and a reply goes through its Python response callback. Measured
in one process against a real redis-server: a lone round trip 71 us of client
CPU against 35 us for a protocol that feeds hiredis straight from the socket (6
against 12-15 us per command with 8 callers at once); an ``XREAD`` of 128 keys
that returns 25 streams, 350-400 us against 90-120.

So the hot paths use ``RawConnection``: redis-py opens the connection (AUTH, TLS,
SELECT, CLIENT SETINFO, the Sentinel lookup: whatever the URL asks for) and tells
its client id, then the socket is handed to ``_Replies``, an ``asyncio.Protocol``
that feeds a hiredis reader and settles each batch of commands in turn: Redis
answers a connection's commands in the order it got them. Each process keeps one
for its appends (Redis runs commands one at a time, and a batch of many appends
is one write) and one per live-read lane (``redis_live``: a blocking ``XREAD``
holds its connection, and is interrupted by ``CLIENT UNBLOCK`` of its client id).

Failures, each failing the commands that wait (a ``redis.ConnectionError`` or
``TimeoutError``, which the store answers as unavailable; an append that may
have run is retried by its publisher with its Idempotency-Key, as before):
the connection breaks or Redis closes it; a batch's replies do not all come
within ``timeout`` (the connection is dropped, as redis-py's socket timeout
does); a ``READONLY`` reply (the primary was demoted by a failover: the new
connection asks the Sentinels again). The next batch opens a new connection.

redis-py surface relied on (pinned; ``tests/unit/test_private_surfaces_redis.py``):
a pool's ``make_connection()``, a connection's ``connect()``, ``send_command()``
and ``read_response()`` (its client id, before the socket is taken over) and its
private ``_writer`` (the ``asyncio.StreamWriter`` whose transport is taken over)
and ``_reader``; ``BaseParser.parse_error`` (an error reply to redis-py's exception).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import hiredis
import redis.asyncio as redis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError, ReadOnlyError, TimeoutError

from broker import constants as c


class RawConnection:
    """A connection for pipelined commands, opened on first use and after a failure."""

    def __init__(self, pool: redis.ConnectionPool, timeout: float | None = None) -> None:
        """``timeout``: how long a batch's replies may take; by default the pool's socket
        timeout (``redis_options``), as redis-py's own connections of that pool would."""
        self._pool = pool
        default = pool.connection_kwargs.get("socket_timeout") or c.REDIS_REPLY_TIMEOUT_SECONDS
        self._timeout = float(timeout if timeout is not None else default)
        self._replies: _Replies | None = None
        self._opening: asyncio.Future[_Replies] | None = None  # shared while it opens

    @property
    def client_id(self) -> int | None:
        """The Redis client id of the connection now open (for ``CLIENT UNBLOCK``)."""
        replies = self._replies
        return None if replies is None or replies.broken else replies.client_id

    async def exchange(self, commands: list[bytes]) -> list[Any]:
        """Send packed commands in one write; each one's reply, or its error reply as a
        redis-py exception instance, in order. Raises if the connection fails."""
        replies = self._replies
        if replies is None or replies.broken:
            replies = await self._open()
        batch = replies.send(commands)
        await batch.done
        return batch.raised()

    async def exchange_each(self, commands: list[bytes]) -> list[Any]:
        """As ``exchange``, but each command settled on its own: one whose reply came
        before the connection failed keeps it (an append Redis ran must not be told
        failed: retried without an Idempotency-Key, it would be stored twice); those
        after get the failure, as an exception instance. Raises only if the connection
        cannot be opened (then none was sent)."""
        replies = self._replies
        if replies is None or replies.broken:
            replies = await self._open()
        batch = replies.send(commands)
        await batch.done
        return batch.each()

    async def close(self, why: str = "the store is closing") -> None:
        """Drop the connection (or its opening): what waits fails with a ConnectionError
        saying ``why``; the next command opens a new one."""
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.cancel()
        if self._replies is not None:
            self._replies.fail(ConnectionError(why))

    async def _open(self) -> _Replies:
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._connect())
        opening = self._opening
        try:
            return await asyncio.shield(opening)  # a caller that gives up leaves it to others
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if opening.cancelled() and not (task is not None and task.cancelling()):
                # The opening was dropped (``close``), not this caller: a connection
                # failure to it (a CancelledError would end its request unanswered).
                raise ConnectionError("the connection was dropped while it opened") from None
            raise
        finally:
            if opening.done() and self._opening is opening:
                self._opening = None

    async def open(self) -> None:
        """Open it now rather than on the first command (once: asked again, as when the
        store's start is tried again, an open connection stays the one)."""
        if self._replies is None or self._replies.broken:
            await self._open()

    async def _connect(self) -> _Replies:
        # Made by the pool (its options; not one of its connections): FixedPool takes
        # its connecting after an outage as the cue to reopen its own idle ones.
        connection: Any = self._pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.connect()
            await connection.send_command("CLIENT", "ID")
            client_id = int(await connection.read_response())
        except BaseException:  # (cancelled by close() too): not left open until collected
            await connection.disconnect(nowait=True)
            raise
        writer: asyncio.StreamWriter = connection._writer
        unread = len(connection._reader._buffer)
        # The socket is ours from here: redis-py's object lets go of it (else, when
        # collected, it closes it and warns of an unclosed connection).
        connection._writer = connection._reader = None
        if unread:  # nothing may be left unread after the handshake
            writer.transport.abort()
            raise ConnectionError("unexpected data from redis after connecting")
        replies = _Replies(writer, self._timeout, client_id)
        writer.transport.set_protocol(replies)
        self._replies = replies
        return replies


class _Batch:
    """One write's commands: their replies as they come, or the failure that ended the
    connection before the last one, and ``done`` once either is whole."""

    __slots__ = ("count", "done", "failure", "replies", "timer")

    def __init__(self, count: int, done: asyncio.Future[None]) -> None:
        self.count = count
        self.done = done
        self.replies: list[Any] = []
        self.failure: Exception | None = None
        self.timer: asyncio.TimerHandle | None = None

    def settle(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if not self.done.done():  # (cancelled by its caller: the replies are dropped)
            self.done.set_result(None)

    def raised(self) -> list[Any]:
        """Its replies; raises its failure, if it has one."""
        if self.failure is not None:
            raise self.failure
        return self.replies

    def each(self) -> list[Any]:
        """Its replies, and the failure in place of each that did not come."""
        if self.failure is None:
            return self.replies
        return self.replies + [self.failure] * (self.count - len(self.replies))


class _Replies(asyncio.Protocol):
    """One connection's replies, matched in order to the batches of its commands.

    A batch, not each of its commands, has a future: a future per command, gathered,
    cost an append some 4,000 instructions (its creation, a done callback scheduled and
    run for each, gather's bookkeeping: callgrind, bench.ingest_line)."""

    def __init__(self, writer: asyncio.StreamWriter, timeout: float, client_id: int) -> None:
        # The writer is kept with its transport: collected, it would close it.
        self._writer = writer
        self.client_id = client_id
        self._transport: Any = writer.transport
        self._timeout = timeout
        self._reader = hiredis.Reader()
        # Those sent whose replies have not all come, in order, each with its deadline.
        self._batches: collections.deque[_Batch] = collections.deque()
        self.broken = False

    def send(self, commands: list[bytes]) -> _Batch:
        loop = asyncio.get_running_loop()
        batch = _Batch(len(commands), loop.create_future())
        if self.broken:  # broke while the caller got here: nothing was sent
            batch.failure = ConnectionError("the connection to redis broke")
            batch.settle()
            return batch
        if not commands:
            batch.settle()
            return batch
        self._transport.write(b"".join(commands))
        batch.timer = loop.call_later(self._timeout, self._timed_out)
        self._batches.append(batch)
        return batch

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if isinstance(reply, hiredis.PushNotification):
                continue  # RESP3's out-of-band messages (redis-py's default protocol): no reply
            if not self._batches:
                self.fail(ConnectionError("redis sent a reply nobody asked for"))
                return
            if isinstance(reply, hiredis.ReplyError):
                reply = BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
                if isinstance(reply, ReadOnlyError):  # a demoted primary: reconnect
                    self.broken = True
                    self._transport.close()
            batch = self._batches[0]
            batch.replies.append(reply)
            if len(batch.replies) == batch.count:
                self._batches.popleft()
                batch.settle()

    def _timed_out(self) -> None:
        self.fail(TimeoutError(f"redis did not answer within {self._timeout}s"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError(f"redis closed the connection: {exc or 'EOF'}"))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost fails what waits

    def fail(self, error: Exception) -> None:
        """Everything that waits fails with ``error``; the connection is dropped."""
        self.broken = True
        while self._batches:
            batch = self._batches.popleft()
            batch.failure = error
            batch.settle()
        self._transport.abort()
