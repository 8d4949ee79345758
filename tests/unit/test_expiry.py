"""The live reader's expiry schedule: when to look whether a live topic expired."""

from __future__ import annotations

from broker.expiry import EXPIRY_MARGIN_S, ExpiryWatch


def test_a_topic_is_due_after_its_expiry_and_margin() -> None:
    watch = ExpiryWatch()
    watch.note("a", now=100.0, expires_in_s=10)
    assert watch.due(110.0) == []
    assert watch.seconds_until_next(110.0) == EXPIRY_MARGIN_S
    assert watch.due(110.0 + EXPIRY_MARGIN_S) == ["a"]
    assert watch.due(1000.0) == [] and len(watch) == 0


def test_a_topic_noted_again_moves_and_its_old_note_is_ignored() -> None:
    watch = ExpiryWatch()
    watch.note("a", now=0.0, expires_in_s=1)
    watch.note("a", now=5.0, expires_in_s=1)  # an append moved its expiry
    assert watch.due(3.0) == []
    assert watch.due(7.0) == ["a"]


def test_a_forgotten_topic_is_never_due() -> None:
    watch = ExpiryWatch()
    watch.note("a", now=0.0, expires_in_s=1)
    watch.forget("a")
    assert watch.due(100.0) == [] and watch.seconds_until_next(100.0) is None


def test_many_moves_keep_the_heap_small() -> None:
    watch = ExpiryWatch()
    for step in range(10_000):
        watch.note("a", now=float(step), expires_in_s=1)
    assert len(watch._heap) < 200
    assert watch.due(20_000.0) == ["a"]
