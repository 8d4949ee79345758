"""Load-generator jobs for short-lived topics: `sessions` (LLM generations) and `churn`.

`sessions`: each slot runs generations one after another, each on a new topic: a
subscriber subscribes first (the producer waits until its stream is live: the 200, and
on the broker the cursor its stream from now then sends), then the producer sends
the tokens at a fixed pace, by one POST per token, one streaming (NDJSON) request, or
straight to Redis with `brokerclient.direct.DirectPublisher` (one per load-generator
process, shared by its slots, as one producer process would hold one), and closes
the topic. Some subscribers drop mid-generation and resume with
`Last-Event-ID`. Each session is checked: every token once, in order, and the end.
The spec says what differs between servers: `envelope` (a POST body is `{"data":
...}` or the token itself, as Nchan takes it) and `close` (the baseline and Nchan
cannot close a topic: their sessions end when the subscriber has the last token).
Event ids are only kept and sent back as `Last-Event-ID`, never read, so Nchan's own
(`<seconds>:<n>`) do as well as the broker's.

`churn`: topics are created at a fixed rate, each with one subscriber, a few events
spread over its life and a close; with a life of `live / rate` seconds, `live` topics
are open at any time once the ramp is over. Latency is recorded for events sent in
the measured window.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from bench.procstats import own_cpu_seconds
from bench.sse import SseEvent, SseStream, open_stream
from bench.wire import (
    LAST_CHUNK,
    KeepAliveClient,
    chunk,
    chunked_post_head,
    get_request,
    post_request,
)
from broker.errors import BrokerError
from broker.policy import TopicPolicy
from brokerclient.direct import DirectPublisher

if TYPE_CHECKING:
    from bench.loadgen import Channel

Message = dict[str, Any]
STATUS_TIMEOUT_S = 15.0
MAX_CONNECTS = 6  # per session: the first, the planned drop, and a few unplanned cuts
MAX_COME_BACKS = 10  # "come back later" answers a session takes before it gives up
MAX_RETRY_MS = 5000  # the longest wait for a "come back later" (the server's retry hint)
END = "broker.end"
NDJSON = "application/x-ndjson"


async def _sleep_until(monotonic: float) -> None:
    await asyncio.sleep(max(0.0, monotonic - time.monotonic()))


async def _connect(host: str, port: int) -> KeepAliveClient:
    _, client = await asyncio.get_running_loop().create_connection(KeepAliveClient, host, port)
    return client


def _token_data(n: int) -> dict[str, int]:
    return {"n": n, "t": time.time_ns()}


def _token(n: int, envelope: bool = True) -> bytes:
    """A token's publish body: `{"data": ...}` for the broker and the baseline; the data
    itself where a body is the message (Nchan), which its subscribers get as `data:`."""
    data = _token_data(n)
    return orjson.dumps({"data": data} if envelope else data)


# ---- sessions -------------------------------------------------------------------------------


def _future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


@dataclass
class Connection:
    """One of a session's GETs, as its subscriber saw it (reported for inexact sessions:
    what each connection brought, and what ended it). Times: seconds since the session
    began."""

    number: int
    opened_s: float
    last_event_id: str | None  # sent as Last-Event-ID
    status: int = 0
    status_s: float | None = None
    ended_s: float | None = None
    end_reason: str | None = None
    tokens: int = 0
    first_token: int | None = None
    last_token: int | None = None
    ids_without_event: list[str] = field(default_factory=list)  # the first few
    received_bytes: int = 0
    tail: str = ""  # its last bytes, when it ended

    def took(self, n: int) -> None:
        self.tokens += 1
        if self.first_token is None:
            self.first_token = n
        self.last_token = n

    def over(self, stream: SseStream | None, at_s: float) -> None:
        self.ended_s = at_s
        if stream is not None:
            self.end_reason = stream.end_reason or "the session was done"
            self.received_bytes = stream.received_bytes
            self.tail = stream.tail.decode(errors="replace")


@dataclass
class Session:
    """One generation as its subscriber saw it."""

    topic: str
    tokens: int
    closes: bool  # the producer closes the topic: the stream must end with broker.end
    drop_after: int | None  # the subscriber drops once it has this token, then resumes
    received: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    ended: bool = False
    gaps: int = 0
    gap_reasons: list[str] = field(default_factory=list)
    connects: int = 0
    dropped: bool = False
    last_id: str | None = None
    replayed_before_ns: int = 0  # tokens sent before this came by replay, not live
    status: int = 0
    stream: SseStream | None = None
    done: asyncio.Future[None] = field(default_factory=_future)
    # The server sends a stream's cursor once it is live (the broker: an id with no
    # event, for a stream from now): the producer waits for it, not for the 200.
    live_cursor: bool = False
    cursor: asyncio.Future[None] = field(default_factory=_future)  # a first id came
    came_back_later: int = 0  # 200s that ended before the stream was live
    began: float = field(default_factory=time.monotonic)
    connections: list[Connection] = field(default_factory=list)
    produced_s: tuple[float, float] | None = None  # when its producer began and ended

    def since(self) -> float:
        return round(time.monotonic() - self.began, 3)

    def on_event(self, event: SseEvent, connection: int) -> None:
        if connection != self.connects or self.done.done():
            return  # what a dropped connection still had in its last read
        if event.id is not None:
            self._took_id(event.id)
        if event.event == END:
            self.ended = True
            self._finish()
        elif event.event == "broker.gap":
            self.gaps += 1
            self.gap_reasons.append(orjson.loads(event.data).get("reason", "?"))
        elif event.event is None:
            self._token(orjson.loads(event.data))

    def on_last_id(self, event_id: str, connection: int) -> None:
        """An id with no event (the broker's cursor on a stream from now): kept as the
        last id, as EventSource keeps it, to resume from there."""
        if connection != self.connects or self.done.done():
            return
        self._took_id(event_id)
        ids = self.connections[-1].ids_without_event
        if len(ids) < 3:
            ids.append(event_id)

    def _took_id(self, event_id: str) -> None:
        self.last_id = event_id
        if not self.cursor.done():
            self.cursor.set_result(None)

    def _token(self, data: dict[str, Any]) -> None:
        now_ns = time.time_ns()
        self.received.append(data["n"])
        self.connections[-1].took(data["n"])
        if data["t"] >= self.replayed_before_ns:
            self.latencies_ms.append((now_ns - data["t"]) / 1e6)
        if not self.closes and data["n"] == self.tokens - 1:
            self._finish()
        elif data["n"] == self.drop_after and not self.dropped and self.stream is not None:
            self.dropped = True
            # As a network drop: the client resumes by its last id.
            self.stream.close("the planned drop")

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self.stream is not None:
            self.stream.close()

    @property
    def exact(self) -> bool:
        return (
            self.received == list(range(self.tokens))
            and (self.ended or not self.closes)
            and not self.gaps
        )

    async def follow(
        self, host: str, port: int, path: str, subscribed: asyncio.Future[int]
    ) -> None:
        """Subscribe, and resume by the last id whenever the stream ends before the end.

        ``subscribed`` is the producer's go: 200 once the stream is live, else the
        status that refused it (0: no answer)."""
        try:
            while self._may_connect():
                if not await self._connection(host, port, path, subscribed):
                    break
        finally:
            if not subscribed.done():
                subscribed.set_result(self.status if self.status != 200 else 0)
            self._finish()  # also when given up on: the stream is closed

    def _may_connect(self) -> bool:
        return (
            self.connects - self.came_back_later < MAX_CONNECTS
            and self.came_back_later <= MAX_COME_BACKS
            and not self.done.done()
        )

    async def _connection(
        self, host: str, port: int, path: str, subscribed: asyncio.Future[int]
    ) -> bool:
        """One GET, followed until it ends; whether to connect again."""
        self.connects += 1
        connection = self.connects
        headers = {"Last-Event-ID": self.last_id} if self.last_id else None
        if connection > 1:
            self.replayed_before_ns = time.time_ns()
        record = Connection(connection, self.since(), self.last_id)
        self.connections.append(record)
        self.stream = None
        try:
            self.stream = await open_stream(
                host,
                port,
                get_request(host, port, path, headers),
                functools.partial(self.on_event, connection=connection),
                functools.partial(self.on_last_id, connection=connection),
            )
            self.status = await asyncio.wait_for(self.stream.status, STATUS_TIMEOUT_S)
        except (OSError, TimeoutError) as error:
            self.status = 0
            record.end_reason = f"could not subscribe: {error!r}"
        record.status, record.status_s = self.status, self.since()
        stream = self.stream
        if self.status != 200 or stream is None:
            record.over(stream, self.since())
            return False
        if not subscribed.done():
            if not await self._went_live(stream):
                record.over(stream, self.since())
                return await self._come_back_later(stream)
            subscribed.set_result(200)
        await asyncio.wait({stream.ended, self.done}, return_when="FIRST_COMPLETED")
        record.over(stream, self.since())
        return True

    async def _went_live(self, stream: SseStream) -> bool:
        """Whether the stream that answered 200 is live, so that its producer may start.

        With a server that sends the cursor (the broker), once that came: a 200 may be
        the broker's "come back later" (its store did not answer in time), a stream that
        ends at once with no id, which EventSource takes as a reason to reconnect (a
        503 would stop it for good). No subscription was made: started on that 200, the
        producer's first tokens went to nobody, and the reconnect from now missed them
        with nothing to say so (a session 40 tokens short, with no gap)."""
        return not self.live_cursor or await _live(stream, self.cursor)

    async def _come_back_later(self, stream: SseStream) -> bool:
        """A stream that ended before it was live: come back after the server's retry
        hint, as EventSource does. False if it did not end (no cursor in time)."""
        if not stream.ended.done():
            return False
        self.came_back_later += 1
        await asyncio.sleep(min(stream.retry_ms or 0, MAX_RETRY_MS) / 1000)
        return True


@dataclass
class SessionTally:
    """What one worker's sessions add up to."""

    sessions: list[Session] = field(default_factory=list)
    published: int = 0
    publish_failed: int = 0
    subscribe_failed: int = 0
    late_s: list[float] = field(default_factory=list)  # each generation: end minus schedule
    failures: dict[str, int] = field(default_factory=dict)  # what went wrong, how often

    def failure(self, what: str) -> None:
        self.publish_failed += 1
        self.failures[what[:200]] = self.failures.get(what[:200], 0) + 1

    def result(self) -> Message:
        inexact = [s for s in self.sessions if not s.exact]
        return {
            "sessions": len(self.sessions),
            "exact": len(self.sessions) - len(inexact),
            "inexact_examples": [_describe(s) for s in inexact[:5]],
            "ended": sum(s.ended for s in self.sessions),
            "dropped_and_resumed": sum(s.dropped for s in self.sessions),
            "connects": sum(s.connects for s in self.sessions),
            "gaps": sum(s.gaps for s in self.sessions),
            "tokens_received": sum(len(s.received) for s in self.sessions),
            "tokens_published": self.published,
            "publish_failed": self.publish_failed,
            "subscribe_failed": self.subscribe_failed,
            "came_back_later": sum(s.came_back_later for s in self.sessions),
            "latencies_ms": [ms for s in self.sessions for ms in s.latencies_ms],
            "late_s": self.late_s,
            "failures": self.failures,
        }


def _describe(session: Session) -> Message:
    got = session.received
    return {
        "topic": session.topic,
        "received": len(got),
        "distinct": len(set(got)),
        "missing": _ranges(sorted(set(range(session.tokens)) - set(got)))[:5],
        "in_order": got == sorted(got),
        "ended": session.ended,
        "gaps": session.gap_reasons,
        "connects": session.connects,
        "last_status": session.status,
        "produced_s": session.produced_s,
        "connections": [dataclasses.asdict(c) for c in session.connections],
    }


def _ranges(numbers: list[int]) -> list[list[int]]:
    """Sorted numbers as [first, last] runs: [1, 2, 3, 7] -> [[1, 3], [7, 7]]."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return runs


class Producer:
    """One slot's producer: a keep-alive connection reused across its generations."""

    def __init__(
        self, spec: Message, tally: SessionTally, direct: DirectPublisher | None = None
    ) -> None:
        self.host, self.port = spec["host"], spec["port"]
        self.mode: str = spec["mode"]
        self.closes: bool = spec["close"]
        self.rate: float = spec["rate"]
        self.envelope: bool = spec["envelope"]
        self.tally = tally
        self.client: KeepAliveClient | None = None
        self.direct = direct

    async def generate(self, topic: str, tokens: int, start: float) -> None:
        try:
            if self.mode == "ingest":
                await self._stream(await self._client(), topic, tokens, start)
            elif self.direct is not None:
                await self._appends(self.direct, topic, tokens, start)
            else:
                await self._posts(topic, tokens, start)
        except (OSError, ConnectionError, BrokerError) as error:
            self.tally.failure(f"{self.mode}: {type(error).__name__}: {error}")
            self._drop_client()

    async def _client(self) -> KeepAliveClient:
        if self.client is None or not self.client.usable:
            self.client = await _connect(self.host, self.port)
        return self.client

    def _drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None

    async def _post(self, raw: bytes) -> int:
        """One request; sent again on a new connection if the server had closed the
        kept-alive one before it went out (nothing was sent, so nothing is stored twice)."""
        try:
            answer = (await self._client()).begin(raw)
        except ConnectionError:
            self._drop_client()
            answer = (await self._client()).begin(raw)
        status, _ = await answer
        return status

    async def _posts(self, topic: str, tokens: int, start: float) -> None:
        path = f"/topics/{topic}/events"
        for n in range(tokens):
            await _sleep_until(start + n / self.rate)
            body = _token(n, self.envelope)
            status = await self._post(post_request(self.host, self.port, path, body))
            self._count(status, 1)
        if self.closes:
            status = await self._post(
                post_request(self.host, self.port, f"/topics/{topic}/close", b"")
            )
            if status not in (200, 201):
                self.tally.failure(f"close answered {status}")

    async def _appends(
        self, direct: DirectPublisher, topic: str, tokens: int, start: float
    ) -> None:
        """One append per token straight to Redis, then the append script's close."""
        for n in range(tokens):
            await _sleep_until(start + n / self.rate)
            result = await direct.publish(topic, _token_data(n))
            self.tally.published += result.count
        if self.closes:
            await direct.close_topic(topic)

    async def _stream(self, client: KeepAliveClient, topic: str, tokens: int, start: float) -> None:
        path = f"/topics/{topic}/events" + ("?close=true" if self.closes else "")
        answer = client.begin(chunked_post_head(self.host, self.port, path, NDJSON))
        for n in range(tokens):
            await _sleep_until(start + n / self.rate)
            if answer.done():
                break  # the server answered early: an error
            client.write(chunk(_token(n) + b"\n"))
        if not answer.done():
            client.write(LAST_CHUNK)
        status, body = await answer
        self._count(status, len(orjson.loads(body).get("ids", [])) if status == 201 else 0)

    def _count(self, status: int, events: int) -> None:
        # Nchan answers 202 for a message stored while no subscriber was there (one
        # dropped and not yet back); the broker and the baseline answer 201.
        if status in (201, 202):
            self.tally.published += events
        else:
            self.tally.failure(f"{self.mode}: publish answered {status}")

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


async def _run_slot(
    spec: Message, slot: int, start: float, tally: SessionTally, direct: DirectPublisher | None
) -> None:
    producer = Producer(spec, tally, direct)
    rng = random.Random(f"{spec['seed']}:{slot}")
    tokens = spec["tokens"]
    followers: list[asyncio.Future[None]] = []
    try:
        for generation in range(spec["rounds"]):
            drop = rng.random() < spec["drop_fraction"]
            session = Session(
                topic=f"{spec['prefix']}.{slot}.{generation}",
                tokens=tokens,
                closes=spec["close"],
                drop_after=rng.randrange(tokens // 4, 3 * tokens // 4 + 1) if drop else None,
                live_cursor=spec["live_cursor"],
            )
            tally.sessions.append(session)
            subscribed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            path = f"/topics/{session.topic}/events"
            follower = asyncio.ensure_future(
                session.follow(spec["host"], spec["port"], path, subscribed)
            )
            if await subscribed != 200:
                tally.subscribe_failed += 1
                followers.append(follower)
                continue
            begin = max(start, time.monotonic())
            began_s = session.since()
            await producer.generate(session.topic, tokens, begin)
            session.produced_s = (began_s, session.since())
            tally.late_s.append(time.monotonic() - (begin + (tokens - 1) / spec["rate"]))
            # The subscriber has `grace_s` from the producer's last word, however late.
            followers.append(asyncio.ensure_future(_give_up_after(follower, spec["grace_s"])))
            start = time.monotonic()
    finally:
        producer.close()
        await asyncio.gather(*followers, return_exceptions=True)


async def _give_up_after(follower: asyncio.Future[None], seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(follower, seconds)


async def sessions_job(channel: Channel, spec: Message) -> Message:
    """Run `slots` generation slots, `rounds` generations each; a result for the lot."""
    tally = SessionTally()
    direct = _direct_publisher(spec) if spec["mode"] == "direct" else None
    try:
        await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
        cpu0, wall0 = own_cpu_seconds(), time.monotonic()
        slots = spec["slots"]
        await asyncio.gather(
            *(
                # Staggered over one token interval, so that the slots' tokens do not all
                # fall in the same millisecond.
                _run_slot(
                    spec, spec["first_slot"] + i, wall0 + i / slots / spec["rate"], tally, direct
                )
                for i in range(slots)
            )
        )
        cpu_s, wall_s = own_cpu_seconds() - cpu0, time.monotonic() - wall0
    finally:
        if direct is not None:
            await direct.aclose()
    return tally.result() | {"cpu_s": cpu_s, "wall_s": wall_s}


def _direct_publisher(spec: Message) -> DirectPublisher:
    """A publisher with the settings the broker runs with (TTL, retention, policies)."""
    options = dict(spec["direct_options"])
    options["topic_policies"] = [TopicPolicy(**p) for p in options["topic_policies"]]
    return DirectPublisher(spec["redis_url"], **options)


# ---- churn ----------------------------------------------------------------------------------


class PublisherPool:
    """Keep-alive connections for single-event POSTs, at most `size` requests in flight."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port = host, port
        self.idle: list[KeepAliveClient] = []
        self.gate = asyncio.Semaphore(size)
        self.failures: collections.Counter[str] = collections.Counter()

    def _idle_client(self) -> KeepAliveClient | None:
        """An idle connection the server has not closed meanwhile (as any HTTP client
        checks before reusing one: the server closes those idle too long)."""
        while self.idle:
            client = self.idle.pop()
            if client.usable:
                return client
        return None

    async def post(self, path: str, body: bytes) -> int:
        """The status; 0 if the connection failed (its reason in ``failures``)."""
        async with self.gate:
            client = self._idle_client() or await _connect(self.host, self.port)
            try:
                status, _ = await client.request(post_request(self.host, self.port, path, body))
            except (OSError, ConnectionError) as error:
                self.failures[f"{type(error).__name__}: {error}"] += 1
                client.close()
                return 0
            if client.usable:
                self.idle.append(client)
            return status

    def close(self) -> None:
        for client in self.idle:
            client.close()


def _stored_at_ms(event_id: str) -> int:
    """When Redis appended the event: the broker's ids are `<epoch>.<ms>-<seq>`, the
    Redis stream id after the dot. Opaque to clients; the bench peeks, to time
    delivery alone, without the publisher's HTTP request (and its queueing)."""
    return int(event_id.rpartition(".")[2].partition("-")[0])


@dataclass
class ChurnTally:
    """One worker's churn: topics, events sent and received in the window, latencies."""

    window_ns: tuple[int, int]
    topics: int = 0
    subscribe_failed: int = 0
    sent: int = 0
    received: int = 0
    publish_failed: int = 0
    ended: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    publish_ms: list[float] = field(default_factory=list)  # until the 201, queueing included
    delivery_ms: list[float] = field(default_factory=list)  # from the append in Redis
    live_now: int = 0
    live_max: int = 0

    def in_window(self, sent_ns: int) -> bool:
        return self.window_ns[0] <= sent_ns < self.window_ns[1]

    def on_event(self, event: SseEvent) -> None:
        if event.event == END:
            self.ended += 1
        elif event.event is None:
            sent_ns = orjson.loads(event.data)["t"]
            if self.in_window(sent_ns):
                now_ns = time.time_ns()
                self.received += 1
                self.latencies_ms.append((now_ns - sent_ns) / 1e6)
                if event.id is not None:
                    self.delivery_ms.append(now_ns / 1e6 - _stored_at_ms(event.id))


async def _topic_life(
    spec: Message, index: int, pool: PublisherPool, tally: ChurnTally, streams: set[SseStream]
) -> None:
    topic = f"{spec['prefix']}.{index}"
    path = f"/topics/{topic}/events"
    host, port = spec["host"], spec["port"]
    cursor: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def took_cursor(_: str) -> None:
        if not cursor.done():
            cursor.set_result(None)

    try:
        stream = await open_stream(
            host, port, get_request(host, port, path), tally.on_event, took_cursor
        )
        status = await asyncio.wait_for(stream.status, STATUS_TIMEOUT_S)
    except (OSError, TimeoutError):
        status = 0
    if status != 200 or not await _live(stream, cursor):
        # (A 200 that ends before the cursor is the broker's "come back later": no
        # subscription, so its events would go to nobody; see Session._went_live.)
        tally.subscribe_failed += 1
        if status == 200:
            stream.close()
        return
    streams.add(stream)
    tally.live_now += 1
    tally.live_max = max(tally.live_max, tally.live_now)
    try:
        await _publish_life(spec, path, pool, tally)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(stream.ended), spec["grace_s"])
    finally:
        tally.live_now -= 1
        stream.close()
        streams.discard(stream)


async def _live(stream: SseStream, cursor: asyncio.Future[None]) -> bool:
    """Whether the broker's stream from now sent its cursor (it is live) before it ended."""
    await asyncio.wait(
        {stream.ended, cursor}, timeout=STATUS_TIMEOUT_S, return_when="FIRST_COMPLETED"
    )
    return cursor.done()


async def _publish_life(spec: Message, path: str, pool: PublisherPool, tally: ChurnTally) -> None:
    """The topic's events, evenly over its life; the last one closes it."""
    born, events, life = time.monotonic(), spec["events"], spec["lifetime_s"]
    for n in range(events):
        await _sleep_until(born + n * life / max(events - 1, 1))
        last = n == events - 1
        sent_ns = time.time_ns()
        body = orjson.dumps({"data": {"n": n, "t": sent_ns}})
        status = await pool.post(path + ("?close=true" if last else ""), body)
        if status != 201:
            tally.publish_failed += 1
            if status:
                pool.failures[f"status {status}"] += 1
        elif tally.in_window(sent_ns):
            tally.sent += 1
            tally.publish_ms.append((time.time_ns() - sent_ns) / 1e6)


async def churn_job(channel: Channel, spec: Message) -> Message:
    """New topics at `rate`/s from `start_at` until the measured window ends."""
    steady_at = spec["start_at"] + spec["lifetime_s"]
    end_at = steady_at + spec["measure_s"]
    tally = ChurnTally(window_ns=(int(steady_at * 1e9), int(end_at * 1e9)))
    pool = PublisherPool(spec["host"], spec["port"], spec["publishers"])
    streams: set[SseStream] = set()
    lives: set[asyncio.Task[None]] = set()
    await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
    start, cpu0 = time.monotonic(), own_cpu_seconds()
    creating = end_at - spec["start_at"]
    live_at_window: int | None = None
    for index in range(int(creating * spec["rate"])):
        await _sleep_until(start + index / spec["rate"])
        if live_at_window is None and time.time() >= steady_at:
            live_at_window = tally.live_now
        task = asyncio.create_task(_topic_life(spec, index, pool, tally, streams))
        lives.add(task)
        task.add_done_callback(lives.discard)
        tally.topics += 1
    created_per_s = tally.topics / max(time.monotonic() - start, 1e-9)
    # Until every topic's life is over (its end arrived, or its own grace ran out), at most
    # `grace_s` past the window: a short run's lives are over long before.
    if lives:
        await asyncio.wait(set(lives), timeout=max(0.0, end_at + spec["grace_s"] - time.time()))
    result = _churn_result(tally, live_at_window, own_cpu_seconds() - cpu0, start)
    result["created_per_s"] = created_per_s
    result["publish_failures"] = dict(pool.failures)
    await _stop(lives, streams, pool)
    return result


def _churn_result(tally: ChurnTally, live: int | None, cpu_s: float, start: float) -> Message:
    return {
        "topics": tally.topics,
        "subscribe_failed": tally.subscribe_failed,
        "sent_in_window": tally.sent,
        "received_in_window": tally.received,
        "publish_failed": tally.publish_failed,
        "ended": tally.ended,
        "live_at_window_start": live,
        "live_max": tally.live_max,
        "latencies_ms": tally.latencies_ms,
        "publish_ms": tally.publish_ms,
        "delivery_ms": tally.delivery_ms,
        "cpu_s": cpu_s,
        "wall_s": time.monotonic() - start,
    }


async def _stop(
    lives: set[asyncio.Task[None]], streams: set[SseStream], pool: PublisherPool
) -> None:
    for stream in tuple(streams):
        stream.close()
    for task in tuple(lives):
        task.cancel()
    await asyncio.gather(*lives, return_exceptions=True)
    pool.close()


JOBS: dict[str, Callable[[Channel, Message], Awaitable[Message]]] = {
    "sessions": sessions_job,
    "churn": churn_job,
}
