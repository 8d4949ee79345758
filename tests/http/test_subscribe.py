"""Subscribe: ``GET /topics/{topic}/events`` as Server-Sent Events, with resume and gaps."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time

import httpx
import pytest

from tests.http.conftest import HEARTBEAT, RETENTION_MAXLEN
from tests.http.helpers import (
    SseStream,
    assert_id,
    assert_problem,
    new_topic,
    publish_json,
    publish_many,
    raw_request,
    subscribe,
)
from tests.http.test_lifecycle import PATHS, open_stream
from tests.support.broker_process import BrokerProcess
from tests.support.sse import ORIGIN_CURSOR, parse_sse

EVENT_STREAM = {"Accept": "text/event-stream"}
BEAT_EVENT = b"event: broker.beat\ndata: 1\n\n"
"""The module's broker's heartbeat (1 s) as an event: the interval, and no id line."""


async def _history_ids(client: httpx.AsyncClient, topic: str) -> list[str]:
    response = await client.get(
        f"/topics/{topic}/events", params={"limit": 1000}, headers={"Accept": "application/json"}
    )
    assert response.status_code == 200, response.text
    return [event["id"] for event in response.json()["events"]]


# -- the response ------------------------------------------------------------------


async def test_stream_headers_and_a_retry_hint_first(http_broker: BrokerProcess) -> None:
    stream = await raw_request(
        http_broker.url + f"/topics/{new_topic()}/events", headers=EVENT_STREAM
    )
    try:
        assert stream.status == 200
        assert stream.headers["content-type"].split(";")[0].strip() == "text/event-stream"
        assert stream.headers["cache-control"] == "no-cache, no-transform"
        assert stream.headers["x-accel-buffering"] == "no"
        await stream.read_until(b"\n\n")
        assert re.match(rb"retry: \d+\n\n", bytes(stream.body)), bytes(stream.body)
    finally:
        await stream.close()


@pytest.mark.parametrize("how", PATHS)
async def test_a_stream_says_the_brokers_heartbeat_interval(
    http_broker: BrokerProcess, how: str
) -> None:
    """``Broker-Heartbeat``, on both stream paths: this broker beats every 1 s, not the
    default 15 s, and a client no longer has to guess it (the Python subscriber took
    45 s of silence for a dead stream, whatever the interval)."""
    stream = await open_stream(http_broker, f"/topics/{new_topic()}/events", how)
    try:
        assert stream.status == 200, stream.status
        assert stream.count("broker-heartbeat") == 1, stream.names
        assert stream.headers["broker-heartbeat"] == HEARTBEAT["BROKER_HEARTBEAT_SECONDS"]
    finally:
        await stream.close()


async def test_the_head_of_a_stream_says_the_heartbeat_interval(
    aclient: httpx.AsyncClient,
) -> None:
    """A HEAD answers the head its GET would: the interval included."""
    for path in (f"/topics/{new_topic()}/events", f"/events?topic={new_topic()}"):
        response = await aclient.head(path, headers=EVENT_STREAM)
        assert response.status_code == 200, response.status_code
        assert response.headers["broker-heartbeat"] == HEARTBEAT["BROKER_HEARTBEAT_SECONDS"]


@pytest.mark.parametrize(
    "accept",
    [None, "*/*", "text/event-stream", "text/*", "text/event-stream, application/json;q=0.9"],
)
async def test_a_get_is_a_subscription_unless_json_is_preferred(
    http_broker: BrokerProcess, accept: str | None
) -> None:
    headers = {"Accept": accept} if accept is not None else {}
    stream = await raw_request(http_broker.url + f"/topics/{new_topic()}/events", headers=headers)
    try:
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
    finally:
        await stream.close()


@pytest.mark.parametrize(
    "accept",
    ["application/json", "application/json, text/event-stream;q=0.5", "application/*"],
)
async def test_accept_json_gets_the_history_page(aclient: httpx.AsyncClient, accept: str) -> None:
    topic = new_topic()
    [event_id] = await publish_many(aclient, topic, [1])
    response = await aclient.get(f"/topics/{topic}/events", headers={"Accept": accept})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["events"] == [{"id": event_id, "event": None, "data": 1}]


async def test_a_heartbeat_comment_at_least_every_heartbeat_interval(
    http_broker: BrokerProcess,
) -> None:
    """The module's broker has BROKER_HEARTBEAT_SECONDS=1."""
    stream = await raw_request(
        http_broker.url + f"/topics/{new_topic()}/events", headers=EVENT_STREAM
    )
    try:
        await stream.read_until(b"\n\n")  # the retry hint
        await stream.read_until(ORIGIN_CURSOR)  # the cursor, once caught up (no log yet)
        for _ in range(3):
            started, seen = time.monotonic(), len(stream.body)
            await stream.read_chunk(timeout=2.5)
            chunk = bytes(stream.body[seen:])
            assert chunk.startswith(b":") and chunk.endswith(b"\n\n"), chunk
            assert time.monotonic() - started < 2.5
    finally:
        await stream.close()


