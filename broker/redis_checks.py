"""What the broker checks of its Redis: that it may do its work, and keeps its keys.

**Rights.** At start the store runs once what every publish and stream needs
(loading the scripts, a script reading a topic's keys, a write in the broker's key
space, ``CLIENT ID``). A refusal that waiting will not mend (a password, an ACL, a
database that does not exist, a read-only replica given as the primary) stops the
broker there, naming it: it had started, said ready, and answered every publish
503 (audit of hosted Redis setups). Redis unreachable at start is not one of those:
the connections open once it answers.

**Memory.** At ``maxmemory`` Redis either refuses writes or evicts keys to make
room, by its ``maxmemory-policy``. Refused writes are safe: an append is refused
whole (see append.lua), answered 503 "Store full", and retried. Eviction is not: it
takes a topic's keys one by one, and none of it can be told to a client: an
idempotency record gone, a publisher's retry is stored twice; a topic's meta hash
gone, its log is sent again under the ids its clients already have, and a closed
topic opens again (audit: ``volatile-lru``, the default of several hosted Redis
services, evicts the records first, the only keys with a TTL when topics have
none). So the broker runs only on a Redis that does not evict: it does not start on
one that does, and refuses writes if the policy changes under it, unless
``BROKER_REDIS_EVICTION=allow`` says that loss is accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    ReadOnlyError,
    ResponseError,
)

from broker import constants as c
from broker.errors import StoreMisconfigured
from broker.health import ThrottledLog
from broker.redis_options import REDIS_FAILURES

log = logging.getLogger(__name__)

SAFE_POLICY = "noeviction"
SEE_PERMISSIONS = "see the README's Redis permissions"
PROBE_TOPIC = "rights-probe!"
"""The keys the start-up probe names: no topic can be named so (``!``)."""


MISCONFIGURED = ("DB index", "unknown command", "The user executing the script can't")
"""What such refusals say as a plain ERR (a script's ACL refusal is not a NOPERM)."""


def is_misconfiguration(error: BaseException, *, follows_primary: bool = False) -> bool:
    """A refusal that waiting will not mend (unlike an outage, a failover, a load).

    READONLY is a replica given as the primary, unless the store follows the primary
    (Sentinel's): then it is the old primary, demoted by a failover under way."""
    if isinstance(error, ReadOnlyError):
        return not follows_primary
    if isinstance(error, AuthenticationError | NoPermissionError):
        return True
    said = str(error)
    return isinstance(error, ResponseError) and any(words in said for words in MISCONFIGURED)


async def probe_rights(client: Any, scripts: Sequence[AsyncScript], probe: AsyncScript) -> None:
    """Run once what every publish and stream needs; raises what Redis refuses.

    ``scripts`` are loaded (their first is state.lua, run on the probe's keys: a read);
    ``probe`` (probe.lua) names the commands the scripts run that the user may not;
    the PEXPIRE of a key that does not exist writes nothing, but Redis checks it as a
    write (the ACL's key patterns, a replica's READONLY)."""
    for script in (*scripts, probe):
        await client.script_load(script.script)
    keys = [c.log_key(PROBE_TOPIC), c.meta_key(PROBE_TOPIC)]
    await scripts[0](keys=keys, args=[0])
    refused = [name.decode() for name in await probe(keys=keys)]
    if refused:
        raise NoPermissionError(f"this user may not run {', '.join(refused)} (the scripts do)")
    await client.pexpire(keys[1], 1)


async def try_rights(
    open_and_probe: Callable[[], Awaitable[None]], *, follows_primary: bool, quiet: bool = False
) -> bool:
    """Open and probe (``probe_rights``): a refusal that waiting will not mend raises
    StoreMisconfigured, after a READONLY has had ``READONLY_AT_START_S`` to pass (a
    primary endpoint failing over by DNS answers it a moment); any other failure is
    an outage, logged (unless ``quiet``): False, the probe to try again once Redis
    answers (``probe_rights_when_reachable``)."""
    deadline = time.monotonic() + c.READONLY_AT_START_S
    while True:
        try:
            await open_and_probe()
            return True
        except REDIS_FAILURES as error:
            if not is_misconfiguration(error, follows_primary=follows_primary):
                if not quiet:
                    log.warning("redis: could not open the connections yet: %s", error)
                return False
            if isinstance(error, ReadOnlyError) and time.monotonic() < deadline:
                log.warning("redis: read only (a failover under way?), asking again: %s", error)
                await asyncio.sleep(c.READONLY_RETRY_S)
                continue
            said = f"redis refuses what the broker needs: {error} ({SEE_PERMISSIONS})"
            raise StoreMisconfigured(said) from error


def evicting_policy(info: dict[str, Any]) -> str | None:
    """The policy by which a server with this ``INFO memory`` evicts keys, or None
    when it never does (``noeviction``, or no memory limit at all)."""
    policy = str(info.get("maxmemory_policy", SAFE_POLICY))
    limit = int(info.get("maxmemory", 0) or 0)
    return policy if limit > 0 and policy != SAFE_POLICY else None


async def probe_rights_when_reachable(
    open_and_probe: Callable[[], Awaitable[None]], *, follows_primary: bool
) -> None:
    """``try_rights`` again every ``RIGHTS_RETRY_S`` until Redis answers it, for a broker
    that started while Redis was out of reach: a user without the rights it needs was
    found only as 503s, one per request, and nothing named the cause. Running already,
    the broker does not stop: it says so, once, as an error."""
    while True:
        await asyncio.sleep(c.RIGHTS_RETRY_S)
        try:
            if await try_rights(open_and_probe, follows_primary=follows_primary, quiet=True):
                log.info("redis: answers, and grants what the broker needs")
                return
        except StoreMisconfigured as refused:
            log.error("%s: every publish and stream fails until it is mended", refused)
            return


class EvictionGuard:
    """Reads the memory policy of the Redis servers that hold topics; ``refusal`` says
    why writes are refused (None: they are not). ``read_infos`` gives each server's
    ``INFO memory`` (the one server, the Sentinels' primary, each Cluster primary)."""

    def __init__(
        self, read_infos: Callable[[], Awaitable[list[dict[str, Any]]]], *, allow: bool
    ) -> None:
        self._read_infos = read_infos
        self._allow = allow
        self.refusal: str | None = None
        self._refusal_log = ThrottledLog(c.EVICTION_CHECK_S, log)
        self._unknown_log = ThrottledLog(math.inf, log)  # (said once)
        self._allowed_log = ThrottledLog(math.inf, log)
        self._watch: asyncio.Task[None] | None = None

    async def check(self, *, at_start: bool = False) -> None:
        """Read the policies now (raises what Redis raises when it cannot be reached)."""
        try:
            infos = await self._read_infos()
        except ResponseError as error:  # INFO not allowed (an ACL), or renamed
            self._unknown_log.say(
                "redis: cannot read maxmemory-policy (%s): make sure it is %s; any other "
                "policy may lose or repeat events",
                error,
                SAFE_POLICY,
            )
            return
        evicting = [policy for policy in map(evicting_policy, infos) if policy is not None]
        if not evicting:
            if self.refusal is not None:
                log.warning("redis: maxmemory-policy is %s again: writes accepted", SAFE_POLICY)
            self.refusal = None
        elif self._allow:
            self._allowed_log.say(
                "redis: maxmemory-policy %s may evict events and idempotency records "
                "(allowed by BROKER_REDIS_EVICTION=allow)",
                evicting[0],
            )
        else:
            self.refusal = (
                f"redis may evict the broker's keys (maxmemory-policy {evicting[0]}), which "
                f"would lose or repeat events without a word; set maxmemory-policy "
                f"{SAFE_POLICY} (see the README's Redis memory), or BROKER_REDIS_EVICTION=allow"
            )
            if not at_start:  # (at start the broker does not start, saying why)
                self._refusal_log.say("redis: refusing writes: %s", self.refusal)

    async def start(self) -> None:
        """Read the policies (raises StoreMisconfigured: the broker does not start on a
        Redis that may evict), then again every ``EVICTION_CHECK_S`` while it runs.
        Redis unreachable now: read once it answers."""
        try:
            await self.check(at_start=True)
        except REDIS_FAILURES as error:
            log.warning("redis: could not read its memory policy yet: %s", error)
        if self.refusal is not None:
            raise StoreMisconfigured(self.refusal)
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_policy())

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None

    async def _watch_policy(self) -> None:
        """Check again now and then (a policy set with CONFIG SET while the broker runs)."""
        while True:
            await asyncio.sleep(c.EVICTION_CHECK_S)
            try:
                await self.check()
            except REDIS_FAILURES:  # (unreachable: told by every command meanwhile)
                pass
            except Exception:  # (never a reason to stop watching, nor to fail close())
                log.exception("redis: the memory policy check failed")
