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
            address = await self._ask()
            if address is not None:
                if self.primary is not None and address != self.primary:
                    log.warning(
                        "redis: the Sentinels name a new primary for %s (%s:%s, was %s:%s):"
                        " dropping the connections to the old one",
                        self._service, *address, *self.primary,
                    )  # fmt: skip
                    try:
                        await moved()
                    except Exception:  # (the watch must go on whatever a drop raised)
                        log.exception("redis: dropping the old primary's connections failed")
                self.primary = address
            await asyncio.sleep(self._interval_s)

    async def _ask(self) -> Address | None:
        """Their answer; None while none names a primary (a failover under way, or
        no Sentinel answers): the connections are left as they are."""
        try:
            answer: Any = await self._sentinel.discover_master(self._service)
        except REDIS_FAILURES:  # (MasterNotFoundError among them)
            return None
        host, port = answer
        return str(host), int(port)