@pytest.mark.parametrize("query", ["", "?heartbeat=event"])
async def test_a_stream_busy_with_events_gets_its_heartbeats_too(
    http_broker: BrokerProcess, aclient: httpx.AsyncClient, query: str
) -> None:
    """The contract: comments "at least every BROKER_HEARTBEAT_SECONDS" (1 s here). A
    stream that got an event every 0.1 s got none (only idle streams were beaten): a
    client or proxy that watches for comments took it for dead. A stream whose beats are
    events gets them in front of its events alike (a page watches for nothing else)."""
    topic = new_topic()
    beat = BEAT_EVENT if query else b":"
    stream = await raw_request(
        http_broker.url + f"/topics/{topic}/events{query}", headers=EVENT_STREAM
    )

    async def publish_every_tenth_of_a_second() -> None:
        for n in range(40):
            await publish_many(aclient, topic, [n])
            await asyncio.sleep(0.1)

    try:
        await stream.read_until(ORIGIN_CURSOR)  # live (no log yet)
        publishing = asyncio.create_task(publish_every_tenth_of_a_second())
        started, beats, events = time.monotonic(), [], 0
        while not publishing.done():  # (bounded: 40 publishes)
            with contextlib.suppress(TimeoutError):
                chunk = await stream.read_chunk(timeout=0.5)
                assert chunk is not None
                events += chunk.count(b"\nid: ") + chunk.startswith(b"id: ")
                if chunk.startswith(beat):
                    beats.append(time.monotonic())
        await publishing
    finally:
        await stream.close()
    assert events >= 30  # the stream was busy all along
    times = [started, *beats]
    assert len(beats) >= 3 and max(b - a for a, b in itertools.pairwise(times)) < 1.6


@pytest.mark.parametrize("how", PATHS)
async def test_a_stream_asking_for_event_beats_gets_broker_beat_events_with_no_id(
    http_broker: BrokerProcess, how: str
) -> None:
    """``?heartbeat=event`` (what /client.js asks): an EventSource hands a page no comment,
    so each heartbeat is a ``broker.beat`` event instead, whose data is the interval; the
    first right after the retry hint (a page learns the interval at once); with no id
    line (the Last-Event-ID a reconnect sends stays the last event's)."""
    path = f"/topics/{new_topic()}/events?heartbeat=event"
    stream = await open_stream(http_broker, path, how)
    try:
        await stream.read_until(ORIGIN_CURSOR)  # the cursor, once caught up (no log yet)
        opening = re.match(rb"retry: \d+\n\n" + re.escape(BEAT_EVENT), bytes(stream.body))
        assert opening is not None, bytes(stream.body)
        for _ in range(3):
            started = time.monotonic()
            chunk = await stream.read_chunk(timeout=2.5)
            assert chunk == BEAT_EVENT
            assert time.monotonic() - started < 2.5
        assert b"\n:" not in stream.body and not stream.body.startswith(b":")  # no comment
    finally:
        await stream.close()


