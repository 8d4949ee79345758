"""Expiry, per-topic policies and topic listing through a real ``broker serve``.

The keys are checked in Redis itself (SCAN), not through the broker: a topic that
"expired" for the broker but left keys behind would still fill Redis.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis.asyncio as aredis
from httpx_sse import ServerSentEvent

from broker.ids import EventId
from tests.http.helpers import (
    SseStream,
    assert_problem,
    new_topic,
    publish_json,
    publish_many,
)
from tests.support.broker_process import BrokerProcess
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer
from tests.support.sse import parse_sse

POLICIES = [
    {"pattern": "chat:*", "ttl_seconds": 1, "maxlen": 5},
    {"pattern": "aged:*", "max_age_seconds": 1},
]
EXPIRY_DEADLINE_S = 4.0
"""How long after the TTL everything must be gone: Redis' active expiry samples keys
(~10 times a second) and the live reader looks 0.5 s after a topic's TTL."""


@pytest.fixture(scope="module")
def expiring_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """Every topic it publishes lives 1 s unused; ``chat:*`` and ``aged:*`` have policies."""
    env = {
        "BROKER_HEARTBEAT_SECONDS": "1",
        "BROKER_TOPIC_TTL_SECONDS": "1",
        "BROKER_TOPIC_POLICIES": json.dumps(POLICIES),
    }
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


@pytest.fixture(scope="module")
def policy_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """No global TTL: only the topics a policy names expire."""
    env = {"BROKER_HEARTBEAT_SECONDS": "1", "BROKER_TOPIC_POLICIES": json.dumps(POLICIES)}
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aredis.Redis]:
    client = aredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def keys_of(client: aredis.Redis, topic: str) -> list[bytes]:
    return [key async for key in client.scan_iter(match=f"broker:{{{topic}}}*", count=1000)]


async def test_a_topic_goes_whole_after_its_ttl_and_its_subscriber_is_told(
    expiring_broker: BrokerProcess, redis_client: aredis.Redis
) -> None:
    topic = new_topic()
    async with (
        httpx.AsyncClient(base_url=expiring_broker.url, timeout=10) as client,
        SseStream(client, f"/topics/{topic}/events") as stream,
    ):
        [first] = await publish_many(client, topic, ["a"])
        await publish_json(client, topic, {"data": "b"}, headers={"Idempotency-Key": "k"})
        ingest = await client.post(
            f"/topics/{topic}/events",
            content=b'{"data": "c"}\n{"data": "d"}\n',
            headers={"Content-Type": "application/x-ndjson", "Idempotency-Key": "lines"},
        )
        assert ingest.status_code == 201, ingest.text
        published_at = time.monotonic()
        last = ingest.json()["ids"][-1]
        # log, meta, records and their times, an ingest's lines and their times
        assert len(await keys_of(redis_client, topic)) == 6
        events = [await stream.next() for _ in range(4)]
        assert events[0].id == first
        gap = await stream.next(1 + EXPIRY_DEADLINE_S)
        told_after = time.monotonic() - published_at
        assert_unknown_gap(gap, topic, last)
        assert told_after < 1 + EXPIRY_DEADLINE_S
        assert await keys_of(redis_client, topic) == []
        assert (await client.get(f"/topics/{topic}")).status_code == 404
        # A producer coming back with the same keys starts a new log: nothing is replayed.
        again = await client.post(
            f"/topics/{topic}/events", json={"data": "b2"}, headers={"Idempotency-Key": "k"}
        )
        assert again.status_code == 201 and again.json()["id"].split(".")[0] != first.split(".")[0]


async def test_a_closed_topic_expires_too(
    expiring_broker: BrokerProcess, redis_client: aredis.Redis
) -> None:
    topic = new_topic()
    async with httpx.AsyncClient(base_url=expiring_broker.url, timeout=10) as client:
        response = await client.post(f"/topics/{topic}/events?close=true", json={"data": 1})
        assert response.status_code == 201
        assert len(await keys_of(redis_client, topic)) == 2

        async def gone() -> bool:
            return not await keys_of(redis_client, topic)

        await await_until(gone, timeout=1 + EXPIRY_DEADLINE_S, what="closed topic expires")
        # A new log under the old name is open again.
        assert (await client.post(f"/topics/{topic}/events", json={"data": 2})).status_code == 201


