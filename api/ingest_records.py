"""An open keyed ingest's line records, kept answering however long it stays open.

With an Idempotency-Key K, line n is recorded under K:n, so that a producer whose
connection broke resends the whole stream and no line is stored twice. The records
answer for ``BROKER_IDEMPOTENCY_SECONDS`` after the ingest's last line, then are pruned
(``broker/lua/append.lua``). But its body's timeout runs from each read: blank lines, or
a line sent in slow pieces, kept an ingest open past the window. Its records lapsed, its
next line began anew under its key, and from then on the resend of the whole stream
stored its early lines twice (as would every answer that says to send it again).

So while a keyed ingest is open and has stored lines, its watch (``api.ingest_watch``)
hands each of its looks to a ``LineRecordsKeeper``, which keeps the records answering
(``Store.keep_lines``) once the last write is older than a quarter of the window: a
round trip per quarter window of pause, none per line. It learns of the ingest's writes
from how many lines were stored, at each look: the hot path does nothing for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from broker import BrokerError

log = logging.getLogger(__name__)

KEEP_AFTER = 0.25
"""The records are kept once the last write is older than this much of the window. A
look comes every eighth of the body's timeout at most, and the window is at least twice
it (``api.settings``): kept by a sixteenth of the window past this at the latest, the
rest of the window is for a store slow to answer, or a try that failed, to be tried again."""


class LineRecordsKeeper:
    """Keeps one open keyed ingest's line records answering, from its watch's looks.

    ``keep``: one ``Store.keep_lines`` of the ingest (False: nothing to keep, its records
    lapsed or lost, or its log gone: its next append tells; the keeper stops).
    ``stored``: how many lines it stored so far (any write refreshed its records).
    ``timeout``: how long one keeping may take (the appends' deadline)."""

    def __init__(
        self,
        keep: Callable[[], Awaitable[bool]],
        stored: Callable[[], int],
        *,
        window: float,
        timeout: float,
    ) -> None:
        self._keep = keep
        self._stored = stored
        self._every = window * KEEP_AFTER
        self._timeout = timeout
        self._stored_seen = 0
        self._fresh_at = 0.0  # (loop time) when the records were last written, at the latest
        self._keeping: asyncio.Task[None] | None = None
        self._over = False

    def look(self, now: float) -> None:
        """A look of the watch, at loop time ``now``: keep the records if it is time."""
        stored = self._stored()
        if stored != self._stored_seen:  # (written since the last look: the records with it)
            self._stored_seen, self._fresh_at = stored, now
            return
        if self._over or not stored or self._keeping is not None:
            return
        if now - self._fresh_at >= self._every:
            self._keeping = asyncio.get_running_loop().create_task(self._keep_once(now))

    def stop(self) -> None:
        """The ingest is over: its records need keeping no more."""
        self._over = True
        if self._keeping is not None:
            self._keeping.cancel()

    async def _keep_once(self, sent_at: float) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                kept = await self._keep()
        except (BrokerError, TimeoutError):
            return  # (tried again at the next look: the rest of the window is for that)
        except Exception:
            log.exception("keeping an ingest's line records failed unexpectedly")
            self._over = True
            return
        finally:
            self._keeping = None
        if kept:
            self._fresh_at = max(self._fresh_at, sent_at)  # (the store's time is later)
        else:
            self._over = True
