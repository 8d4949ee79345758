"""Following the Sentinels' primary between failures, not only after one.

A connection looks the primary up when it opens, and reopens only when it fails.
After a failover the old primary may go on taking writes until the Sentinels
demote it (seconds: a primary that was frozen and resumes, a planned failover):
an instance whose connections did not fail went on appending there, and those
acknowledged events were dropped when it was demoted, while another instance's
subscribers, reading the new primary, never saw them (audit: some 10 s of
publishes). So the store asks the Sentinels every ``PRIMARY_WATCH_S`` where the
primary is, and when they name another one it drops every connection to the old
one at once; each opens again on the new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio.sentinel import Sentinel

from broker import constants as c
from broker.redis_options import REDIS_FAILURES

log = logging.getLogger(__name__)

Address = tuple[str, int]


class PrimaryWatch:
    """Where the Sentinels say ``service``'s primary is, asked every ``interval_s``."""

    def __init__(
        self, sentinel: Sentinel, service: str, interval_s: float = c.PRIMARY_WATCH_S
    ) -> None:
        self._sentinel = sentinel
        self._service = service
        self._interval_s = interval_s
        self.primary: Address | None = None
        """The last primary they named (None before they first answered)."""

    async def run(self, moved: Callable[[], Awaitable[None]]) -> None:
        """Ask until cancelled; await ``moved()`` when they name another primary."""
        while True:
            try:
                address = await self._ask()
            except Exception:  # (the watch must outlive any surprise)
                log.exception("redis: asking the Sentinels where the primary is failed")
                address = None
            if address is not None:
                if self.primary is not None and address != self.primary:
                    log.warning(
                        "redis: the Sentinels name a new primary for %s (%s:%s, was %s:%s):"
                        " dropping the connections to the old one",
                        self._service, *address, *self.primary,
                    )  # fmt: skip
                    try:
                        await moved()
                    except Exception:
                        log.exception("redis: dropping the old primary's connections failed")
                self.primary = address
            await asyncio.sleep(self._interval_s)

    async def _ask(self) -> Address | None:
        """The primary a majority of the Sentinels name; None while none has a majority
        (a failover under way, Sentinels down): the connections are left as they are.
        One Sentinel alone, lagging or cut off, moves nothing (redis-py's lookup takes
        the first that answers: a stale one would have the connections dropped twice)."""
        sentinels = self._sentinel.sentinels
        views = await asyncio.gather(*(self._view_of(each) for each in sentinels))
        named = Counter(view for view in views if view is not None)
        if not named:
            return None
        address, votes = named.most_common(1)[0]
        return address if votes > len(sentinels) // 2 else None

    async def _view_of(self, sentinel: Any) -> Address | None:
        try:
            masters: Any = await sentinel.sentinel_masters()
        except REDIS_FAILURES:
            return None
        state = masters.get(self._service)
        if not state or not self._sentinel.check_master_state(state, self._service):
            return None  # (down, or this Sentinel sees too few others)
        return str(state["ip"]), int(state["port"])