@pytest.mark.parametrize("how", PATHS)
@pytest.mark.parametrize("query", ["", "?heartbeat=comment"])
async def test_a_stream_not_asking_for_event_beats_is_sent_what_it_always_was(
    http_broker: BrokerProcess, how: str, query: str
) -> None:
    """A plain EventSource gets exactly what it got: the retry hint, its cursor, then
    ``:`` comments, and no ``broker.beat``."""
    stream = await open_stream(http_broker, f"/topics/{new_topic()}/events{query}", how)
    try:
        await stream.read_until(ORIGIN_CURSOR)
        assert re.fullmatch(rb"retry: \d+\n\n" + ORIGIN_CURSOR.pattern, bytes(stream.body))
        for _ in range(2):
            assert await stream.read_chunk(timeout=2.5) == b":\n\n"
        assert b"broker.beat" not in stream.body
    finally:
        await stream.close()


async def test_a_heartbeat_other_than_comment_or_event_is_refused(
    aclient: httpx.AsyncClient,
) -> None:
    for path, params in (
        (f"/topics/{new_topic()}/events", {"heartbeat": "events"}),
        ("/events", {"topic": new_topic(), "heartbeat": ""}),
    ):
        response = await aclient.get(path, params=params, headers=EVENT_STREAM)
        assert "heartbeat" in assert_problem(response, 400)["detail"], response.text


# -- where a stream starts ------------------------------------------------------------


async def test_a_topic_with_no_events_gets_its_first_event_live(aclient: httpx.AsyncClient) -> None:
    topic = new_topic()
    async with subscribe(aclient, topic) as stream:
        [event_id] = await publish_many(aclient, topic, [{"first": True}])
        event = await stream.next()
        assert (event.id, event.event, event.data) == (event_id, "message", '{"first":true}')
        [second] = await publish_many(aclient, topic, [2])
        assert (await stream.next()).id == second


async def test_without_a_cursor_only_later_events_come(aclient: httpx.AsyncClient) -> None:
    topic = new_topic()
    await publish_many(aclient, topic, ["old-1", "old-2"])
    async with subscribe(aclient, topic) as stream:
        ids = await publish_many(aclient, topic, ["new-1", "new-2"])
        events = await stream.take(2)
        assert [(e.id, e.data) for e in events] == [(ids[0], '"new-1"'), (ids[1], '"new-2"')]


async def test_last_event_id_header_resumes_exactly_after_it(aclient: httpx.AsyncClient) -> None:
    topic = new_topic()
    ids = await publish_many(aclient, topic, list(range(6)))
    async with subscribe(aclient, topic, last_event_id=ids[2]) as stream:
        assert [e.id for e in await stream.take(3)] == ids[3:]
        [live] = await publish_many(aclient, topic, ["live"])
        event = await stream.next()
        assert (event.id, event.data) == (live, '"live"')


async def test_last_event_id_query_parameter_resumes_too(aclient: httpx.AsyncClient) -> None:
    topic = new_topic()
    ids = await publish_many(aclient, topic, list(range(4)))
    async with subscribe(aclient, topic, params={"last_event_id": ids[1]}) as stream:
        assert [e.id for e in await stream.take(2)] == ids[2:]
        [live] = await publish_many(aclient, topic, ["live"])
        assert (await stream.next()).id == live


async def test_the_header_beats_the_query_parameter(aclient: httpx.AsyncClient) -> None:
    topic = new_topic()
    ids = await publish_many(aclient, topic, list(range(4)))
    params = {"last_event_id": ids[0], "from": "earliest"}
    async with subscribe(aclient, topic, last_event_id=ids[2], params=params) as stream:
        assert (await stream.next()).id == ids[3]
        [live] = await publish_many(aclient, topic, ["live"])
        assert (await stream.next()).id == live


async def test_the_query_parameter_beats_from_earliest(aclient: httpx.AsyncClient) -> None:
    topic = new_topic()
    ids = await publish_many(aclient, topic, list(range(3)))
    params = {"last_event_id": ids[1], "from": "earliest"}
    async with subscribe(aclient, topic, params=params) as stream:
        assert (await stream.next()).id == ids[2]


