"""The append pipeline: concurrent appends sent to Redis together, one write, one read.

The store hands it each append's keys and arguments for the append script
(lua/append.lua); it answers each with that script's reply. On one Redis,
Sentinel's primary or the embedded store: a Cluster's appends go by their slot
(``redis_slots``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from broker.errors import StoreUnavailable
from broker.redis_options import REDIS_FAILURES
from broker.redis_packing import CommandPacker
from broker.redis_raw import RawConnection


class AppendPipeline:
    """Concurrent appends travel to Redis together: one write, one read for all.

    Appends made in the same event-loop turn (many requests arrive together
    under load) are queued and sent as one pipeline at the end of the turn;
    each caller gets its own script's answer. An append that may linger (a
    streaming ingest's) waits up to its linger for others, unless one that may
    not comes first and takes it along. Scripts run one by one in Redis,
    so each stays atomic. A NOSCRIPT (Redis restarted) reloads the script and
    re-sends only the appends that got it, which were not executed.
    """

    def __init__(
        self, client: redis.Redis, script: AsyncScript, *, raw: bool, timeout: float | None = None
    ) -> None:
        """``timeout``: how long the appends' replies may take (see ``RedisStreamStore``)."""
        self._client = client
        # Real Redis: packed here, on a connection of its own; fakeredis: redis-py's pipeline.
        self._connection = RawConnection(client.connection_pool, timeout) if raw else None
        self._packer = CommandPacker()  # (hiredis' pack_command, cheaper: see redis_packing)
        self._script = script  # registered once by the store: its text and SHA
        self._queue: list[tuple[list[str], list[str | int], asyncio.Future[Any]]] = []
        self._in_flight: set[asyncio.Future[None]] = set()
        self._sending_soon = False  # the queue goes at the end of this turn
        self._lingering: asyncio.TimerHandle | None = None  # ... or when this fires

    async def call(self, keys: list[str], args: list[str | int], linger: float = 0.0) -> Any:
        """The append script's reply; ``linger``: how long it may wait for company."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((keys, args, future))
        if linger <= 0 and not self._sending_soon:  # (it takes what lingers along)
            self._sending_soon = True
            loop.call_soon(self._send_queued)
        elif linger > 0 and not self._sending_soon and self._lingering is None:
            self._lingering = loop.call_later(linger, self._send_queued)
        return await future

    def _send_queued(self) -> None:
        self._sending_soon = False
        if self._lingering is not None:
            self._lingering.cancel()
            self._lingering = None
        if not self._queue:
            return
        batch, self._queue = self._queue, []
        task = asyncio.ensure_future(self._send(batch))
        self._in_flight.add(task)  # a reference, so the task is not collected mid-flight
        task.add_done_callback(self._in_flight.discard)

    async def _send(
        self, batch: list[tuple[list[str], list[str | int], asyncio.Future[Any]]]
    ) -> None:
        try:
            results = await self._execute(batch)
        except BaseException as error:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _execute(
        self, batch: list[tuple[list[str], list[str | int], asyncio.Future[Any]]]
    ) -> list[Any]:
        """Each append's reply, in the batch's order; resends only what hit NOSCRIPT.

        Redis runs a pipeline's commands one by one, so when it loses its scripts
        mid-pipeline (SCRIPT FLUSH, a restart) the appends before that stored their
        events and only the later ones were refused: resending all would store the
        first ones twice. One reload and one resend; a script lost again fails
        those appends (their publishers retry), never a loop.
        """
        sha = self._script.sha
        commands = [("EVALSHA", sha, len(keys), *keys, *args) for keys, args, _ in batch]
        results = await self._transmit(commands)
        refused = [n for n, result in enumerate(results) if isinstance(result, NoScriptError)]
        if refused:
            retried = await self._reload_and_resend([commands[n] for n in refused])
            for n, result in zip(refused, retried, strict=True):
                results[n] = result
        return results

    async def _reload_and_resend(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies of commands that were not executed (NOSCRIPT), sent once more."""
        try:
            await self._client.script_load(self._script.script)
            results = await self._transmit(commands)
        except REDIS_FAILURES as error:  # none of these ran: each may be retried
            reason = f"could not reload the append script: {error}"
            return [_not_stored(reason, error) for _ in commands]  # one error per caller
        return [
            _not_stored("redis lost the append script again", r)
            if isinstance(r, NoScriptError)
            else r
            for r in results
        ]

    async def _transmit(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """One reply per command: a value, or that command's own error (the connection's
        failure for those whose reply did not come)."""
        if self._connection is not None:
            pack = self._packer.pack
            return await self._connection.exchange_each([pack(command) for command in commands])
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    async def open(self) -> None:
        if self._connection is not None:
            await self._connection.open()

    async def close(self, why: str = "the store is closing") -> None:
        if self._connection is not None:
            await self._connection.close(why)


def _not_stored(reason: str, cause: BaseException) -> StoreUnavailable:
    error = StoreUnavailable(f"{reason}; the append was not stored")
    error.__cause__ = cause
    return error