async def test_a_policy_applies_to_its_pattern_only(
    policy_broker: BrokerProcess, redis_client: aredis.Redis
) -> None:
    chat, other = f"chat:{new_topic()}", new_topic()
    async with httpx.AsyncClient(base_url=policy_broker.url, timeout=10) as client:
        await publish_many(client, other, list(range(20)))
        await publish_many(client, chat, list(range(20)))
        # chat:* lives 1 s after its last publish: looked at right after it (once after
        # the 20 publishes to the other topic, which a loaded machine took past 1 s)
        chat_info = (await client.get(f"/topics/{chat}")).json()
        assert await redis_client.pttl(f"broker:{{{chat}}}:log") > 0
        assert chat_info["length"] <= 5 + 1, chat_info  # maxlen 5 (trimmed in steps of 1)
        other_info = (await client.get(f"/topics/{other}")).json()
        assert other_info["length"] == 20, other_info
        assert await redis_client.pttl(f"broker:{{{other}}}:log") == -1  # kept

        async def chat_gone() -> bool:
            return not await keys_of(redis_client, chat)

        await await_until(chat_gone, timeout=1 + EXPIRY_DEADLINE_S, what="chat:* expires")
        assert len(await keys_of(redis_client, other)) == 2
        assert (await client.get(f"/topics/{other}")).json()["length"] == 20


async def test_max_age_holds_for_a_topic_nobody_publishes_to(policy_broker: BrokerProcess) -> None:
    """Age trimming on append alone would keep these forever: nothing is appended."""
    topic = f"aged:{new_topic()}"
    async with httpx.AsyncClient(base_url=policy_broker.url, timeout=10) as client:
        await publish_many(client, topic, ["old 1", "old 2"])
        history = f"/topics/{topic}/events"
        json_accept = {"Accept": "application/json"}
        assert len((await client.get(history, headers=json_accept)).json()["events"]) == 2

        async def aged_out() -> bool:
            page = (await client.get(history, headers=json_accept)).json()
            return page["events"] == []

        await await_until(aged_out, timeout=4, what="old events dropped on read", interval=0.2)
        info = (await client.get(f"/topics/{topic}")).json()
        assert info["length"] == 0 and info["first_id"] is None, info


async def test_a_log_retention_emptied_says_its_newest_id_and_resumes_there_untold(
    policy_broker: BrokerProcess,
) -> None:
    """``GET /topics/{t}`` of a log retention emptied says the newest id it issued: it said
    null, and a client that took that for "no event yet" and resumed the topic from the
    origin (the Python subscriber's cursor for a multi-topic stream "from now") was told
    ``trimmed`` of events it never asked for. After that id, nothing is told."""
    topic, other = f"aged:{new_topic()}", new_topic()
    async with httpx.AsyncClient(base_url=policy_broker.url, timeout=10) as client:
        ids = await publish_many(client, topic, ["old 1", "old 2"])

        async def aged_out() -> bool:
            return (await client.get(f"/topics/{topic}")).json()["length"] == 0

        await await_until(aged_out, timeout=4, what="the events age out", interval=0.2)
        info = (await client.get(f"/topics/{topic}")).json()
        assert (info["first_id"], info["last_id"]) == (None, ids[-1]), info
        cursor = f"{topic}~{info['last_id']}!{other}~0.0-0"
        params = [("topic", topic), ("topic", other), ("positions", "true")]
        async with SseStream(
            client, "/events", params=params, headers={"Last-Event-ID": cursor}
        ) as stream:
            start = await stream.next()
            assert start.event == "broker.position", start  # and no gap before it
            [after] = await publish_many(client, topic, ["new"])
            event = await stream.next()
            assert (event.data, f"{topic}~{after}" in event.id.split("!")) == ('"new"', True)


# -- a client at the origin (no log yet) and a whole log that expired meanwhile -----------


async def origin_cursor(client: httpx.AsyncClient, path: str) -> str:
    """The cursor a stream of a topic with no log sends (an ``id:`` with no data), as
    an ``EventSource`` keeps it; the stream is closed: its client went away."""
    async with SseStream(client, path) as stream:
        await await_until(lambda: stream.last_event_id, timeout=5, what="the origin cursor")
        return stream.last_event_id


