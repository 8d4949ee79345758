"""A topic's scripts on a Redis Cluster, through a migration of its slot.

Resharding moves a slot from one primary to another: the target is set
IMPORTING, the source MIGRATING, the slot's keys are moved by MIGRATE, then both
are told the new owner (SETSLOT NODE). Meanwhile Redis answers a command:

- ``-ASK <node>`` (the source, which no longer has its keys): send it to that
  node, preceded by ``ASKING`` *on the same connection* (the flag is the
  connection's, for its next command);
- ``-TRYAGAIN``: a command of several keys when only some of them are on the node
  (the source has some; or the target, asked, lacks some). A topic's scripts name
  all of its keys (log, meta, the idempotency records: six for an append), and
  most topics have not all of them, so an append gets TRYAGAIN from the
  ``MIGRATING`` to the ``SETSLOT NODE``, on both nodes: Redis' own answer is to
  try again once the migration ends;
- ``-MOVED``: the slot has a new owner.

redis-py's cluster client (8.1) sends ``ASKING`` as a command of its own, on one
pooled connection, and the command on the next one: the target, not flagged,
answered MOVED back to the source, which answered ASK again, until the client's
16 tries were spent (measured: a brand-new topic's publish was a 503 at once, for
the whole migration; an existing topic's a 503 after 0.4 s of TRYAGAIN). So the
store sends its keyed scripts here: ``ASKING`` and the command in one write on
one connection, and TRYAGAIN waited out with a short backoff for up to
``patience`` seconds, then a 503 that says why. Nothing ran when Redis answered
ASK, MOVED or TRYAGAIN, so each is safe to send again.

redis-py surface relied on (``tests/unit/test_private_surfaces_redis.py``):
``ClusterNode.acquire_connection()``, ``.release()``, ``.parse_response()``; a
connection's ``pack_command(s)``, ``send_packed_command``, ``read_response`` and
``disconnect``; ``RedisCluster.get_node(host=, port=)``, ``get_node_from_key``,
``.nodes_manager.move_slot(MovedError)`` and ``.initialize()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Container, Iterable, Sequence
from typing import Any, NamedTuple

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, MovedError, NoScriptError, ResponseError, TryAgainError

from broker import constants as c
from broker.errors import StoreUnavailable
from broker.redis_options import REDIS_FAILURES

log = logging.getLogger(__name__)

SLOT_MIGRATING = (
    "the topic's redis cluster slot is being migrated to another node, and its keys "
    "stayed split between the two for longer than the broker waits; nothing was "
    "stored: retry (with the same Idempotency-Key)"
)
CLUSTER_REDIRECTED = (
    "the redis cluster kept redirecting the command (the topic's slot is moving between "
    "nodes, or a failover is under way), so it ran nowhere: retry (with the same "
    "Idempotency-Key)"
)


class SlotCommands:
    """Keyed commands sent to the node that holds their slot, following a migration.

    ``turns``: the cluster client's (``BoundedCluster``): each command holds one
    while it holds a node's pooled connection, so the pools are never overdrawn.
    ``patience``: how long TRYAGAIN is waited out before the command is refused.
    """

    def __init__(self, cluster: RedisCluster, turns: asyncio.Semaphore, patience: float) -> None:
        self._cluster = cluster
        self._turns = turns
        self._patience = patience
        self._refresh: asyncio.Task[None] | None = None

    async def run_script(
        self,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[str | int],
        *,
        then: tuple[Any, ...] | None = None,
    ) -> Any:
        """The script's reply; loaded on every primary once when a node lacks it
        (NOSCRIPT: it did not run; the target of an ASK may never have been sent it),
        as redis-py's own scripts are (SCRIPT LOAD, not EVAL: the rights the README lists).
        ``then``: a command sent right after it on the same connection (a ``WAIT``,
        which counts that connection's writes): both replies, as a pair."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self.execute(keys[0], *command, then=then)
        except NoScriptError:
            await self._cluster.script_load(script.script)
            return await self.execute(keys[0], *command, then=then)

    async def execute(self, key: str, *command: Any, then: tuple[Any, ...] | None = None) -> Any:
        """``command``'s reply from the node that holds ``key``'s slot now (with
        ``then``'s, as a pair). Raises StoreUnavailable when the slot stays split past
        ``patience``, or keeps being redirected; a ResponseError as Redis answered; a
        connection's failure."""
        commands = [command] if then is None else [command, then]
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._patience
        pause = c.CLUSTER_TRYAGAIN_FIRST_PAUSE_S
        node, asking = await self._owner(key), False
        redirects = 0
        while redirects < c.CLUSTER_MAX_REDIRECTS:
            try:
                replies = await self._send(node, commands, asking=asking)
                return replies[0] if then is None else tuple(replies)
            except MovedError as moved:  # (a kind of AskError: first)
                await self._cluster.nodes_manager.move_slot(moved)
                node, asking = await self._owner(key), False
            except AskError as redirect:
                node, asking = await self._node_at(redirect), True
            except TryAgainError as error:
                if loop.time() + pause > give_up_at:
                    raise StoreUnavailable(SLOT_MIGRATING) from error
                await asyncio.sleep(pause)
                pause = min(pause * 2, c.CLUSTER_TRYAGAIN_MAX_PAUSE_S)
                # From the owner again: the migration may have ended meanwhile.
                node, asking, redirects = await self._owner(key), False, 0
                continue
            redirects += 1
        raise StoreUnavailable(CLUSTER_REDIRECTED)

    async def _send(
        self, node: ClusterNode, commands: list[tuple[Any, ...]], *, asking: bool
    ) -> list[Any]:
        async with self._turns:
            connection = node.acquire_connection()
            sent_at = asyncio.get_running_loop().time()
            try:
                return await self._exchange(node, connection, commands, asking=asking)
            except ResponseError:
                raise  # (Redis answered, every reply read: the connection is as sound)
            except asyncio.CancelledError:
                # A reply may be left unread: the connection goes. A cancel is a client
                # gone, or a publish's deadline passed (the edges cancel): only a reply
                # awaited that long says the node may have failed, and then the map is
                # asked again (a failover moves slots); a storm of quick cancels does
                # not ask it back to back (reviews).
                await connection.disconnect(nowait=True)
                waited = asyncio.get_running_loop().time() - sent_at
                if waited >= c.CLUSTER_HUNG_REPLY_S:
                    self._refresh_slot_map()
                raise
            except BaseException:
                # A reply may be left unread (a timeout, a lost connection): the
                # connection goes, and the map is asked again (a failover moves slots).
                await connection.disconnect(nowait=True)
                self._refresh_slot_map()
                raise
            finally:
                node.release(connection)

    @staticmethod
    async def _exchange(
        node: ClusterNode, connection: Any, commands: list[tuple[Any, ...]], *, asking: bool
    ) -> list[Any]:
        """Each command's reply; the first refusal raised once all were read. One
        write: the ASKING flag is this connection's, for its very next command."""
        sent = [("ASKING",), *commands] if asking else commands
        await connection.send_packed_command(connection.pack_commands(sent))
        replies: list[Any] = []
        refusal: ResponseError | None = None
        for command in sent:
            try:
                replies.append(await node.parse_response(connection, command[0]))
            except ResponseError as error:
                refusal = refusal or error
        if refusal is not None:
            raise refusal
        return replies[1:] if asking else replies

    async def _owner(self, key: str) -> ClusterNode:
        try:
            if not self._cluster.nodes_manager.slots_cache:
                await self._cluster.initialize()
            node = self._cluster.get_node_from_key(key)
        except REDIS_FAILURES as error:
            raise StoreUnavailable(f"cluster slot map unavailable: {error}") from error
        if node is None:
            raise StoreUnavailable(f"no cluster node serves {key}")
        return node

    async def _node_at(self, redirect: AskError) -> ClusterNode:
        """The node an ASK names; a node the map does not know yet (added for the
        resharding) once the map is refreshed."""
        node = self._cluster.get_node(host=redirect.host, port=redirect.port)
        if node is None:
            with contextlib.suppress(*REDIS_FAILURES):
                await self._cluster.nodes_manager.initialize()
            node = self._cluster.get_node(host=redirect.host, port=redirect.port)
        if node is None:
            raise StoreUnavailable(f"the redis cluster sent to an unknown node: {redirect}")
        return node

    def _refresh_slot_map(self) -> None:
        """After a node failed: the map again, in the background (a failover gives
        the slot a new owner; the publisher's retry goes there). One at a time."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        try:
            await self._cluster.nodes_manager.initialize()
        except REDIS_FAILURES as error:
            log.info("cluster: could not refresh the slot map yet: %s", error)

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh


class LiveRead(NamedTuple):
    """One XREAD of a Cluster node's live poll: the live keys of a slot; or, its slot
    migrating, one ``key`` alone, sent to the importing node after ``ASKING`` if ``asking``."""

    slot: int
    key: str = ""
    asking: bool = False


class MigratingReads:
    """Where the live reader reads the topics of a slot that is being migrated.

    Measured on Redis 7.0, a slot MIGRATING on its owner and IMPORTING on the target,
    an XREAD of several of its keys is, on the owner: served while it has them all,
    ``ASK`` once it has none, ``TRYAGAIN`` while it has some (a live topic's log that
    exists nowhere yet counts as one it lacks); on the target after ``ASKING``: served
    when it has them all, else ``TRYAGAIN`` (``MOVED`` without ``ASKING``). One key
    alone is never ``TRYAGAIN``: served on the owner while there, else ``ASK``, and
    served on the target after ``ASKING`` (nil if it exists nowhere). Without this the
    topics of a slot went unread from its first moved key to ``SETSLOT NODE``
    (measured: 2.2 s of publishes to a slot all moved but not final, 0 delivered).

    So a slot whose read got ``TRYAGAIN`` is read key by key on its owner, and a key
    that got ``ASK`` alone on the importing node after ``ASKING``, until the slot map
    names that node the owner (or it refuses: the migration was undone). A split slot
    whose keys were all served on its owner is read whole again. Slots not migrating
    are read as before, one XREAD a slot: no work added.
    """

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster
        self._split: dict[int, str] = {}  # slot -> the owner (node name) that said TRYAGAIN
        self._asked: dict[str, ClusterNode] = {}  # log key -> the node its ASK named

    def place(self, key: str, slot: int, owner: ClusterNode) -> tuple[ClusterNode, LiveRead]:
        """The node to read ``key`` from, and the read that names it."""
        asked = self._asked.get(key)
        if asked is not None:
            if asked.name != owner.name:
                return asked, LiveRead(slot, key, asking=True)
            del self._asked[key]  # the migration is over, and the map knows it
        split = self._split.get(slot)
        if split == owner.name:
            return owner, LiveRead(slot, key)
        if split is not None:
            del self._split[slot]  # the slot has a new owner
        return owner, LiveRead(slot)

    def follow(self, owner: str, read: LiveRead, keys: Iterable[str], error: Exception) -> bool:
        """Whether a refused read's topics are read elsewhere from the next poll on (a
        migration's ``ASK`` or ``TRYAGAIN``), rather than having failed."""
        if read.asking:
            self._asked.pop(read.key, None)  # (from the owner again; an ASK sends it back)
            return False
        if isinstance(error, MovedError):  # (a kind of AskError)
            return False
        if isinstance(error, AskError):
            node = self._cluster.get_node(host=error.host, port=error.port)
            if node is None:  # (a node added for the resharding: known once the map is)
                return False
            self._asked.update(dict.fromkeys(keys, node))
            return True
        if isinstance(error, TryAgainError) and not read.key:
            self._split[read.slot] = owner
            return True
        return False

    def settle(self, owner: str, reads: Iterable[LiveRead], refused: Iterable[LiveRead]) -> None:
        """After ``owner`` answered: a split slot whose keys it served all (none moved
        or missing any longer) is read whole again."""
        split = {read.slot for read in reads if read.key and not read.asking}
        for read in refused:
            split.discard(read.slot)
        for slot in split:
            if self._split.get(slot) == owner:
                del self._split[slot]

    def forget(self, keys: Container[str], slots: Container[int]) -> None:
        """Drop the keys and slots no longer read (``keys``, ``slots``: those read now)."""
        for key in [key for key in self._asked if key not in keys]:
            del self._asked[key]
        for slot in [slot for slot in self._split if slot not in slots]:
            del self._split[slot]
