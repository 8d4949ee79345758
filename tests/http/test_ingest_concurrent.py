"""Two streaming ingests under one Idempotency-Key open at once, on two broker processes
of one Redis: a producer's retry started while its first connection is still alive on
the broker (it broke on the producer's side only, and the broker has not noticed yet).

No lease is taken on the key: a resend is never locked out by a first stream the broker
still holds open, and needs none. Each line is stored once, by whichever stream brings it
first, only after the line before it in that stream is recorded (append.lua), so the log
is always one stream's lines, in order; the same stream sent twice at once is answered
twice with the same ids. Two streams that differ under one key (a producer's error) leave
the log one of them: the other is refused at its first line that differs, a blank line
included, with a 400 naming it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.http.helpers import RawResponse, assert_problem, new_topic
from tests.http.test_ingest import RawIngest, history, line
from tests.support.broker_process import BrokerProcess
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer

NDJSON = {"Content-Type": "application/x-ndjson"}


@pytest.fixture(scope="module")
def second_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """Another instance on the Redis of ``http_broker``."""
    process = BrokerProcess(redis_url=redis_server.url).start()
    yield process
    process.close()


@pytest.fixture
async def client(http_broker: BrokerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=http_broker.url, timeout=30) as session:
        yield session


def lines(first: int, last: int, prefix: str = "t") -> bytes:
    return b"".join(line(f"{prefix}{n}") for n in range(first, last + 1))


def datas(count: int, prefix: str = "t") -> list[str]:
    return [f"{prefix}{n}" for n in range(1, count + 1)]


async def stored_datas(client: httpx.AsyncClient, topic: str) -> list[Any]:
    return [e["data"] for e in await history(client, topic)]


async def until_stored(client: httpx.AsyncClient, topic: str, expected: list[Any]) -> None:
    async def stored() -> bool:
        return await stored_datas(client, topic) == expected

    await await_until(stored, timeout=5, what=f"{expected} stored")


async def test_one_stream_sent_twice_at_once_to_two_instances_is_stored_once_in_order(
    http_broker: BrokerProcess, second_broker: BrokerProcess, client: httpx.AsyncClient
) -> None:
    """The lines of the two ingests interleaved: each brings lines the other stored
    (replayed), then new ones (stored after them). Both end answered with the same ids,
    and the topic closed once."""
    topic, key = new_topic(), {"Idempotency-Key": "retried-while-open"}
    first = await RawIngest.open(http_broker, topic, "?close=true", key)
    second = await RawIngest.open(second_broker, topic, "?close=true", key)
    try:
        await first.send(lines(1, 3))
        await until_stored(client, topic, datas(3))
        await second.send(lines(1, 5))  # (1-3 replayed, 4-5 stored)
        await until_stored(client, topic, datas(5))
        await first.send(lines(4, 8))
        await until_stored(client, topic, datas(8))
        await second.send(lines(6, 10))
        await until_stored(client, topic, datas(10))
        await first.send(lines(9, 10))
        answers = [await first.end(), await second.end()]
    finally:
        first.cut()
        second.cut()
    # (each stored lines of its own: 201 both)
    assert [a.status for a in answers] == [201, 201], [a.body for a in answers]
    stored = await history(client, topic)
    assert [e["data"] for e in stored] == [*datas(10), {}]
    ids = [e["id"] for e in stored]
    for answer in answers:
        assert json.loads(answer.body) == {"ids": ids[:10], "end_id": ids[10]}, answer.body


async def test_a_resend_is_not_locked_out_by_a_first_stream_the_broker_holds_open(
    http_broker: BrokerProcess, second_broker: BrokerProcess, client: httpx.AsyncClient
) -> None:
    """The first connection broke on the producer's side only: the broker still reads
    it (until its body's timeout). The resend, to another instance, is answered at once,
    each line once; what the first still brings is the same lines, replayed."""
    topic, key = new_topic(), {"Idempotency-Key": "broke-unnoticed"}
    first = await RawIngest.open(http_broker, topic, headers=key)
    try:
        await first.send(lines(1, 4))
        await until_stored(client, topic, datas(4))
        async with httpx.AsyncClient(base_url=second_broker.url, timeout=30) as other:
            resent = await other.post(
                f"/topics/{topic}/events", content=lines(1, 6), headers={**NDJSON, **key}
            )
        assert resent.status_code == 201, resent.text
        await first.send(lines(5, 6))  # (in flight when it broke: replayed)
        late = await first.end()
    finally:
        first.cut()
    assert late.status == 201, late.body  # (it stored lines 1-4)
    stored = await history(client, topic)
    assert [e["data"] for e in stored] == datas(6)
    assert resent.json()["ids"] == json.loads(late.body)["ids"] == [e["id"] for e in stored]


def refused_at(answer: RawResponse | httpx.Response, number: int) -> None:
    body = answer.body if isinstance(answer, RawResponse) else answer.content
    status = answer.status if isinstance(answer, RawResponse) else answer.status_code
    assert status == 400, body
    assert json.loads(body)["detail"].startswith(f"line {number}: "), body


async def test_two_streams_that_differ_under_one_key_at_once_leave_the_log_one_of_them(
    http_broker: BrokerProcess, second_broker: BrokerProcess, client: httpx.AsyncClient
) -> None:
    """A producer's error: two generations under one key, open at once. The one behind
    is refused at its first line that differs; the other goes on, and the log is its
    lines only."""
    topic, key = new_topic(), {"Idempotency-Key": "two-generations"}
    first = await RawIngest.open(http_broker, topic, headers=key)
    second = await RawIngest.open(second_broker, topic, headers=key)
    try:
        await first.send(lines(1, 3))
        await until_stored(client, topic, datas(3))
        await second.send(lines(1, 2) + lines(3, 5, "other"))
        refused_at(await second.end(), 3)
        await first.send(lines(4, 5))
        ended = await first.end()
    finally:
        first.cut()
        second.cut()
    assert ended.status == 201, ended.body
    assert await stored_datas(client, topic) == datas(5)


BLANK = b"\n"


def lines_in(body: bytes) -> int:
    """How many lines of ``body`` are not blank (those an ingest stores)."""
    return sum(1 for sent in body.split(b"\n") if sent.strip())


@pytest.mark.parametrize(
    ("first_sent", "first_rest", "second", "stored", "differs"),
    [
        # The second's line 2 is blank where the first stored one: its line 3 was stored
        # after the first's line 2, a line it never sent.
        (lines(1, 2), lines(3, 4), lines(1, 1) + BLANK + lines(3, 4), datas(4), 2),
        # The first's line 2 is blank: the second's line 2 was stored after the first's
        # line 3, out of order.
        (lines(1, 1) + BLANK + lines(3, 3), lines(4, 4), lines(1, 4), ["t1", "t3", "t4"], 2),
        # The second's first line is blank: its lines 2 and 3 were replayed, answered 201.
        (lines(1, 2), lines(3, 3), BLANK + lines(2, 3), datas(3), 1),
        # The second's last line is blank: it ended answered 201 with the first two ids.
        (lines(1, 3), lines(4, 4), lines(1, 2) + BLANK, datas(4), 3),
    ],
    ids=["blank-in-the-second", "blank-in-the-first", "blank-first-line", "blank-last-line"],
)
async def test_two_streams_that_differ_by_a_blank_line_are_not_mixed(
    http_broker: BrokerProcess,
    second_broker: BrokerProcess,
    client: httpx.AsyncClient,
    first_sent: bytes,
    first_rest: bytes,
    second: bytes,
    stored: list[str],
    differs: int,
) -> None:
    """Lines are numbered blank ones included. Two streams under one key that differed
    only where one had a blank line mixed, in silence: both answered 201, the log holding
    a line one of them never sent, or its lines out of order. Now the second is refused
    at the line where they differ, open at once with the first or resent after it ended;
    a blank line before its first line or after its last one included."""
    topic, key = new_topic(), {"Idempotency-Key": "blank-where-a-line-was"}
    first = await RawIngest.open(http_broker, topic, headers=key)
    other = await RawIngest.open(second_broker, topic, headers=key)
    try:
        await first.send(first_sent)
        await until_stored(client, topic, stored[: lines_in(first_sent)])
        await other.send(second)
        refused_at(await other.end(), differs)
        await first.send(first_rest)
        ended = await first.end()
    finally:
        first.cut()
        other.cut()
    assert ended.status == 201, ended.body
    assert await stored_datas(client, topic) == stored
    resent = await client.post(f"/topics/{topic}/events", content=second, headers={**NDJSON, **key})
    refused_at(resent, differs)
    assert await stored_datas(client, topic) == stored


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_a_stream_refused_where_it_differs_says_what_it_stored_before(
    http_broker: BrokerProcess, client: httpx.AsyncClient, route: str
) -> None:
    """The 400 of a stream out of step named its line only: its lines before it in the
    same read were refused with it, so a producer could not tell what it had stored.
    It says how many lines the request stored and the last one's id, as its other
    answers mid-body do. On both ingest paths (lean, and the app's after Expect)."""
    topic, key = new_topic(), {"Idempotency-Key": f"says-what-it-stored-{route}"}
    expect = {"Expect": "100-continue"} if route == "by-app" else {}
    first = await RawIngest.open(http_broker, topic, headers={**key, **expect})
    try:
        await first.send(lines(1, 2))
        await until_stored(client, topic, datas(2))
        resent = await client.post(
            f"/topics/{topic}/events", content=lines(1, 4), headers={**NDJSON, **key}
        )
        assert resent.status_code == 201, resent.text  # (1-2 replayed, 3-4 stored)
        await first.send(lines(3, 3, "other"))
        refused = await first.end()
        if route == "by-app":  # (uvicorn's Continue, then the app's answer)
            assert refused.status == 100, refused.body
            refused = await first.answer()
    finally:
        first.cut()
    refused_at(refused, 3)
    stored = await history(client, topic)
    assert [e["data"] for e in stored] == datas(4)
    detail = json.loads(refused.body)["detail"]
    assert detail.endswith(f"; 2 line(s) stored, the last {stored[1]['id']}"), detail


async def test_a_stream_of_blank_lines_only_counts_them_too(
    second_broker: BrokerProcess, client: httpx.AsyncClient
) -> None:
    """A keyed body of blank lines only, on a topic that exists: its lines are counted
    as a body's blank last lines are, so that a stream bringing a line there after it
    (on any instance) is refused at its first line, as it is before it. Nothing of it
    was recorded: the stream of lines after it was stored, 201 both, the two differing.
    The same blank stream again is answered as the first was."""
    topic, key = new_topic(), {"Idempotency-Key": "only-blank-lines"}
    published = await client.post(f"/topics/{topic}/events", json={"data": "before"})
    assert published.status_code == 201, published.text
    blank = await client.post(
        f"/topics/{topic}/events", content=BLANK * 3, headers={**NDJSON, **key}
    )
    assert (blank.status_code, blank.json()) == (201, {"ids": []}), blank.text
    async with httpx.AsyncClient(base_url=second_broker.url, timeout=30) as other:
        sent = await other.post(
            f"/topics/{topic}/events", content=lines(1, 3), headers={**NDJSON, **key}
        )
    refused_at(sent, 1)
    again = await client.post(
        f"/topics/{topic}/events", content=BLANK * 3, headers={**NDJSON, **key}
    )
    assert (again.status_code, again.json()) == (201, {"ids": []}), again.text
    assert await stored_datas(client, topic) == ["before"]


@pytest.mark.parametrize(
    "ending", [b"  \n", b"  ", b"\t\r"], ids=["its-line-feed", "no-line-feed", "tab-and-cr"]
)
@pytest.mark.parametrize("first", ["ended-blank", "with-a-line"])
async def test_a_blank_last_line_without_its_line_feed_counts_as_one_with_it(
    client: httpx.AsyncClient, ending: bytes, first: str
) -> None:
    """A body's last line may lack its line feed, a blank one too: ``t1\\n  `` ends on
    a blank line 2 as ``t1\\n  \\n`` does. It was not counted, so that under one key
    the stream of lines 1-2 after it was stored (201 both, the two differing), and it
    after that stream was answered line 1's id (200): each is refused at line 2, as
    where the blank line ends with its line feed."""
    topic, key = new_topic(), {"Idempotency-Key": f"blank-end-{first}"}
    ended_blank, with_a_line = lines(1, 1) + ending, lines(1, 2)
    before, after = (ended_blank, with_a_line)
    if first == "with-a-line":
        before, after = (with_a_line, ended_blank)
    sent = await client.post(f"/topics/{topic}/events", content=before, headers={**NDJSON, **key})
    assert sent.status_code == 201, sent.text
    resent = await client.post(f"/topics/{topic}/events", content=after, headers={**NDJSON, **key})
    refused_at(resent, 2)
    assert await stored_datas(client, topic) == datas(1 if first == "ended-blank" else 2)


@pytest.mark.parametrize(
    ("resent", "stored_before"),
    [
        (lines(1, 1) + line("other") + lines(3, 3), 0),  # (its lines in one read)
        (lines(1, 2) + line("other"), 0),
        (lines(1, 1) + BLANK + lines(3, 3), 0),  # a blank line where one is stored
        (lines(1, 2) + BLANK, 2),  # its blank end there: lines 1-2 answered first
    ],
    ids=["another-line-2", "another-line-3", "blank-line-2", "blank-end"],
)
async def test_a_stream_out_of_step_on_a_closed_topic_is_told_it_is_closed(
    client: httpx.AsyncClient, resent: bytes, stored_before: int
) -> None:
    """Under one key, a stream that is not the one stored, resent once the topic was
    closed: it was answered 400 (out of step), where any publish to a closed topic but
    a replay is 409 topic-closed; it is 409 now, nothing stored. The stream stored
    before the close, resent, is still answered its ids (a replay), and with
    ``?close=true`` its end."""
    topic, key = new_topic(), {"Idempotency-Key": "resent-after-the-close"}
    first = await client.post(
        f"/topics/{topic}/events?close=true", content=lines(1, 3), headers={**NDJSON, **key}
    )
    assert first.status_code == 201, first.text
    other = await client.post(f"/topics/{topic}/events", content=resent, headers={**NDJSON, **key})
    body = assert_problem(other, 409)
    assert body["type"] == "/problems#topic-closed", body
    told = f"{stored_before} line(s) stored before it closed"
    assert (told in body["detail"]) == (stored_before > 0), body
    for query in ("", "?close=true"):
        again = await client.post(
            f"/topics/{topic}/events{query}", content=lines(1, 3), headers={**NDJSON, **key}
        )
        assert again.status_code in (200, 201), again.text
        assert again.json()["ids"] == first.json()["ids"], again.text
    assert await stored_datas(client, topic) == [*datas(3), {}]  # ({}: its end)
