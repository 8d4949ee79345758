"""What a client does while a deploy rolls, each request to one of two instances: a
check is ``scenario(first, second)``, begun on ``first``, taken up by ``second``.

Each raises (``Differs``) on any event lost, stored twice, out of order, or an answer
that is not the one a single release gives. Reuses the suite's clients (RawIngest, the
SSE reader, the delivery oracle); every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import redis.asyncio as aredis

from tests.http.helpers import SseStream, new_topic
from tests.http.test_ingest import RawIngest, history, line
from tests.support.broker_process import BrokerProcess
from tests.support.oracle import delivery_problems
from tests.support.polling import await_until

NDJSON = {"Content-Type": "application/x-ndjson"}
BLANK_LINES = frozenset({2, 5, 6})
"""A stream's blank lines, where the streams of the ingest checks have some: numbered
but never sent, the line after them is where two releases might read them otherwise."""
TTL_S = 2
TTL_POLICIES = [{"pattern": "ttl-*", "ttl_seconds": TTL_S}]
"""Only the TTL check's topics expire: the other checks' topics live on."""


class Differs(AssertionError):
    """Something lost, stored twice, or answered otherwise than by one release."""


class HoldsOnceEveryInstanceRunsIt(Exception):
    """What a release adds that the previous one, beside it, does not do: said in the
    README's Upgrading, and seen exactly as the previous release alone does it."""


def must(condition: object, what: object) -> None:
    if not condition:
        raise Differs(str(what))


@dataclass
class Instance:
    """One broker process of one release, and a client of it."""

    name: str
    process: BrokerProcess
    client: httpx.AsyncClient
    previous: bool
    """The release before (else this tree)."""

    async def publish(self, topic: str, body: Any, key: str | None = None) -> httpx.Response:
        headers = {"Idempotency-Key": key} if key else {}
        return await self.client.post(f"/topics/{topic}/events", json=body, headers=headers)

    async def ingest(self, topic: str, body: bytes, key: str | None = None) -> httpx.Response:
        headers = {**NDJSON, "Idempotency-Key": key} if key else NDJSON
        return await self.client.post(f"/topics/{topic}/events", content=body, headers=headers)

    async def stored(self, topic: str) -> list[dict[str, Any]]:
        """The topic's log as this instance reads it."""
        return await history(self.client, topic)  # type: ignore[return-value,unused-ignore]


Scenario = Callable[[Instance, Instance], Awaitable[None]]


def with_blanks(first: int, last: int) -> bytes:
    """Lines ``first`` to ``last`` of a stream whose lines in BLANK_LINES are blank."""
    return b"".join(b" \n" if n in BLANK_LINES else lines(n, n) for n in range(first, last + 1))


def datas_of(last: int) -> list[str]:
    """What such a stream's lines 1 to ``last`` store."""
    return [f"t{n}" for n in range(1, last + 1) if n not in BLANK_LINES]


def lines(first: int, last: int, prefix: str = "t") -> bytes:
    return b"".join(line(f"{prefix}{n}") for n in range(first, last + 1))


def datas(first: int, last: int, prefix: str = "t") -> list[str]:
    return [f"{prefix}{n}" for n in range(first, last + 1)]


def answered(response: httpx.Response, status: int) -> Any:
    must(response.status_code == status, f"{response.status_code}, not {status}: {response.text}")
    return response.json() if response.content else None


async def log_is(topic: str, expected: list[Any], *instances: Instance) -> list[str]:
    """The log holds ``expected`` exactly (each once, in order), as every instance reads
    it, with the same ids; those ids."""
    ids: list[str] | None = None
    for instance in instances:
        events = await instance.stored(topic)
        datas_read = [e["data"] for e in events]
        must(datas_read == expected, f"{instance.name} reads {datas_read}, not {expected}")
        read_ids = [str(e["id"]) for e in events]
        must(ids in (None, read_ids), f"{instance.name} reads other ids: {read_ids} != {ids}")
        ids = read_ids
    assert ids is not None
    return ids


