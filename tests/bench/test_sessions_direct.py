"""The sessions scenario's direct mode publishes with the settings the broker runs with."""

from __future__ import annotations

import orjson

from bench.config import QUICK, server_env
from bench.lifecycle_scenarios import direct_options


def test_direct_publisher_gets_the_brokers_ttl_retention_and_policies() -> None:
    policies = [{"pattern": "bench.*", "maxlen": 50, "ttl_seconds": 3}]
    env = server_env("sessions", QUICK) | {
        "BROKER_RETENTION_MAXLEN": "500",
        "BROKER_TOPIC_POLICIES": orjson.dumps(policies).decode(),
    }
    options, unhonoured = direct_options(env)
    assert options["topic_ttl_seconds"] == QUICK.sessions_ttl_s
    assert options["retention_maxlen"] == 500
    assert options["topic_policies"] == [policies[0] | {"max_age_seconds": None}]
    assert unhonoured == []


def test_what_the_direct_publisher_cannot_honour_is_said() -> None:
    _, unhonoured = direct_options({"BROKER_PUBLISH_DURABILITY": "replicated"})
    assert len(unhonoured) == 1 and "publish_durability=replicated" in unhonoured[0]
