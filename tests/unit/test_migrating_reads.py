"""Where the Cluster live reader reads a migrating slot's topics (no server: the
replies are those measured on Redis 7.0, see ``MigratingReads``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.exceptions import AskError, MovedError, TryAgainError

from broker.redis_slots import LiveRead, MigratingReads

SLOT = 42


@dataclass(frozen=True)
class Node:
    name: str


class Cluster:
    """The cluster client's node lookup by address, for an ASK's node."""

    def __init__(self, *nodes: Node) -> None:
        self._nodes = {node.name: node for node in nodes}

    def get_node(self, host: str, port: int) -> Node | None:
        return self._nodes.get(f"{host}:{port}")


SOURCE, TARGET = Node("127.0.0.1:7000"), Node("127.0.0.1:7001")


def reads() -> MigratingReads:
    cluster: Any = Cluster(SOURCE, TARGET)
    return MigratingReads(cluster)


def place(migrating: MigratingReads, key: str, owner: Node = SOURCE) -> tuple[Any, LiveRead]:
    return migrating.place(key, SLOT, owner)  # type: ignore[arg-type]


def test_a_slot_not_migrating_is_read_whole_on_its_owner() -> None:
    assert place(reads(), "a") == (SOURCE, LiveRead(SLOT))


def test_a_slot_all_moved_is_read_key_by_key_on_the_importing_node_after_asking() -> None:
    migrating = reads()
    ask = AskError(f"{SLOT} 127.0.0.1:7001")
    assert migrating.follow(SOURCE.name, LiveRead(SLOT), ["a", "b"], ask)
    assert place(migrating, "a") == (TARGET, LiveRead(SLOT, "a", asking=True))
    assert place(migrating, "b") == (TARGET, LiveRead(SLOT, "b", asking=True))
    # Final, and the map knows it: the slot read whole on its new owner.
    assert place(migrating, "a", owner=TARGET) == (TARGET, LiveRead(SLOT))


def test_a_split_slot_is_read_key_by_key_until_its_owner_serves_them_all() -> None:
    migrating = reads()
    assert migrating.follow(SOURCE.name, LiveRead(SLOT), ["a", "b"], TryAgainError("TRYAGAIN"))
    assert place(migrating, "a") == (SOURCE, LiveRead(SLOT, "a"))
    ask = AskError(f"{SLOT} 127.0.0.1:7001")
    assert migrating.follow(SOURCE.name, LiveRead(SLOT, "a"), ["a"], ask)
    assert place(migrating, "a") == (TARGET, LiveRead(SLOT, "a", asking=True))
    still = [LiveRead(SLOT, "b")]
    migrating.settle(SOURCE.name, still, [])  # b served on the owner: whole again
    assert place(migrating, "b") == (SOURCE, LiveRead(SLOT))
    assert place(migrating, "a") == (TARGET, LiveRead(SLOT, "a", asking=True))


def test_refusals_a_migration_does_not_explain_are_failures() -> None:
    migrating = reads()
    moved = MovedError(f"{SLOT} 127.0.0.1:7001")
    assert not migrating.follow(SOURCE.name, LiveRead(SLOT), ["a"], moved)
    unknown = AskError(f"{SLOT} 127.0.0.1:7009")  # (known once the map is refreshed)
    assert not migrating.follow(SOURCE.name, LiveRead(SLOT), ["a"], unknown)
    assert place(migrating, "a") == (SOURCE, LiveRead(SLOT))


def test_an_asked_read_refused_is_read_on_the_owner_again() -> None:
    migrating = reads()
    migrating.follow(SOURCE.name, LiveRead(SLOT), ["a"], AskError(f"{SLOT} 127.0.0.1:7001"))
    asked = LiveRead(SLOT, "a", asking=True)
    assert not migrating.follow(TARGET.name, asked, ["a"], MovedError(f"{SLOT} 127.0.0.1:7000"))
    assert place(migrating, "a") == (SOURCE, LiveRead(SLOT))


def test_topics_no_longer_read_are_forgotten() -> None:
    migrating = reads()
    migrating.follow(SOURCE.name, LiveRead(SLOT), ["a"], AskError(f"{SLOT} 127.0.0.1:7001"))
    migrating.follow(SOURCE.name, LiveRead(SLOT + 1), ["b"], TryAgainError("TRYAGAIN"))
    migrating.forget(keys=set(), slots=set())
    assert place(migrating, "a") == (SOURCE, LiveRead(SLOT))
    assert migrating.place("b", SLOT + 1, SOURCE) == (SOURCE, LiveRead(SLOT + 1))  # type: ignore[arg-type]
