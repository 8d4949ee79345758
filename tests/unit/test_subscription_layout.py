"""How a subscription is laid out in memory: the hub's direct write reads a dozen of its
fields for every subscriber of a topic in a row (15,000 in the bench's broadcast), so it
keeps them in slots, not in an instance dict of its own."""

from __future__ import annotations

from broker.subscription import Subscription


def test_a_subscription_keeps_its_fields_in_slots() -> None:
    """With 33 fields an instance outgrew CPython's shared-key dicts (30 keys) and carried
    a dict of its own: 2.4 -> 1.8 us of Python per direct write with cold caches, 12.3-12.8
    -> 10.8-11.2 us of server CPU per delivery in the broadcast (bench/PERFORMANCE.md)."""
    subscription = Subscription(None, None, {"t": "now"})  # type: ignore[arg-type]
    assert not hasattr(subscription, "__dict__")
