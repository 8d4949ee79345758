"""Per-topic policies (``broker.policy``), the expiry schedule (``broker.expiry``) and
the ``BROKER_TOPIC_POLICIES`` setting: pure, no server."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys

import pytest
from pydantic import ValidationError

from api.settings import Settings, describe
from broker.errors import InvalidInput
from broker.expiry import EXPIRY_MARGIN_S, ExpiryWatch
from broker.policy import Policies, Retention, TopicPattern, TopicPolicy

DEFAULT = Retention(maxlen=100, max_age_ms=0, ttl_ms=0)


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("chat:*", "chat:1", True),
        ("chat:*", "chat:", True),
        ("chat:*", "xchat:1", False),  # the whole name, not a part of it
        ("chat:*", "chat", False),
        ("*:gen", "a.b:gen", True),
        ("a.b", "aXb", False),  # "." is a character of a name, not any character
        ("a*b*c", "a-b-c", True),
        ("a*b*c", "a-c", False),
        ("exact", "exact", True),
    ],
)
def test_a_pattern_matches_whole_names_with_star_as_any_run(
    pattern: str, topic: str, matches: bool
) -> None:
    assert bool(TopicPattern(pattern).fullmatch(topic)) is matches


def test_a_pattern_matches_as_the_regular_expression_it_replaced() -> None:
    """Every pattern of up to 5 symbols of ``a b * :`` against every name of up to 6 of
    ``a b :``, beside ``.*`` per star, escaped, as a fullmatch (what it was)."""

    def words(symbols: str, longest: int) -> list[str]:
        return [
            "".join(w) for n in range(longest + 1) for w in itertools.product(symbols, repeat=n)
        ]

    names = words("ab:", 6)
    for pattern in words("ab*:", 5):
        regex = re.compile(".*".join(map(re.escape, pattern.split("*"))))
        ours = TopicPattern(pattern)
        for name in names:
            assert ours.fullmatch(name) is (regex.fullmatch(name) is not None), (pattern, name)


ADVERSARIAL = """
from api.auth import TopicPatterns
from broker.policy import TopicPattern
name = ":" * 199 + "y"  # every ":" a place each star could end
assert not TopicPattern("*:*:*:*:*:*:*:z").fullmatch(name)
assert not TopicPatterns(["t:*:*:*:*:*:*:z", "*:*:*:*:*:*:*:z"]).allows(name)
"""


def test_a_pattern_ends_whatever_the_name() -> None:
    """A regular expression took 27 s to refuse a 200-character name with five stars
    (``*:*:*:*:*:z``), its process frozen meanwhile; seven would not end in an hour.
    A public pattern is matched before any token: the name is anyone's."""
    done = subprocess.run(
        [sys.executable, "-c", ADVERSARIAL], timeout=60, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("rules", [[], [TopicPolicy("chat:*", maxlen=5)]], ids=["none", "one"])
def test_the_policies_remember_few_topics(rules: list[TopicPolicy]) -> None:
    """The policies' cache kept every topic name seen, up to 65,536 (24 MB of 200-character
    names, for the life of the process, topics long gone included); with no rule to
    match it keeps none."""
    policies = Policies(DEFAULT, rules)
    for n in range(10_000):
        assert policies.for_topic(f"chat:{n}").maxlen == (5 if rules else DEFAULT.maxlen)
    cache_info = getattr(policies.for_topic, "cache_info", None)
    held = cache_info().currsize if cache_info else 0
    assert held <= (4096 if rules else 0)


def test_the_first_matching_policy_wins_over_the_defaults() -> None:
    policies = Policies(
        DEFAULT,
        [
            TopicPolicy("chat:vip:*", maxlen=1000),
            TopicPolicy("chat:*", ttl_seconds=1.5, maxlen=5),
            TopicPolicy("*", max_age_seconds=60),
        ],
    )
    assert policies.for_topic("chat:vip:1") == Retention(maxlen=1000)  # unset fields: defaults
    assert policies.for_topic("chat:2") == Retention(maxlen=5, ttl_ms=1500)
    assert policies.for_topic("other") == Retention(maxlen=100, max_age_ms=60_000)
    assert policies.expiring


def test_no_policies_and_no_ttl_expire_nothing() -> None:
    policies = Policies(DEFAULT)
    assert policies.for_topic("anything") == DEFAULT and not policies.expiring
    assert Policies(Retention(maxlen=1, ttl_ms=10)).expiring


def test_a_policy_with_maxlen_under_one_is_refused() -> None:
    with pytest.raises(InvalidInput, match="maxlen"):
        Policies(DEFAULT, [TopicPolicy("x*", maxlen=0)])


@pytest.mark.parametrize(
    "value",
    [
        '[{"pattern": "chat:*", "ttl": 1}]',
        '[{"pattern": "chat/*"}]',
        '[{"pattern": ""}]',
        '[{"maxlen": 5}]',
        '[{"pattern": "a", "maxlen": 0}]',
        '[{"pattern": "a", "ttl_seconds": 0}]',
        '[{"pattern": "a", "max_age_seconds": -1}]',
        '[{"pattern": "a", "ttl_seconds": 1e999}]',  # (infinity: never)
        '{"pattern": "a"}',
    ],
)
def test_bad_topic_policies_are_refused_by_the_settings(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_TOPIC_POLICIES", value)
    with pytest.raises(ValidationError, match="topic_policies"):
        Settings()


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ('[{"pattern": "a*"}, {"pattern": "b*", "maxlen": 0}]', "BROKER_TOPIC_POLICIES[1].maxlen"),
        ('[{"pattern": "a*", "ttl": 1}]', "BROKER_TOPIC_POLICIES[0].ttl"),
    ],
)
def test_a_bad_policy_is_named_by_its_place_and_member(
    value: str, named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It said "BROKER_TOPIC_POLICIES: Input should be greater than or equal to 1": of
    which policy, which member, was for the operator to find."""
    monkeypatch.setenv("BROKER_TOPIC_POLICIES", value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert describe(refused.value).startswith(f"invalid settings: {named}: ")


def test_good_topic_policies_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "BROKER_TOPIC_POLICIES", '[{"pattern": "chat:*", "ttl_seconds": 1, "maxlen": 5}]'
    )
    monkeypatch.setenv("BROKER_TOPIC_TTL_SECONDS", "")
    settings = Settings()
    [policy] = settings.topic_policies
    assert (policy.pattern, policy.ttl_seconds, policy.maxlen) == ("chat:*", 1, 5)
    assert settings.topic_ttl_seconds is None


# -- the expiry schedule --------------------------------------------------------------


def test_a_topic_is_due_once_its_ttl_and_the_margin_passed() -> None:
    watch = ExpiryWatch()
    watch.note("a", now=100.0, expires_in_s=1.0)
    watch.note("b", now=100.0, expires_in_s=3.0)
    assert watch.seconds_until_next(100.0) == pytest.approx(1.0 + EXPIRY_MARGIN_S)
    assert watch.due(100.0 + 1.0 + EXPIRY_MARGIN_S - 0.01) == []
    assert watch.due(100.0 + 1.0 + EXPIRY_MARGIN_S) == ["a"]
    assert watch.due(200.0) == ["b"]
    assert watch.due(300.0) == [] and len(watch) == 0
    assert watch.seconds_until_next(300.0) is None


def test_a_topic_noted_again_moves_and_a_forgotten_one_is_never_due() -> None:
    watch = ExpiryWatch()
    watch.note("moved", now=0.0, expires_in_s=1.0)
    watch.note("moved", now=0.8, expires_in_s=1.0)  # an append moved its expiry
    watch.note("gone", now=0.0, expires_in_s=1.0)
    watch.forget("gone")
    assert watch.due(0.0 + 1.0 + EXPIRY_MARGIN_S) == []  # the old note is stale
    assert watch.seconds_until_next(1.6) == pytest.approx(0.8 + 1.0 + EXPIRY_MARGIN_S - 1.6)
    assert watch.due(0.8 + 1.0 + EXPIRY_MARGIN_S) == ["moved"]
    assert len(watch) == 0


def test_the_schedule_stays_small_when_topics_are_noted_many_times() -> None:
    watch = ExpiryWatch()
    for step in range(10_000):
        watch.note(f"t{step % 10}", now=float(step), expires_in_s=1.0)
    assert len(watch) == 10
    assert len(watch._heap) <= 4 * 10 + 64 + 1
    assert sorted(watch.due(1e9)) == [f"t{n}" for n in range(10)]


def test_trimming_waits_for_one_percent_more() -> None:
    assert Retention(maxlen=100_000).trim_slack == 1000
    assert Retention(maxlen=50).trim_slack == 1