async def until_stored(instance: Instance, topic: str, count: int) -> None:
    async def stored() -> bool:
        return len(await instance.stored(topic)) >= count

    await await_until(stored, timeout=5, what=f"{count} events stored, read on {instance.name}")


# -- publishes ------------------------------------------------------------------------


async def publishes_alternating(first: Instance, second: Instance) -> None:
    """Single publishes and batches, each to the other instance than the one before."""
    topic, acked, expected = new_topic("up"), [], []
    for n in range(12):
        instance = (first, second)[n % 2]
        if n % 4 == 3:
            body = answered(await instance.publish(topic, [{"data": n}, {"data": -n}]), 201)
            acked += body["ids"]
            expected += [n, -n]
        else:
            acked.append(answered(await instance.publish(topic, {"data": n}), 201)["id"])
            expected.append(n)
    must(await log_is(topic, expected, first, second) == acked, "ids other than answered")


async def keyed_publish_retried_on_the_other(first: Instance, second: Instance) -> None:
    """A publish's retry with its Idempotency-Key, to the other instance: 200, replayed,
    the first answer's ids, nothing stored twice. A text and a batch too."""
    topic, acked = new_topic("up"), []
    for n in range(4):
        key = f"publish-{n}"
        body = {"data": n} if n % 2 else [{"data": n}, {"data": -n}]
        stored = answered(await first.publish(topic, body, key), 201)
        again = await second.publish(topic, body, key)
        must(answered(again, 200) == stored, f"retry {n}: {again.text} != {stored}")
        must(again.headers.get("idempotent-replayed") == "true", f"retry {n}: not replayed")
        acked += stored.get("ids", [stored.get("id")])
    text = {"Idempotency-Key": "text", "Content-Type": "text/plain; charset=utf-8"}
    path = f"/topics/{topic}/events?event=note"
    stored = answered(await first.client.post(path, content=b"a text", headers=text), 201)
    again = await second.client.post(path, content=b"a text", headers=text)
    must(answered(again, 200) == stored, f"the text's retry: {again.text} != {stored}")
    expected = [0, 0, 1, 2, -2, 3, "a text"]
    must(await log_is(topic, expected, first, second) == [*acked, stored["id"]], "other ids")


# -- streaming ingests -----------------------------------------------------------------


async def ingest_broken_then_resent_whole(first: Instance, second: Instance) -> None:
    """A keyed ingest cut mid-line on one instance, its lines stored; the whole stream
    resent to the other: the lines stored replayed (their ids), the rest after them.
    Blank lines among them, and the last ones before the cut."""
    topic, key = new_topic("up"), "broken"
    ingest = await RawIngest.open(first.process, topic, headers={"Idempotency-Key": key})
    try:
        await ingest.send(with_blanks(1, 6) + b'{"data": "t7", "ev')
        await until_stored(second, topic, len(datas_of(6)))
    finally:
        ingest.cut()
    kept = [e["id"] for e in await second.stored(topic)]
    resent = answered(await second.ingest(topic, with_blanks(1, 9), key), 201)
    ids = await log_is(topic, datas_of(9), first, second)
    must(resent["ids"] == ids and ids[:3] == kept, f"ids: {resent} vs {ids}, kept {kept}")
    again = answered(await first.ingest(topic, with_blanks(1, 9), key), 200)  # (once more)
    must(again == resent, f"resent to {first.name}: {again} != {resent}")


async def ingest_ending_with_blank_lines(first: Instance, second: Instance) -> None:
    """A keyed body whose last lines are blank (this release counts them: ``:b``),
    resent whole to the other instance and back: the same answer, nothing stored twice."""
    topic, key = new_topic("up"), "blank-end"
    body = lines(1, 3) + b"\n \n"
    stored = answered(await first.ingest(topic, body, key), 201)
    must(answered(await second.ingest(topic, body, key), 200) == stored, "resent: other ids")
    must(answered(await first.ingest(topic, body, key), 200) == stored, "again: other ids")
    must(await log_is(topic, datas(1, 3), first, second) == stored["ids"], "other ids")