async def test_from_earliest_sends_the_whole_history_then_live(aclient: httpx.AsyncClient) -> None:
    topic = new_topic()
    ids = await publish_many(aclient, topic, list(range(5)))
    async with subscribe(aclient, topic, params={"from": "earliest"}) as stream:
        assert [e.id for e in await stream.take(5)] == ids
        [live] = await publish_many(aclient, topic, ["live"])
        assert (await stream.next()).id == live


async def test_from_earliest_on_an_empty_topic_waits_for_the_first(
    aclient: httpx.AsyncClient,
) -> None:
    topic = new_topic()
    async with subscribe(aclient, topic, params={"from": "earliest"}) as stream:
        [first] = await publish_many(aclient, topic, ["first"])
        event = await stream.next()
        assert (event.id, event.event) == (first, "message")


async def test_resuming_from_the_last_id_sends_nothing_old(aclient: httpx.AsyncClient) -> None:
    topic = new_topic()
    ids = await publish_many(aclient, topic, [1, 2])
    async with subscribe(aclient, topic, last_event_id=ids[-1]) as stream:
        [live] = await publish_many(aclient, topic, [3])
        assert (await stream.next()).id == live


async def test_every_reconnect_resumes_with_no_gap_and_no_duplicate(
    aclient: httpx.AsyncClient,
) -> None:
    topic = new_topic()
    published = await publish_many(aclient, topic, ["a"])
    received: list[str] = []
    cursor = published[0]
    received.append(cursor)
    for round_ in range(4):
        published += await publish_many(aclient, topic, [f"gone-{round_}", f"gone2-{round_}"])
        async with subscribe(aclient, topic, last_event_id=cursor) as stream:
            events = await stream.take(2)
            published += await publish_many(aclient, topic, [f"live-{round_}"])
            events.append(await stream.next())
        received += [e.id for e in events]
        cursor = received[-1]
    assert received == published
    assert received == await _history_ids(aclient, topic)


MALFORMED_IDS = [
    "garbage",
    "1-0",
    "abc.1-0",
    "ABCDEFGH.1-0",
    "abcdefgh.1",
    "abcdefgh.1-0-0",
    "abcdefgh.-1-0",
    "abcdefgh.1-x",
    "abcdefgh.99999999999999999999999-0",
    "abcdefgh.1-0,abcdefgh.2-0",
    "t~garbage",
    "~abcdefgh.1-0",
]


@pytest.mark.parametrize("bad", MALFORMED_IDS)
async def test_a_malformed_last_event_id_is_400(aclient: httpx.AsyncClient, bad: str) -> None:
    topic = new_topic()
    path = f"/topics/{topic}/events"
    assert_problem(await aclient.get(path, headers={**EVENT_STREAM, "Last-Event-ID": bad}), 400)
    assert_problem(
        await aclient.get(path, headers=EVENT_STREAM, params={"last_event_id": bad}), 400
    )
    multi = await aclient.get(
        "/events",
        params={"topic": [topic, new_topic()]},
        headers={**EVENT_STREAM, "Last-Event-ID": bad},
    )
    assert_problem(multi, 400)


# -- gaps -------------------------------------------------------------------------


def _gap(event_data: str) -> dict[str, object]:
    data = json.loads(event_data)
    assert isinstance(data, dict)
    return data


def _other_epoch(event_id: str) -> str:
    epoch, _, position = event_id.partition(".")
    other = "abcdefgh" if epoch != "abcdefgh" else "bcdefghi"
    return f"{other}.{position}"


async def test_an_id_with_an_unknown_epoch_gets_an_unknown_gap(aclient: httpx.AsyncClient) -> None:
    topic = new_topic()
    ids = await publish_many(aclient, topic, [1, 2, 3])
    requested = _other_epoch(ids[0])
    async with subscribe(aclient, topic, last_event_id=requested) as stream:
        gap = await stream.next()
        assert gap.event == "broker.gap"
        data = _gap(gap.data)
        assert (data["reason"], data["requested"], data["resumed_after"]) == (
            "unknown",
            requested,
            None,
        )
        assert [e.id for e in await stream.take(3)] == ids  # from the oldest retained
        [live] = await publish_many(aclient, topic, [4])
        assert (await stream.next()).id == live


