"""Per-topic retention and expiry: the first matching policy wins, over the defaults."""

from __future__ import annotations

import pytest

from broker.errors import InvalidInput
from broker.policy import Policies, Retention, TopicPolicy, compile_pattern

DEFAULT = Retention(maxlen=1000, max_age_ms=0, ttl_ms=0)


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("chat:*", "chat:42", True),
        ("chat:*", "chat:", True),
        ("chat:*", "xchat:42", False),
        ("*.log", "a.b.log", True),
        ("a.b", "aXb", False),  # "." is a character, not a wildcard
        ("exact", "exact", True),
        ("exact", "exactly", False),
    ],
)
def test_a_star_matches_any_run_of_characters(pattern: str, topic: str, matches: bool) -> None:
    assert bool(compile_pattern(pattern).fullmatch(topic)) is matches


def test_the_first_matching_policy_wins_and_fills_in_the_defaults() -> None:
    policies = Policies(
        DEFAULT,
        [
            TopicPolicy("chat:vip:*", ttl_seconds=86400),
            TopicPolicy("chat:*", maxlen=5, ttl_seconds=60),
        ],
    )
    assert policies.for_topic("chat:vip:1") == Retention(maxlen=1000, ttl_ms=86_400_000)
    assert policies.for_topic("chat:2") == Retention(maxlen=5, ttl_ms=60_000)
    assert policies.for_topic("orders") == DEFAULT
    assert policies.expiring


def test_without_any_ttl_nothing_expires() -> None:
    assert not Policies(DEFAULT, [TopicPolicy("a*", maxlen=3)]).expiring
    assert Policies(Retention(maxlen=10, ttl_ms=1000)).expiring


def test_a_policy_cannot_keep_nothing() -> None:
    with pytest.raises(InvalidInput):
        Policies(DEFAULT, [TopicPolicy("a*", maxlen=0)])


def test_trimming_waits_for_one_percent_more() -> None:
    assert Retention(maxlen=100_000).trim_slack == 1000
    assert Retention(maxlen=50).trim_slack == 1