async def redis_ms(redis_client: aredis.Redis) -> int:
    seconds, microseconds = await redis_client.time()
    return int(seconds) * 1000 + int(microseconds) // 1000


async def wait_for_redis_ms(redis_client: aredis.Redis, at_least: int, timeout: float) -> None:
    """Until the store's clock (the one an origin carries) reaches ``at_least``."""

    async def reached() -> bool:
        return await redis_ms(redis_client) >= at_least

    await await_until(reached, timeout=timeout, what="the store's clock moves on")


def origin_ms(origin: str) -> int:
    assert origin.startswith("0."), origin
    return int(origin[2:].split("-")[0])


async def expire_a_log(client: httpx.AsyncClient, redis_client: aredis.Redis, topic: str) -> None:
    """A log made under ``topic``, published to, then expired whole (TTL)."""
    await publish_many(client, topic, ["lost 1", "lost 2"])

    async def gone() -> bool:
        return not await keys_of(redis_client, topic)

    await await_until(gone, timeout=1 + EXPIRY_DEADLINE_S, what="the log expires whole")


def assert_unknown_gap(event: ServerSentEvent, topic: str, requested: str) -> None:
    assert event.event == "broker.gap", event
    assert json.loads(event.data) == {
        "reason": "unknown",
        "requested": requested,
        "resumed_after": None,
        "topic": topic,
    }


async def test_a_client_back_at_the_origin_after_a_whole_log_expired_is_told(
    expiring_broker: BrokerProcess, redis_client: aredis.Redis
) -> None:
    """It subscribed before the topic's first event, went away, and a log was made,
    published to and expired meanwhile: it is told (it waited in silence for good),
    then gets what comes next."""
    topic = new_topic()
    path = f"/topics/{topic}/events"
    async with httpx.AsyncClient(base_url=expiring_broker.url, timeout=10) as client:
        origin = await origin_cursor(client, path)
        await expire_a_log(client, redis_client, topic)
        async with SseStream(client, path, headers={"Last-Event-ID": origin}) as stream:
            assert_unknown_gap(await stream.next(), topic, origin)
            [after] = await publish_many(client, topic, ["next"])
            assert (await stream.next()).id == after


async def test_a_client_back_at_the_origin_after_a_log_expired_and_another_came_is_told(
    expiring_broker: BrokerProcess, redis_client: aredis.Redis
) -> None:
    """The same, with a new log made after the first expired: told of the first, then
    the new one from its start (it was replayed with no word of the first)."""
    topic = new_topic()
    path = f"/topics/{topic}/events"
    async with httpx.AsyncClient(base_url=expiring_broker.url, timeout=10) as client:
        origin = await origin_cursor(client, path)
        await expire_a_log(client, redis_client, topic)
        new_log = await publish_many(client, topic, ["new 1", "new 2"])
        async with SseStream(client, path, headers={"Last-Event-ID": origin}) as stream:
            assert_unknown_gap(await stream.next(), topic, origin)
            assert [(await stream.next()).id for _ in new_log] == new_log


async def test_a_deleted_gaps_id_is_204_after_a_log_made_since_outlived_its_ttl(
    expiring_broker: BrokerProcess, redis_client: aredis.Redis
) -> None:
    """README: the id of a ``deleted`` gap is answered 204 while the deletion is known
    (its marker lingers 60 s). A publish right after the DELETE (a log that remembers
    the deletion), that log's TTL (1 s) past twice, and the told client back well within
    the 60 s: still 204, not told ``unknown`` and left waiting (the log, expiring with
    its TTL, took the deletion's memory along)."""
    topic = new_topic()
    path = f"/topics/{topic}/events"
    async with httpx.AsyncClient(base_url=expiring_broker.url, timeout=10) as client:
        [first] = await publish_many(client, topic, ["a"])
        assert (await client.delete(f"/topics/{topic}")).status_code == 204
        headers = {"Accept": "text/event-stream", "Last-Event-ID": first}
        told = await asyncio.wait_for(client.get(path, headers=headers), 5)
        [gap] = parse_sse(told.text)
        assert json.loads(gap["data"])["reason"] == "deleted", gap
        [since] = await publish_many(client, topic, ["made since"])
        # (past the TTL twice, well within the marker's 60 s)
        await wait_for_redis_ms(redis_client, EventId.parse(since).position[0] + 2000, timeout=5)
        headers["Last-Event-ID"] = gap["id"]
        request = client.build_request("GET", path, headers=headers)
        again = await asyncio.wait_for(client.send(request, stream=True), 5)
        await again.aclose()
        assert again.status_code == 204


