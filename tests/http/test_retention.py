"""Retention by age: ``BROKER_RETENTION_SECONDS`` drops events older than that."""

from __future__ import annotations

import httpx

from tests.http.helpers import (
    new_topic,
)
from tests.support.broker_process import BrokerProcess
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer


def test_events_older_than_retention_seconds_are_dropped(redis_server: RedisServer) -> None:
    process = BrokerProcess(
        redis_url=redis_server.url, env={"BROKER_RETENTION_SECONDS": "1"}
    ).start()
    topic = new_topic()
    try:
        with httpx.Client(base_url=process.url, timeout=10) as client:
            old = client.post(f"/topics/{topic}/events", json={"data": "old"}).json()["id"]

            def old_is_gone() -> str | None:
                newer = client.post(f"/topics/{topic}/events", json={"data": "new"})
                assert newer.status_code == 201
                page = client.get(
                    f"/topics/{topic}/events", headers={"Accept": "application/json"}
                ).json()
                ids = [e["id"] for e in page["events"]]
                return None if old in ids else newer.json()["id"]

            newest = wait_until(old_is_gone, timeout=8, interval=0.25, what="never dropped")
            info = client.get(f"/topics/{topic}").json()
            assert info["last_id"] == newest and info["first_id"] != old
            # A cursor at the dropped event gets a "trimmed" gap, then what is retained.
            with client.stream(
                "GET",
                f"/topics/{topic}/events",
                headers={"Accept": "text/event-stream", "Last-Event-ID": old},
            ) as stream:
                data = next(
                    (line for _, line in zip(range(50), stream.iter_lines(), strict=False)
                     if line.startswith("data: ")),
                    None,
                )  # fmt: skip
            assert data is not None and '"reason":"trimmed"' in data, data
            # A history page from there says so too, naming the topic as the event does.
            page = client.get(
                f"/topics/{topic}/events",
                params={"after": old},
                headers={"Accept": "application/json"},
            ).json()
            gap = page["gap"]
            assert (gap["reason"], gap["requested"], gap["topic"]) == ("trimmed", old, topic), gap
            assert set(gap) == {"reason", "requested", "resumed_after", "topic"}
    finally:
        process.close()