async def test_an_id_of_another_topic_gets_an_unknown_gap(aclient: httpx.AsyncClient) -> None:
    topic, other = new_topic(), new_topic()
    [foreign] = await publish_many(aclient, other, ["elsewhere"])
    ids = await publish_many(aclient, topic, [1, 2])
    async with subscribe(aclient, topic, last_event_id=foreign) as stream:
        gap = await stream.next()
        assert gap.event == "broker.gap"
        data = _gap(gap.data)
        assert (data["reason"], data["requested"]) == ("unknown", foreign)
        assert [e.id for e in await stream.take(2)] == ids


@pytest.mark.parametrize("path", ["/topics/{topic}/events", "/events?topic={topic}"])
@pytest.mark.parametrize("position", ["an-event", "the-origin"])
async def test_a_cursor_of_other_topics_only_gets_an_unknown_gap(
    aclient: httpx.AsyncClient, path: str, position: str
) -> None:
    """A multi-topic cursor that names none of the stream's topics is another stream's:
    the stream started "from now" with nothing said, as if there were no cursor (and a
    review found the first fix replayed all with no gap for a cursor at the origin)."""
    topic, other = new_topic(), new_topic()
    [foreign] = await publish_many(aclient, other, ["elsewhere"])
    await publish_many(aclient, topic, [1, 2])
    foreign = foreign if position == "an-event" else "0.0-0"
    headers = {"Accept": "text/event-stream", "Last-Event-ID": f"{other}~{foreign}"}
    async with aclient.stream("GET", path.format(topic=topic), headers=headers) as response:
        assert response.status_code == 200
        events = await _first_events(response, 3)
    assert events[0].get("event") == "broker.gap"
    assert _gap(events[0]["data"])["reason"] == "unknown"
    assert [e["data"] for e in events[1:]] == ["1", "2"]


async def _first_events(response: httpx.Response, count: int) -> list[dict[str, str]]:
    received = ""
    async for text in response.aiter_text():
        received += text
        events = parse_sse(received)
        if len(events) >= count:
            return events[:count]
    raise AssertionError(f"the stream ended: {received!r}")


async def test_an_id_past_the_end_of_the_log_gets_an_unknown_gap_and_resumes_from_the_end(
    aclient: httpx.AsyncClient,
) -> None:
    """The log's tail was lost: no replay of the history the client already saw."""
    topic = new_topic()
    ids = await publish_many(aclient, topic, [1, 2])
    epoch, _, position = ids[-1].partition(".")
    ms = int(position.split("-")[0])
    future = f"{epoch}.{ms + 10_000_000}-0"
    async with subscribe(aclient, topic, last_event_id=future) as stream:
        gap = await stream.next()
        assert gap.event == "broker.gap"
        assert _gap(gap.data)["reason"] == "unknown"
        assert _gap(gap.data)["resumed_after"] == ids[-1] == gap.id
        [live] = await publish_many(aclient, topic, [3])
        assert (await stream.next()).id == live


async def test_an_unknown_id_on_a_topic_with_no_events_never_waits_silently(
    aclient: httpx.AsyncClient,
) -> None:
    topic = new_topic()
    async with subscribe(aclient, topic, last_event_id="abcdefgh.1700000000000-0") as stream:
        gap = await stream.next()
        assert gap.event == "broker.gap"
        data = _gap(gap.data)
        assert (data["reason"], data["requested"], data["resumed_after"]) == (
            "unknown",
            "abcdefgh.1700000000000-0",
            None,
        )
        [first] = await publish_many(aclient, topic, ["first"])
        assert (await stream.next()).id == first


