"""Large events through a real broker process: a resumed stream and the history both
page through them (a page holds a few of them: lua/range.lua reads it in steps), and
every event after the cursor comes once, in order."""

from __future__ import annotations

import json

import httpx

from tests.http.helpers import new_topic, publish_json, subscribe

LARGE = 60_000
EVENTS = 300
RESUMED_AFTER = 99  # a cursor in the middle of the log
BATCH = 15  # 15 events of 60 KB: under the 1 MiB body limit


async def _publish_large(client: httpx.AsyncClient, topic: str) -> list[str]:
    ids: list[str] = []
    for first in range(0, EVENTS, BATCH):
        batch = [{"data": f"{n:04d}{'x' * LARGE}"} for n in range(first, first + BATCH)]
        ids += (await publish_json(client, topic, batch))["ids"]
    return ids


async def test_a_resumed_stream_and_the_history_page_through_large_events_exactly(
    aclient: httpx.AsyncClient,
) -> None:
    topic = new_topic()
    ids = await _publish_large(aclient, topic)
    wanted = ids[RESUMED_AFTER + 1 :]
    async with subscribe(aclient, topic, last_event_id=ids[RESUMED_AFTER]) as stream:
        events = await stream.take(len(wanted))
    assert [event.id for event in events] == wanted
    datas = [json.loads(event.data) for event in events]
    assert [int(data[:4]) for data in datas] == list(range(RESUMED_AFTER + 1, EVENTS))
    assert {len(data) for data in datas} == {4 + LARGE}
    assert await _history_ids(aclient, topic, ids[RESUMED_AFTER]) == wanted


async def _history_ids(client: httpx.AsyncClient, topic: str, after: str) -> list[str]:
    """The ids of every history page of ``?limit=1000`` after ``after``, following
    ``next``: pages of at most 1 MiB of event data, so some 17 events each."""
    seen: list[str] = []
    cursor: str | None = after
    for _ in range(EVENTS):
        response = await client.get(
            f"/topics/{topic}/events",
            params={"after": cursor, "limit": 1000},
            headers={"Accept": "application/json"},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["events"]) < 1000 and "gap" not in body
        seen += [event["id"] for event in body["events"]]
        cursor = body["next"]
        if cursor is None:
            return seen
    raise AssertionError(f"the history never ended after {len(seen)} events")