@pytest.mark.parametrize("topics", [1, 2])
async def test_a_client_that_stayed_at_the_origin_past_the_ttl_is_told_nothing(
    expiring_broker: BrokerProcess, redis_client: aredis.Redis, topics: int
) -> None:
    """Connected to a quiet topic for two TTLs, it missed nothing: its stream kept the
    origin it holds fresh (``id:`` lines), and it comes back with the last one, as an
    ``EventSource`` does, to no gap. On a multi-topic stream, each topic's part."""
    names = sorted(new_topic() for _ in range(topics))
    if topics == 1:
        path, params = f"/topics/{names[0]}/events", None
    else:
        path, params = "/events", [("topic", name) for name in names]
    async with httpx.AsyncClient(base_url=expiring_broker.url, timeout=10) as client:
        async with SseStream(client, path, params=params) as stream:
            await await_until(lambda: stream.last_event_id, timeout=5, what="the origin")
            first = origins_of(stream.last_event_id)
            await wait_for_redis_ms(redis_client, max(first) + 2000, timeout=10)
            # Back right after its stream sent a later origin (one sent a while ago may
            # be most of a TTL old, and a reconnect slowed by the machine told).
            before = stream.last_event_id
            await await_until(lambda: stream.last_event_id != before, timeout=5, what="later")
            held = stream.last_event_id
        assert all(later > before for later, before in zip(origins_of(held), first, strict=True))
        headers = {"Last-Event-ID": held}
        async with SseStream(client, path, params=params, headers=headers) as stream:
            [event] = await publish_many(client, names[0], ["first"])
            assert (await stream.next()).data == '"first"'  # and no gap before it
            if topics == 1:
                assert stream.last_event_id == event


def origins_of(cursor: str) -> list[int]:
    """The time of each origin of a cursor, single or multi-topic."""
    parts = [entry.split("~")[-1] for entry in cursor.split("!")]
    return [origin_ms(part) for part in parts]


async def test_an_origin_back_after_its_log_aged_out_whole_is_told_trimmed(
    policy_broker: BrokerProcess,
) -> None:
    """Retention by age (``max_age_seconds``, no TTL) empties a log but keeps its key:
    a client back at the origin is told its events were trimmed, not left waiting."""
    topic = f"aged:{new_topic()}"
    path = f"/topics/{topic}/events"
    async with httpx.AsyncClient(base_url=policy_broker.url, timeout=10) as client:
        origin = await origin_cursor(client, path)
        await publish_many(client, topic, ["old 1", "old 2"])

        async def aged_out() -> bool:
            info = (await client.get(f"/topics/{topic}")).json()
            return info["length"] == 0

        await await_until(aged_out, timeout=4, what="the events age out", interval=0.2)
        async with SseStream(client, path, headers={"Last-Event-ID": origin}) as stream:
            gap = await stream.next()
            assert gap.event == "broker.gap" and json.loads(gap.data)["reason"] == "trimmed"


async def test_without_a_ttl_an_old_origin_is_told_nothing_and_with_a_policys_it_is(
    policy_broker: BrokerProcess, redis_client: aredis.Redis
) -> None:
    """No TTL (neither global nor by policy): nothing expires, nothing is told, however
    old the origin. A policy's TTL (``chat:*``): the log made a TTL after the origin
    may have followed one that came and went, and it is told."""
    kept, expiring = new_topic(), f"chat:{new_topic()}"
    async with httpx.AsyncClient(base_url=policy_broker.url, timeout=10) as client:
        origins = {t: await origin_cursor(client, f"/topics/{t}/events") for t in (kept, expiring)}
        latest = max(origin_ms(origin) for origin in origins.values())
        await wait_for_redis_ms(redis_client, latest + 1500, timeout=10)
        [kept_id] = await publish_many(client, kept, ["a"])
        headers = {"Last-Event-ID": origins[kept]}
        async with SseStream(client, f"/topics/{kept}/events", headers=headers) as stream:
            assert (await stream.next()).id == kept_id
        # (its log lives 1 s: published right before the client comes back, not before
        # the other topic's round, which a loaded machine may take past 1 s)
        [expiring_id] = await publish_many(client, expiring, ["a"])
        headers = {"Last-Event-ID": origins[expiring]}
        async with SseStream(client, f"/topics/{expiring}/events", headers=headers) as stream:
            assert_unknown_gap(await stream.next(), expiring, origins[expiring])
            assert (await stream.next()).id == expiring_id