@dataclass(frozen=True)
class Differing:
    """Two streams under one key that differ by a blank line: the second is refused
    at line ``differs``, the log the first's lines. ``mixes``: with which
    instances the second is not refused (the previous release's part in it)."""

    what: str
    first: bytes
    second: bytes
    differs: int
    mixes: Callable[[Instance, Instance], bool]


DIFFERING = [
    # Blank last lines: counted by the instance that answers the first (the previous
    # release counts none), and the previous release answering the second takes a line
    # at the count's end (here line 4) for a line of its own.
    Differing("its last lines blank", lines(1, 3) + b"\n", lines(1, 4), 4, lambda a, b: True),
    # A blank first line: the previous release answering the second looks at no line
    # before its first.
    Differing("its first line blank", lines(1, 3), b"\n" + lines(2, 3), 1, lambda a, b: b.previous),
    # A blank line where the first stored a line past blank ones: the previous release
    # writes no "K\nn\n>" (the line after n), so this one answering the second does not
    # find the line it stored (the second's line above it, stored).
    Differing(
        "a blank line where the other went on",
        lines(1, 1) + b"\n\n" + lines(4, 4),
        lines(1, 1) + b"\n\n\n" + lines(5, 5),
        4,
        lambda a, b: a.previous,
    ),
    # A body of blank lines only, its topic there: counted too (this release begins its
    # ingest's records with it), by this release only.
    Differing("its lines all blank", b"\n\n", lines(1, 2), 1, lambda a, b: a.previous),
]


async def differing_stream_refused(first: Instance, second: Instance) -> None:
    """Two streams under one key that differ by a blank line (a producer's error), the
    second sent to the other instance: refused at that line (400), nothing of it stored.
    Where the release before has its part in it (``Differing.mixes``), they
    mix, each line still stored once: the refusal holds once every instance runs this
    release (README, Upgrading), and the mix is seen exactly as expected."""
    known = []
    for row in DIFFERING:
        topic, key = new_topic("up"), "differing"
        answered(await first.publish(topic, {"data": "there"}), 201)  # (the topic is there)
        answered(await first.ingest(topic, row.first, key), 201)
        answer = await second.ingest(topic, row.second, key)
        kept = ["there", *_stored_by(row.first)]
        if answer.status_code != 400 and row.mixes(first, second):
            await _mixed_as_before(topic, row, answer, first, second)
            known.append(f"{row.what}: {answer.status_code}, the two streams mixed")
            continue
        must(answer.status_code == 400, f"{row.what}: {answer.status_code} {answer.text}")
        detail = answer.json()["detail"]
        must(detail.startswith(f"line {row.differs}: "), f"{row.what}: {detail}")
        await log_is(topic, kept, first, second)
    if known:
        raise HoldsOnceEveryInstanceRunsIt("; ".join(known))


def _stored_by(body: bytes) -> list[Any]:
    return [json.loads(sent)["data"] for sent in body.split(b"\n") if sent.strip()]


async def _mixed_as_before(
    topic: str, row: Differing, answer: httpx.Response, *instances: Instance
) -> None:
    """The mix exactly: each stream's lines stored once, in the order they came, and
    the second answered with the ids of its own lines (201 where it stored one, else
    200: all replayed)."""
    theirs = ["there", *_stored_by(row.first), *_stored_by(row.second)]
    expected = [data for n, data in enumerate(theirs) if data not in theirs[:n]]
    ids = await log_is(topic, expected, *instances)
    own = [i for i, data in zip(ids, expected, strict=True) if data in _stored_by(row.second)]
    status = 201 if len(expected) > 1 + len(_stored_by(row.first)) else 200
    must(answered(answer, status)["ids"] == own, f"{row.what}: {answer.text}, stored {ids}")