async def test_a_trimmed_cursor_gets_a_trimmed_gap_then_the_oldest_retained(
    retention_broker: BrokerProcess,
) -> None:
    topic = new_topic()
    async with httpx.AsyncClient(base_url=retention_broker.url, timeout=10) as client:
        ids = await publish_many(client, topic, list(range(4 * RETENTION_MAXLEN)))
        retained = await _history_ids(client, topic)
        assert len(retained) >= RETENTION_MAXLEN, "keeps at least the newest MAXLEN events"
        assert retained == ids[-len(retained) :]
        assert len(retained) < len(ids), "older events are trimmed"
        info = (await client.get(f"/topics/{topic}")).json()
        assert (info["length"], info["first_id"], info["last_id"]) == (
            len(retained),
            retained[0],
            ids[-1],
        )
        requested = ids[1]
        async with subscribe(client, topic, last_event_id=requested) as stream:
            gap = await stream.next()
            assert gap.event == "broker.gap"
            data = _gap(gap.data)
            assert data["reason"] == "trimmed"
            assert data["requested"] == requested
            assert data["resumed_after"] == ids[len(ids) - len(retained) - 1]
            assert [e.id for e in await stream.take(len(retained))] == retained
            [live] = await publish_many(client, topic, ["live"])
            assert (await stream.next()).id == live
        # A cursor that is still retained resumes without a gap.
        async with subscribe(client, topic, last_event_id=ids[-2]) as stream:
            assert (await stream.next()).id == ids[-1]


# -- what is on the wire --------------------------------------------------------------

TEXTS = [
    ("lf", "a\nb", "a\nb"),
    ("cr", "a\rb", "a\nb"),
    ("crlf", "a\r\nb", "a\nb"),
    ("mixed", "1\r\n2\r3\n4", "1\n2\n3\n4"),
    ("blank-lines", "a\n\n\nb", "a\n\n\nb"),
    ("trailing-newline", "end\n", "end\n"),
    ("leading-newline", "\nstart", "\nstart"),
    ("only-newline", "\n", "\n"),
    ("empty", "", ""),
    ("leading-space", "  two spaces", "  two spaces"),
    ("colon-first", ": not a comment", ": not a comment"),
    ("field-like", "id: 7\nevent: x\nretry: 1", "id: 7\nevent: x\nretry: 1"),
    ("unicode", "héllo ✓ \u2028 𝄞", "héllo ✓ \u2028 𝄞"),
]


async def test_text_comes_back_exactly_with_line_breaks_as_lf(aclient: httpx.AsyncClient) -> None:
    topic = new_topic()
    ids = []
    for _, text, _ in TEXTS:
        response = await aclient.post(
            f"/topics/{topic}/events",
            content=text.encode(),
            headers={"Content-Type": "text/plain; charset=utf-8"},
        )
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    async with subscribe(aclient, topic, params={"from": "earliest"}) as stream:
        events = await stream.take(len(TEXTS))
    got = {name: event.data for (name, _, _), event in zip(TEXTS, events, strict=True)}
    assert got == {name: expected for name, _, expected in TEXTS}
    assert [e.id for e in events] == ids