async def test_a_multi_topic_client_back_after_one_topics_log_expired_is_told_of_it(
    expiring_broker: BrokerProcess, redis_client: aredis.Redis
) -> None:
    """Each topic is judged by its own origin in the cursor. Away longer than the TTL,
    the client may have missed a log of the other topic too (one that came and went
    leaves no trace), and it is told of both."""
    lost, quiet = sorted([new_topic(), new_topic()])
    params = [("topic", lost), ("topic", quiet)]
    async with httpx.AsyncClient(base_url=expiring_broker.url, timeout=10) as client:
        async with SseStream(client, "/events", params=params) as stream:
            await await_until(lambda: stream.last_event_id, timeout=5, what="the cursor")
            cursor = stream.last_event_id
        parts = dict(entry.split("~") for entry in cursor.split("!"))
        assert set(parts) == {lost, quiet}
        await expire_a_log(client, redis_client, lost)
        headers = {"Last-Event-ID": cursor}
        async with SseStream(client, "/events", params=params, headers=headers) as stream:
            for topic in (lost, quiet):  # (in the order of their names)
                assert_unknown_gap(await stream.next(), topic, parts[topic])
            await publish_many(client, quiet, ["next"])
            event = await stream.next()
            assert (event.event, event.data) == ("message", '"next"')


# -- the settings stop `broker serve` at start ------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        '[{"pattern": "chat:*", "ttl": 1}]',  # an unknown key
        '[{"pattern": "chat/*", "ttl_seconds": 1}]',  # not a topic pattern
        '[{"pattern": "", "maxlen": 5}]',
        '[{"pattern": "chat:*", "maxlen": 0}]',
        '[{"pattern": "chat:*", "ttl_seconds": -1}]',
        '{"pattern": "chat:*"}',  # not a list
        "not json",
    ],
)
def test_a_bad_policy_stops_the_broker_at_start(value: str) -> None:
    process = BrokerProcess(env={"BROKER_TOPIC_POLICIES": value})
    try:
        with pytest.raises(RuntimeError, match="exited early") as failure:
            process.start(timeout=20)
        assert "BROKER_TOPIC_POLICIES" in str(failure.value), str(failure.value)[-2000:]
    finally:
        process.close()


# -- listing -------------------------------------------------------------------------


async def test_listing_topics_by_prefix_with_pages(http_broker: BrokerProcess) -> None:
    prefix = new_topic("list") + "-"
    names = [f"{prefix}{n:02}" for n in range(12)]
    async with httpx.AsyncClient(base_url=http_broker.url, timeout=10) as client:
        for name in names:
            await publish_many(client, name, [name])
        assert (await client.post(f"/topics/{names[0]}/close")).status_code == 201
        assert (await client.delete(f"/topics/{names[1]}")).status_code == 204
        await publish_many(client, f"x{prefix}", [1])  # the prefix is a prefix
        seen: list[dict[str, object]] = []
        params: dict[str, str] = {"prefix": prefix, "limit": "5"}
        for _ in range(1000):
            response = await client.get("/topics", params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            assert set(page) == {"topics", "next"}
            assert len(page["topics"]) <= 5, page  # a page holds at most its limit
            seen += page["topics"]
            if page["next"] is None:
                break
            params["cursor"] = page["next"]
        else:
            raise AssertionError("listing never ended")
        by_name = {t["topic"]: t for t in seen}
        # Every topic, none skipped; perhaps one twice (SCAN's own promise, and the
        # README's: Redis shrinking its keyspace's table between pages, keys of the
        # suite's other tests expiring, gives a key again).
        assert sorted(by_name) == names[:1] + names[2:], seen
        for name, listed in by_name.items():
            assert set(listed) == {"topic", "length", "last_id", "closed"}
            assert listed["closed"] == (name == names[0])
            assert listed["length"] == (2 if name == names[0] else 1)
            info = (await client.get(f"/topics/{name}")).json()
            assert listed["last_id"] == info["last_id"]
        everything = (await client.get("/topics", params={"limit": "1000"})).json()
        assert everything["topics"] or everything["next"], "no prefix lists every topic"


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=1001", "limit=x", "prefix=a/b", "prefix=a%20b", "cursor=nope"],
)
async def test_listing_refuses_bad_parameters(http_broker: BrokerProcess, query: str) -> None:
    async with httpx.AsyncClient(base_url=http_broker.url, timeout=10) as client:
        assert_problem(await client.get(f"/topics?{query}"), 400)


