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
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from broker import constants as c
from broker.redis_options import REDIS_FAILURES

log = logging.getLogger(__name__)

Address = tuple[str, int]
ASK_DEADLINE_S = 0.5
"""How long one Sentinel may take to answer a round of the watch."""
STALE_AFTER_ROUNDS = 4
"""Rounds without a majority after which its last answer no longer leads connections."""


class WatchedSentinelPool(SentinelConnectionPool):
    """A Sentinel pool whose connections open where the watch's majority says the primary
    is, once it has said: redis-py's own lookup takes the first Sentinel that answers,
    and one that lags (a failover it has not heard of yet) sent the connections the
    watch had just dropped back to the old primary, for good (review: 40 appends
    acknowledged there after the watch moved, then dropped with it)."""

    watch: PrimaryWatch | None = None

    async def get_master_address(self) -> Any:
        watched = self.watch.current() if self.watch is not None else None
        if watched is None or not self.is_master:
            return await super().get_master_address()  # type: ignore[no-untyped-call]
        if self.master_address != watched:
            self.master_address = watched
            await self.disconnect(inuse_connections=False)
        return watched


class PrimaryWatch:
    """Where the Sentinels say ``service``'s primary is, asked every ``interval_s``."""

    def __init__(
        self, sentinel: Sentinel, service: str, interval_s: float = c.PRIMARY_WATCH_S
    ) -> None:
        self._sentinel = sentinel
        self._service = service
        self._interval_s = interval_s
        self._round_s = interval_s + ASK_DEADLINE_S
        self.primary: Address | None = None
        """The last primary they named (None before they first answered)."""
        self._primary_at = -float("inf")  # (monotonic) when a majority last named it
        self.pools: list[SentinelConnectionPool] = []
        """The pools whose connections must follow it (see ``WatchedSentinelPool``)."""

    async def run(self, moved: Callable[[], Awaitable[None]]) -> None:
        """Ask until cancelled; await ``moved()`` when they name another primary."""
        while True:
            try:
                address = await self._ask()
            except Exception:  # (the watch must outlive any surprise)
                log.exception("redis: asking the Sentinels where the primary is failed")
                address = None
            if address is not None:
                # (set first: the connections dropped below open again there)
                before, self.primary = self.primary, address
                self._primary_at = time.monotonic()
                if (before is not None and address != before) or self._astray(address):
                    log.warning(
                        "redis: the Sentinels name the primary for %s %s:%s (the connections"
                        " went to %s): dropping the connections to the old one",
                        self._service, *address, before or "another",
                    )  # fmt: skip
                    try:
                        await moved()
                    except Exception:
                        log.exception("redis: dropping the old primary's connections failed")
                    for pool in self.pools:  # all dropped: the next ones open there
                        pool.master_address = address
            await asyncio.sleep(self._interval_s)

    def current(self) -> Address | None:
        """The primary, if a majority named it lately; else None (this instance cannot
        reach a majority now: connections look it up as redis-py does, rather than go
        back to an address a later failover may have left)."""
        fresh = time.monotonic() - self._primary_at <= STALE_AFTER_ROUNDS * self._round_s
        return self.primary if fresh else None

    def _astray(self, address: Address) -> bool:
        """Whether a pool's connections opened somewhere else (the store opened while
        the Sentinels disagreed: the first answer is no proof of where they went)."""
        return any(
            pool.master_address is not None and _address(pool.master_address) != address
            for pool in self.pools
        )

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
        """One Sentinel's answer, within ``ASK_DEADLINE_S``: one that hangs (frozen, its
        host gone) must not hold every round up for the 5 s socket timeout."""
        try:
            asking = sentinel.sentinel_master(self._service)
            state: Any = await asyncio.wait_for(asking, ASK_DEADLINE_S)
        except REDIS_FAILURES:  # (the deadline's TimeoutError among them)
            return None
        if not state or not self._sentinel.check_master_state(state, self._service):
            return None  # (down, or this Sentinel sees too few others)
        return str(state["ip"]), int(state["port"])


def _address(raw: Any) -> Address:
    host, port = raw
    return str(host), int(port)