async def two_streams_under_one_key_at_once(first: Instance, second: Instance) -> None:
    """One stream sent twice at once, one to each instance (a retry while the first
    connection still lives), interleaved, blank lines among them, with ``?close=true``:
    each line stored once in order, both answered with the same ids, the topic closed
    once."""
    topic, key = new_topic("up"), {"Idempotency-Key": "twice-at-once"}
    one = await RawIngest.open(first.process, topic, "?close=true", key)
    other = await RawIngest.open(second.process, topic, "?close=true", key)
    try:
        for ingest, (start, end), reader in [
            (one, (1, 3), second), (other, (1, 5), first), (one, (4, 8), second),
            (other, (6, 10), first),
        ]:  # fmt: skip
            await ingest.send(with_blanks(start, end))
            await until_stored(reader, topic, len(datas_of(end)))
        await one.send(with_blanks(9, 10))
        answers = [await one.end(), await other.end()]
    finally:
        one.cut()
        other.cut()
    must([a.status for a in answers] == [201, 201], f"answers: {[a.body for a in answers]}")
    *ids, end_id = await log_is(topic, [*datas_of(10), {}], first, second)
    for answer in answers:
        body = json.loads(answer.body)
        must(body == {"ids": ids, "end_id": end_id}, f"answered {body}, stored {ids}, {end_id}")


# -- closing, resuming, expiry, deleting -------------------------------------------------


async def closed_on_one_refused_on_the_other(first: Instance, second: Instance) -> None:
    """A close, or a publish's ``?close=true``, on one: a publish (single or streamed) to
    the other is 409; a close there answers 200 with the same end."""
    for how in ("close", "close=true"):
        topic = new_topic("up")
        answered(await first.publish(topic, {"data": 1}), 201)
        if how == "close":
            end = answered(await first.client.post(f"/topics/{topic}/close"), 201)["id"]
        else:
            path = f"/topics/{topic}/events?close=true"
            end = answered(await first.client.post(path, json={"data": 2}), 201)["end_id"]
        refused = answered(await second.publish(topic, {"data": 3}), 409)
        must(refused["type"] == "/problems#topic-closed", f"{how}: {refused}")
        answered(await second.ingest(topic, lines(1, 2), "late"), 409)
        again = answered(await second.client.post(f"/topics/{topic}/close"), 200)
        must(again["id"] == end, f"{how}: closed again with {again}, not {end}")
        expected = [1, {}] if how == "close" else [1, 2, {}]
        must((await log_is(topic, expected, first, second))[-1] == end, f"{how}: its end")


async def resumed_on_the_other(first: Instance, second: Instance) -> None:
    """A subscriber of one instance comes back to the other with its Last-Event-ID,
    from an event's id and from the cursor a stream at the origin (no log yet) sends:
    every event after it exactly once, in order, then live ones, no gap."""
    for start in ("event", "origin"):
        topic, acked = new_topic("up"), []
        async with SseStream(first.client, f"/topics/{topic}/events") as stream:
            if start == "event":
                for n in range(3):
                    acked.append(answered(await first.publish(topic, {"data": n}), 201)["id"])
                await stream.take(3)
            await await_until(lambda: stream.last_event_id, timeout=5, what="a cursor")
            resume_from = stream.last_event_id
        for n in range(3, 7):
            instance = (first, second)[n % 2]
            acked.append(answered(await instance.publish(topic, {"data": n}), 201)["id"])
        headers = {"Last-Event-ID": resume_from}
        async with SseStream(second.client, f"/topics/{topic}/events", headers=headers) as again:
            received = await again.take(4)
            for n in range(7, 9):
                instance = (first, second)[n % 2]
                acked.append(answered(await instance.publish(topic, {"data": n}), 201)["id"])
            received += await again.take(2)
        told = [(e.id, e.event) for e in received]
        problems = delivery_problems(acked[-6:], told, gaps_allowed=False)
        must(not problems, f"from {start} {resume_from}: {problems}")