@pytest.mark.parametrize("topics", [1, 2])
async def test_a_client_that_asks_for_positions_is_sent_them_as_events(
    expiring_broker: BrokerProcess, topics: int
) -> None:
    """``?positions=true`` (``/client.js`` asks it): where the stream stands with no
    event to deliver (its start at the origin, each later origin) comes as a
    ``broker.position`` event with data ``{}``, which a script sees (an ``id:`` line with
    no data fires nothing), carrying the id that line would; events come as before."""
    names = sorted(new_topic() for _ in range(topics))
    path = f"/topics/{names[0]}/events" if topics == 1 else "/events"
    params = [("positions", "true")] + ([("topic", n) for n in names] if topics > 1 else [])
    async with (
        httpx.AsyncClient(base_url=expiring_broker.url, timeout=10) as client,
        SseStream(client, path, params=params) as stream,
    ):
        start = await stream.next()
        assert (start.event, start.data) == ("broker.position", "{}"), start
        assert stream.last_event_id == start.id
        later = await stream.next()  # a quarter of the TTL on (1 s here)
        assert (later.event, later.data) == ("broker.position", "{}"), later
        assert all(
            moved > held
            for moved, held in zip(origins_of(later.id), origins_of(start.id), strict=True)
        )
        [event] = await publish_many(client, names[0], ["first"])
        while (got := await stream.next()).event == "broker.position":
            pass  # (a later origin may come first)
        assert got.data == '"first"'
        assert (got.id == event) if topics == 1 else (f"{names[0]}~{event}" in got.id.split("!"))


async def test_positions_follow_a_replay_and_are_sent_only_when_asked_for(
    policy_broker: BrokerProcess,
) -> None:
    """From the earliest, a client that asks is told where the replay left it; one that
    does not gets the events alone (no event of a type it never heard of). (A topic
    with no TTL: both streams replay one log, which with a 1 s TTL had to outlive the
    first stream, a second connection and its replay on a loaded machine.)"""
    topic = new_topic()
    path = f"/topics/{topic}/events"
    async with httpx.AsyncClient(base_url=policy_broker.url, timeout=10) as client:
        ids = await publish_many(client, topic, ["a", "b"])
        asked = {"from": "earliest", "positions": "true"}
        async with SseStream(client, path, params=asked) as stream:
            assert [(await stream.next()).id for _ in ids] == ids
            position = await stream.next()
            assert (position.event, position.id) == ("broker.position", ids[-1])
        async with SseStream(client, path, params={"from": "earliest"}) as stream:
            assert [(await stream.next()).id for _ in ids] == ids
            [after] = await publish_many(client, topic, ["c"])
            event = await stream.next()
            assert (event.event, event.id) == ("message", after)


async def test_positions_other_than_true_or_false_are_refused(
    expiring_broker: BrokerProcess,
) -> None:
    async with httpx.AsyncClient(base_url=expiring_broker.url, timeout=10) as client:
        single = (f"/topics/{new_topic()}/events", {"positions": "yes"})
        multi = ("/events", {"topic": new_topic(), "positions": "yes"})
        for path, params in (single, multi):
            response = await client.get(
                path, params=params, headers={"Accept": "text/event-stream"}
            )
            assert "positions" in assert_problem(response, 400)["detail"]