async def test_json_data_is_sent_as_compact_json(aclient: httpx.AsyncClient) -> None:
    topic = new_topic()
    body = (
        b'{\n  "data": {"b": [1, 2, {"c": null}],\n "a": "x y\\nz", "u": "\\u00e9"},'
        b'\n  "event": "t"}'
    )
    response = await aclient.post(
        f"/topics/{topic}/events", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 201
    async with subscribe(aclient, topic, params={"from": "earliest"}) as stream:
        event = await stream.next()
    assert event.data == '{"b":[1,2,{"c":null}],"a":"x y\\nz","u":"é"}'
    assert event.event == "t"


async def test_event_type_retry_and_id_lines_on_the_wire(http_broker: BrokerProcess) -> None:
    topic = new_topic()
    async with httpx.AsyncClient(base_url=http_broker.url, timeout=10) as client:
        batch = [
            {"data": 1, "event": "typed"},
            {"data": 2},
            {"data": 3, "retry": 1500},
        ]
        ids = (await publish_json(client, topic, batch))["ids"]
    stream = await raw_request(
        http_broker.url + f"/topics/{topic}/events?from=earliest", headers=EVENT_STREAM
    )
    try:
        await stream.read_until(f"id: {ids[-1]}\n".encode())
        await stream.read_until(b"data: 3\n\n")
    finally:
        await stream.close()
    text = bytes(stream.body).decode()
    assert f"id: {ids[0]}\nevent: typed\ndata: 1\n\n" in text
    assert f"id: {ids[1]}\ndata: 2\n\n" in text, "no event: line when no type was given"
    assert f"id: {ids[2]}\nretry: 1500\ndata: 3\n\n" in text
    events = [e for e in parse_sse(text) if "id" in e]
    assert [e["id"] for e in events] == ids


# -- several topics on one connection --------------------------------------------------


async def test_multi_topic_stream_delivers_both_and_its_id_resumes_both(
    aclient: httpx.AsyncClient,
) -> None:
    a, b = new_topic("a"), new_topic("b")
    params = {"topic": [a, b]}
    async with SseStream(aclient, "/events", params=params) as stream:
        await publish_many(aclient, a, ["a1"])
        await publish_many(aclient, b, ["b1"])
        await publish_many(aclient, a, ["a2"])
        events = await stream.take(3)
    # Per topic in order (the order across topics is not promised).
    assert [e.data for e in events if e.data.startswith('"a')] == ['"a1"', '"a2"']
    assert [e.data for e in events if e.data.startswith('"b')] == ['"b1"']
    for event in events:
        assert_id(event.id)
    cursor = events[-1].id  # the id of the last event received
    # While disconnected:
    await publish_many(aclient, b, ["b2"])
    await publish_many(aclient, a, ["a3"])
    await publish_many(aclient, b, ["b3"])
    async with SseStream(
        aclient, "/events", params=params, headers={"Last-Event-ID": cursor}
    ) as stream:
        missed = await stream.take(3)
        per_topic = {
            "a": [e.data for e in missed if e.data.startswith('"a')],
            "b": [e.data for e in missed if e.data.startswith('"b')],
        }
        assert per_topic == {"a": ['"a3"'], "b": ['"b2"', '"b3"']}
        await publish_many(aclient, a, ["a4"])
        assert (await stream.next()).data == '"a4"', "nothing duplicated before live events"
        for event in missed:
            assert_id(event.id)


async def test_multi_topic_from_earliest_and_a_topic_added_later(
    aclient: httpx.AsyncClient,
) -> None:
    a, b, c = new_topic("a"), new_topic("b"), new_topic("c")
    await publish_many(aclient, a, ["a1", "a2"])
    await publish_many(aclient, b, ["b1"])
    async with SseStream(aclient, "/events", params={"topic": [a, b], "from": "earliest"}) as s:
        events = await s.take(3)
    assert sorted(e.data for e in events) == ['"a1"', '"a2"', '"b1"']
    cursor = events[-1].id
    await publish_many(aclient, c, ["c1"])
    # The old cursor on a connection with one more topic: the known ones resume exactly.
    async with SseStream(
        aclient, "/events", params={"topic": [a, b, c]}, headers={"Last-Event-ID": cursor}
    ) as stream:
        await publish_many(aclient, a, ["a3"])
        assert (await stream.next()).data == '"a3"'


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?topic=",
        "?topic=ok&topic=bad%20name",
        "?topic=" + "t" * 201,
    ],
)
async def test_a_bad_multi_topic_subscription_is_400(
    aclient: httpx.AsyncClient, query: str
) -> None:
    assert_problem(await aclient.get("/events" + query, headers=EVENT_STREAM), 400)


async def test_a_bad_topic_name_is_400_on_subscribe(aclient: httpx.AsyncClient) -> None:
    assert_problem(await aclient.get("/topics/bad%20topic/events", headers=EVENT_STREAM), 400)