async def expired_on_the_other(first: Instance, second: Instance) -> None:
    """A topic's TTL (a policy both know) runs from its last publish on either
    instance: publishes to the other keep the first's records (a keyed publish's, a
    keyed ingest's lines) answering; once unused, the whole topic expires, every key of
    it, and a subscriber coming back to either is told of the lost log."""
    topic = new_topic("ttl-up")
    key = "kept"
    first_id = answered(await first.publish(topic, {"data": "first"}, key), 201)["id"]
    ingested = answered(await first.ingest(topic, lines(1, 2), key), 201)
    for n in range(3):  # (past the TTL in all, each publish well within it of the one before)
        await asyncio.sleep(TTL_S / 2)  # (time passing is the check, no race to wait out)
        answered(await second.publish(topic, {"data": n}), 201)
    again = answered(await second.publish(topic, {"data": "first"}, key), 200)
    must(again["id"] == first_id, f"the keyed publish's retry: {again}, not {first_id}")
    must(answered(await second.ingest(topic, lines(1, 2), key), 200) == ingested, "ingest")
    last = (await second.stored(topic))[-1]["id"]

    async def gone() -> bool:
        return (await first.client.get(f"/topics/{topic}")).status_code == 404

    await await_until(gone, timeout=TTL_S + 4, what=f"{topic} expired, read on {first.name}")
    must((await second.client.get(f"/topics/{topic}")).status_code == 404, "not expired there")
    async with aredis.from_url(f"redis://127.0.0.1:{_redis_port(first)}/0") as redis:
        left = [k async for k in redis.scan_iter(match=f"*{{{topic}}}*")]
    must(not left, f"keys left after the TTL: {left}")
    for instance in (first, second):
        headers = {"Last-Event-ID": str(last)}
        async with SseStream(instance.client, f"/topics/{topic}/events", headers=headers) as s:
            gap = await s.next()
        must(gap.event == "broker.gap" and json.loads(gap.data)["reason"] == "unknown", gap)


def _redis_port(instance: Instance) -> int:
    assert instance.process.redis_url is not None
    return int(instance.process.redis_url.rsplit(":", 1)[1].split("/")[0])


async def deleted_on_the_other(first: Instance, second: Instance) -> None:
    """DELETE on one instance: the other's streams are told (``deleted``) and end, its
    ingest under way stops (409 topic-deleted, nothing stored, the topic not made
    again), and it reads the topic as gone."""
    topic, key = new_topic("up"), {"Idempotency-Key": "cut-by-delete"}
    first_id = answered(await first.publish(topic, {"data": 0}), 201)["id"]
    ingest = await RawIngest.open(second.process, topic, headers=key)
    try:
        await ingest.send(lines(1, 1))
        await until_stored(first, topic, 2)
        headers = {"Last-Event-ID": first_id}
        async with SseStream(second.client, f"/topics/{topic}/events", headers=headers) as stream:
            [line_1] = await stream.take(1)
            must(line_1.data == '"t1"', f"read {line_1}")
            answered(await first.client.delete(f"/topics/{topic}"), 204)
            gap = await stream.next()
            must(await stream.wait_ended(5), f"the stream on {second.name} goes on")
        must(gap.event == "broker.gap", f"not told: {gap}")
        must(json.loads(gap.data)["reason"] == "deleted", f"told {gap.data}")
        await ingest.send(lines(2, 2))
        stopped = await ingest.end()
    finally:
        ingest.cut()
    must(stopped.status == 409, f"the ingest after the DELETE: {stopped.status} {stopped.body!r}")
    must(json.loads(stopped.body)["type"] == "/problems#topic-deleted", stopped.body)
    for instance in (first, second):
        status = (await instance.client.get(f"/topics/{topic}")).status_code
        must(status == 404, f"{instance.name} reads the deleted topic: {status}")


SCENARIOS: list[Scenario] = [
    publishes_alternating,
    keyed_publish_retried_on_the_other,
    ingest_broken_then_resent_whole,
    ingest_ending_with_blank_lines,
    differing_stream_refused,
    two_streams_under_one_key_at_once,
    closed_on_one_refused_on_the_other,
    resumed_on_the_other,
    expired_on_the_other,
    deleted_on_the_other,
]