async def test_a_stream_resumes_on_another_instance(
    aclient: httpx.AsyncClient, limits_broker: BrokerProcess
) -> None:
    """Ids stay valid on every instance on the same store."""
    topic = new_topic()
    ids = await publish_many(aclient, topic, [1, 2, 3])
    async with httpx.AsyncClient(base_url=limits_broker.url, timeout=10) as other:
        async with subscribe(other, topic, last_event_id=ids[0]) as stream:
            assert [e.id for e in await stream.take(2)] == ids[1:]
            [live] = await publish_many(aclient, topic, [4])
            assert (await stream.next()).id == live


async def test_the_gap_rules_hold_per_topic_on_a_multi_topic_stream(
    aclient: httpx.AsyncClient,
) -> None:
    """One topic's part of the cursor is unknown: a gap for it; the other resumes exactly."""
    a, b = new_topic("a"), new_topic("b")
    a_ids = await publish_many(aclient, a, ["a1", "a2"])
    b_ids = await publish_many(aclient, b, ["b1"])
    async with SseStream(aclient, "/events", params={"topic": [a, b]}) as stream:
        await publish_many(aclient, a, ["a3"])
        cursor = (await stream.next()).id
    # Swap b's position in the cursor for one its log never issued.
    parts = dict(part.split("~", 1) for part in cursor.split("!"))
    assert set(parts) == {a, b}, cursor
    parts[b] = _other_epoch(b_ids[0])
    forged = "!".join(f"{topic}~{position}" for topic, position in sorted(parts.items()))
    await publish_many(aclient, a, ["a4"])
    async with SseStream(
        aclient, "/events", params={"topic": [a, b]}, headers={"Last-Event-ID": forged}
    ) as stream:
        events = await stream.take(3)
        gaps = [e for e in events if e.event == "broker.gap"]
        assert len(gaps) == 1
        data = _gap(gaps[0].data)
        assert (data["reason"], data["requested"]) == ("unknown", parts[b])
        assert sorted(e.data for e in events if e.event != "broker.gap") == ['"a4"', '"b1"']
        await publish_many(aclient, b, ["b2"])
        assert (await stream.next()).data == '"b2"'
    assert len(a_ids) == 2


async def test_new_subscriptions_get_live_events_promptly(aclient: httpx.AsyncClient) -> None:
    """Each new multi-topic subscription gets a live event within 2 s, every time.

    Topics attached while the live reader is between reads must not wait for its
    blocking read to time out.
    """
    for round_ in range(200):
        topics = [new_topic(f"p{round_}") for _ in range(8)]
        async with SseStream(aclient, "/events", params={"topic": topics}) as stream:
            started = time.monotonic()
            [event_id] = await publish_many(aclient, topics[-1], ["live"])
            try:
                event = await stream.next(timeout=2)
            except AssertionError:
                late = await stream.next(timeout=8)
                pytest.fail(
                    f"round {round_}: the live event came {time.monotonic() - started:.1f}s "
                    f"late (data {late.data})"
                )
            assert event.data == '"live"' and event_id


async def test_a_gap_id_on_a_multi_topic_stream_resumes_every_topic(
    aclient: httpx.AsyncClient,
) -> None:
    """Seen from outside once: the gap for ``a`` had an id naming only ``a``, so a client
    that dropped right after it came back without ``b`` and lost ``b``'s events."""
    a, b = new_topic("a"), new_topic("b")
    await publish_many(aclient, a, ["a1"])
    b_ids = await publish_many(aclient, b, ["b1"])
    forged = f"{a}~{_other_epoch(b_ids[0])}!{b}~{b_ids[0]}"
    params = {"topic": [a, b]}
    async with SseStream(
        aclient, "/events", params=params, headers={"Last-Event-ID": forged}
    ) as stream:
        gap = await stream.next()
        assert gap.event == "broker.gap" and _gap(gap.data)["topic"] == a
    await publish_many(aclient, b, ["b2"])  # while the client is away
    async with SseStream(
        aclient, "/events", params=params, headers={"Last-Event-ID": gap.id}
    ) as stream:
        assert sorted(e.data for e in await stream.take(2)) == ['"a1"', '"b2"']
