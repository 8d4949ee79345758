"""An answer given before a request's body ended, and the connection closed after it:
the client still sending must get the answer and then an end, never a reset.

A socket closed with bytes it has not read resets its connection (an RST, not a
FIN), and so does one that bytes reach once closed: a client still writing then sees
"connection reset", and its system may throw the answer away before it is read (a
middlebox, or a stack other than Linux's, does). So the broker closes such a
connection lingering (``api.lingering``): its answer written, it stops writing, and
reads and drops what the client still sends, for a bounded time and number of bytes.

The client here is a plain socket that writes the rest of its body once the answer
arrived, without reading it, then reads: as most HTTP clients do (they read the
answer once the body is sent). Its writes after the answer are well within the
broker's bounds (``LINGER_MAX_BYTES``).
"""

from __future__ import annotations

import asyncio
import select
import signal
import socket
import time
from dataclasses import dataclass

import httpx
import pytest

from api.lingering import LINGER_MAX_BYTES
from tests.http.helpers import metric_value, new_topic, request_bytes
from tests.http.test_ingest import chunk, line
from tests.support.broker_process import BrokerProcess
from tests.support.polling import await_until, wait_until
from tests.support.redis_server import RedisServer

ANSWER_WAIT_S = 10
WRITES_AFTER_ANSWER = 48
"""Writes of ``FILLER`` the client makes once the answer arrived, unread."""
WRITES_PAST_THE_BOUND = 256
"""As many, past what the broker reads and drops (some 2 MB)."""
FILLER = chunk(b"".join(line(f"more {n}") for n in range(400)))  # (some 8 KB)
NDJSON = {"Content-Type": "application/x-ndjson", "Transfer-Encoding": "chunked"}


@dataclass
class Outcome:
    """What the client saw: the bytes it read, and how the connection ended."""

    received: bytes
    ending: str  # "end" (a FIN) or what broke it


def ingest_head(
    broker: BrokerProcess, topic: str, route: str, headers: dict[str, str] | None = None
) -> bytes:
    """An ingest's head (``headers`` added), on the lean route or behind a request
    uvicorn's protocol reads (the by-app route, as tests/http/test_ingest_faults.open_ingest
    does)."""
    head = request_bytes(
        "POST", f"{broker.url}/topics/{topic}/events", {**NDJSON, **(headers or {})}
    )
    return head if route == "lean" else request_bytes("GET", f"{broker.url}/healthz") + head


def read_to_end(sock: socket.socket, before: bytes = b"") -> Outcome:
    """What the client reads until the connection's end (after ``before``, read already),
    or the error that stopped it."""
    received = bytearray(before)
    while True:
        try:
            data = sock.recv(65536)
        except OSError as error:
            return Outcome(bytes(received), f"reading: {error!r}")
        if not data:
            return Outcome(bytes(received), "end")
        received += data


def write_on_then_read(sock: socket.socket, last: bytes, writes: int) -> Outcome:
    """Send the bytes that are answered early, then write on once the answer arrived
    (not reading it), end the body, and read to the end."""
    try:
        sock.sendall(last)
        readable, _, _ = select.select([sock], [], [], ANSWER_WAIT_S)
        assert readable, "no answer"
        for _ in range(writes):
            sock.sendall(FILLER)
        sock.sendall(b"0\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
    except OSError as error:
        return Outcome(b"", f"writing: {error!r}")
    return read_to_end(sock)


def test_the_client_writes_within_the_broker_bounds_or_past_them() -> None:
    assert WRITES_AFTER_ANSWER * len(FILLER) < LINGER_MAX_BYTES / 2
    assert WRITES_PAST_THE_BOUND * len(FILLER) > LINGER_MAX_BYTES * 2


async def answered_mid_body(
    broker: BrokerProcess, client: httpx.AsyncClient, route: str, writes: int
) -> Outcome:
    """The topic deleted under an open ingest: its next line is answered 409 and the
    connection closed; the producer writes on ``writes`` times, then reads."""
    topic = new_topic()
    sock = socket.create_connection(("127.0.0.1", broker.port), timeout=ANSWER_WAIT_S)
    try:
        sock.sendall(ingest_head(broker, topic, route) + chunk(line(1) + line(2)))
        await await_until(lambda: stored(client, topic, 2), timeout=5, what="2 stored")
        assert (await client.delete(f"/topics/{topic}")).status_code in (200, 204)
        return await asyncio.to_thread(write_on_then_read, sock, chunk(line(3)), writes)
    finally:
        sock.close()


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_an_ingest_answered_and_closed_mid_body_ends_cleanly_for_a_client_writing_on(
    http_broker: BrokerProcess, aclient: httpx.AsyncClient, route: str
) -> None:
    """The producer, writing on after the 409, gets the 409 then an end; it got a reset
    (its writes refused, or its read after the answer failing)."""
    ended = await lingering_closes(aclient, "client_end")
    outcome = await answered_mid_body(http_broker, aclient, route, WRITES_AFTER_ANSWER)
    assert outcome.ending == "end", outcome
    answer = outcome.received.split(b"HTTP/1.1 ")[-1]
    assert answer.startswith(b"409 "), outcome.received
    assert b"connection: close\r\n" in answer and b"/problems#topic-deleted" in answer
    await counted(aclient, "client_end", ended + 1)


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_a_client_writing_on_past_the_bound_is_cut(
    http_broker: BrokerProcess, aclient: httpx.AsyncClient, route: str
) -> None:
    """What the broker reads and drops after its answer is bounded: past 1 MiB the
    connection is cut (its producer sees a reset, its answer kept where its system
    keeps it, as Linux does)."""
    cut = await lingering_closes(aclient, "bytes")
    await answered_mid_body(http_broker, aclient, route, WRITES_PAST_THE_BOUND)
    await counted(aclient, "bytes", cut + 1)


PUBLISH = {"Content-Type": "application/json"}
BROKEN_BY = {
    # uvicorn's parser stops at a chunk size that is none: 400, the body still coming
    "chunked framing": (
        {**PUBLISH, "Transfer-Encoding": "chunked"},
        chunk(b'{"data": "a'),
        b"zz\r\n",
    ),
    # a lean publish answered, then bytes that are no request
    "a request after a publish": (
        {**PUBLISH, "Content-Length": "13"},
        b'{"data": "a"}',
        b"\x01 no request\r\n",
    ),
}


@pytest.mark.parametrize("broken_by", BROKEN_BY)
async def test_a_publish_whose_bytes_break_ends_cleanly_for_a_client_writing_on(
    http_broker: BrokerProcess, aclient: httpx.AsyncClient, broken_by: str
) -> None:
    """Bytes the parser cannot read, while the client is still sending, are answered
    uvicorn's 400 and the connection closed lingering: the client writing on reads the
    400 then an end; it got a reset."""
    headers, first, broken = BROKEN_BY[broken_by]
    ended = await lingering_closes(aclient, "client_end")
    head = request_bytes("POST", f"{http_broker.url}/topics/{new_topic()}/events", headers)
    sock = socket.create_connection(("127.0.0.1", http_broker.port), timeout=ANSWER_WAIT_S)
    try:
        sock.sendall(head + first)
        outcome = await asyncio.to_thread(write_on_then_read, sock, broken, WRITES_AFTER_ANSWER)
    finally:
        sock.close()
    assert outcome.ending == "end", outcome
    answer = outcome.received.split(b"HTTP/1.1 ")[-1]
    assert answer.startswith(b"400 ") and b"connection: close\r\n" in answer, outcome.received
    await counted(aclient, "client_end", ended + 1)


async def counted(client: httpx.AsyncClient, ending: str, count: float) -> None:
    """Until the broker counted ``count`` lingering closes so ended (once it closed: its
    client may have read to the end before)."""

    async def reached() -> bool:
        return await lingering_closes(client, ending) >= count

    await await_until(reached, timeout=5, what=f"{count} lingering closes ({ending})")
    assert await lingering_closes(client, ending) == count


async def lingering_closes(client: httpx.AsyncClient, ending: str) -> float:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return metric_value(response.text, "broker_lingering_closes_total", {"ending": ending}) or 0


async def stored(client: httpx.AsyncClient, topic: str, count: int) -> bool:
    response = await client.get(
        f"/topics/{topic}/events", params={"limit": 10}, headers={"Accept": "application/json"}
    )
    return response.status_code == 200 and len(response.json()["events"]) == count


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_a_drain_closes_lingering_under_a_body_still_coming(
    redis_server: RedisServer, route: str
) -> None:
    """A bad line is answered 400 and the rest of its body read and dropped; a drain
    then closes the connection (its ingest is over) lingering: the producer writing on
    past the drain's close reads the 400 then an end. It got a reset (closed at once,
    or a second after the drain on the lean route)."""
    broker = BrokerProcess(redis_url=redis_server.url).start()
    try:
        sock = socket.create_connection(("127.0.0.1", broker.port), timeout=ANSWER_WAIT_S)
        try:
            sock.sendall(ingest_head(broker, new_topic(), route) + chunk(line(1)))
            answer = await asyncio.to_thread(answer_then_drain, sock, broker)
            outcome = await asyncio.to_thread(write_on_then_read, sock, b"", WRITES_AFTER_ANSWER)
        finally:
            sock.close()
        await exits_cleanly(broker)
    finally:
        broker.close()
    assert answer.split(b"HTTP/1.1 ")[-1].startswith(b"400 "), answer
    assert outcome.ending == "end", outcome


def answer_then_drain(sock: socket.socket, broker: BrokerProcess) -> bytes:
    """Send a bad line, read its 400, drain the broker, and read until the broker closed
    (what the client writes next comes after the broker's close)."""
    sock.sendall(chunk(b"{not json}\n"))
    received = bytearray()
    while not (b"HTTP/1.1 400 " in received and received.endswith(b"}")):
        data = sock.recv(65536)
        assert data, received
        received += data
    assert broker.process is not None
    broker.process.send_signal(signal.SIGTERM)
    while data := sock.recv(65536):
        received += data
    return bytes(received)


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_framing_broken_after_an_early_answer_gets_no_second_answer(
    http_broker: BrokerProcess, aclient: httpx.AsyncClient, route: str
) -> None:
    """A bad line is answered 400 and the rest of the body read and dropped; the rest's
    chunked framing then breaks. The request was answered: the connection closes
    (lingering), with no second answer. On the by-app route uvicorn's 400 for the
    framing was written after the first 400, a second answer to one request (a client
    that reuses the connection reads it as the answer to its next request), and counted
    as a second ingest 400; the lean route wrote none."""
    responses = await ingest_400s(aclient)
    sock = socket.create_connection(("127.0.0.1", http_broker.port), timeout=ANSWER_WAIT_S)
    try:
        sock.sendall(ingest_head(http_broker, new_topic(), route) + chunk(b"{not json}\n"))
        outcome = await asyncio.to_thread(answer_then_broken_framing, sock)
    finally:
        sock.close()
    assert outcome.ending == "end", outcome
    assert outcome.received.count(b"HTTP/1.1 400 ") == 1, outcome.received
    assert outcome.received.endswith(b"}"), outcome.received  # (the bad line's problem, last)
    assert await ingest_400s(aclient) == responses + 1


def answer_then_broken_framing(sock: socket.socket) -> Outcome:
    """Read the bad line's 400 (a whole problem), then send bytes that are no chunk, end
    the writing side, and read to the end."""
    received = bytearray()
    while not (b"HTTP/1.1 400 " in received and received.endswith(b"}")):
        data = sock.recv(65536)
        assert data, received
        received += data
    sock.sendall(b"zz\r\n")
    sock.shutdown(socket.SHUT_WR)
    return read_to_end(sock, bytes(received))


async def ingest_400s(client: httpx.AsyncClient) -> float:
    response = await client.get("/metrics")
    labels = {"route": "ingest", "status": "400"}
    return metric_value(response.text, "broker_http_responses_total", labels) or 0


PACED_WRITES = 50
"""Writes of ``FILLER`` a client makes after a 413, one each ``PACE_S``: its body goes
on past the broker's body deadline (limits_broker's: 1 s from the answer, which comes
at the head), with a second to spare."""
PACE_S = 0.05


async def test_a_body_refused_too_large_and_still_coming_past_its_deadline_ends_cleanly(
    limits_broker: BrokerProcess,
) -> None:
    """A publish declaring a body over BROKER_MAX_BODY_BYTES is answered 413 at once, and
    the rest of its body read and dropped; its body deadline (from the answer) passes
    while the client is still sending it. The connection then closes lingering: the
    client writing on reads the 413 and an end. It was closed at once, the client still
    writing got a reset (its writes refused), as the lingering close is there to
    prevent."""
    topic = new_topic()
    headers = {**PUBLISH, "Content-Length": "1000000"}
    head = request_bytes("POST", f"{limits_broker.url}/topics/{topic}/events", headers)
    sock = socket.create_connection(("127.0.0.1", limits_broker.port), timeout=ANSWER_WAIT_S)
    try:
        outcome = await asyncio.to_thread(write_paced_then_read, sock, head + b'{"data": "')
    finally:
        sock.close()
    assert outcome.ending == "end", outcome
    assert outcome.received.startswith(b"HTTP/1.1 413 "), outcome.received


def write_paced_then_read(sock: socket.socket, first: bytes) -> Outcome:
    """Send ``first``, wait for the answer (not reading it), write on slowly, end the
    writing side, and read to the end."""
    try:
        sock.sendall(first)
        readable, _, _ = select.select([sock], [], [], ANSWER_WAIT_S)
        assert readable, "no answer"
        for _ in range(PACED_WRITES):
            sock.sendall(FILLER)
            time.sleep(PACE_S)
        sock.shutdown(socket.SHUT_WR)
    except OSError as error:
        return Outcome(b"", f"writing: {error!r}")
    return read_to_end(sock)


async def exits_cleanly(broker: BrokerProcess) -> None:
    """The drain over: the broker's process exited 0 within the answer's wait."""
    assert broker.process is not None
    assert await asyncio.to_thread(broker.process.wait, ANSWER_WAIT_S) == 0, broker.log()


def sized_publish(url: str, body: bytes) -> bytes:
    headers = {**PUBLISH, "Content-Length": str(len(body))}
    return request_bytes("POST", url, headers, body)


def drain_begun(broker: BrokerProcess) -> None:
    """SIGTERM, and until the broker began its shutdown (its connections told of it)."""
    assert broker.process is not None
    broker.process.send_signal(signal.SIGTERM)
    wait_until(lambda: "Shutting down" in broker.log(), timeout=5, what="the drain to begin")


@pytest.mark.parametrize("route", ["lean", "by-app"])
@pytest.mark.parametrize("keyed", [False, True], ids=["keyless", "keyed"])
async def test_an_ingest_answered_early_whose_body_pauses_past_its_deadline_ends_cleanly(
    limits_broker: BrokerProcess, route: str, keyed: bool
) -> None:
    """A bad line is answered 400 and the rest of the body read and dropped; the
    producer then pauses past the body's deadline (limits_broker's: 1 s between reads)
    and the broker closes, then it writes on. The connection closed lingering: the
    producer reads the 400 and an end. On the lean route it was closed at once, and the
    producer writing on got a reset (its writes refused), as the lingering close is
    there to prevent (uvicorn's route lingered)."""
    headers = {"Idempotency-Key": f"paused-{route}"} if keyed else {}
    head = ingest_head(limits_broker, new_topic(), route, headers)
    sock = socket.create_connection(("127.0.0.1", limits_broker.port), timeout=ANSWER_WAIT_S)
    try:
        sock.sendall(head + chunk(line(1)) + chunk(b"{not json}\n"))
        answer = await asyncio.to_thread(answer_then_deadline, sock)
        outcome = await asyncio.to_thread(write_on_then_read, sock, b"", WRITES_AFTER_ANSWER)
    finally:
        sock.close()
    assert answer.split(b"HTTP/1.1 ")[-1].startswith(b"400 "), answer
    assert outcome.ending == "end", outcome


def answer_then_deadline(sock: socket.socket) -> bytes:
    """Read the bad line's 400, then send nothing until the broker ends its side: the
    body's deadline passed (the 400 kept the connection, the body unended). What the
    client writes next comes after the broker's close."""
    received = bytearray()
    while not (b"HTTP/1.1 400 " in received and received.endswith(b"}")):
        data = sock.recv(65536)
        assert data, received
        received += data
    while data := sock.recv(65536):  # (within the socket's timeout, ANSWER_WAIT_S)
        received += data
    return bytes(received)


TRICKLE_PACE_S = 0.6
"""A trickling client's pause between writes: within limits_broker's body deadline (1 s)."""
TRICKLED_WRITES = 5
"""Its writes at most (3 s): the rest's deadline (1 s from the answer) passed well before."""


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_the_rest_of_a_body_answered_early_trickling_is_dropped_within_one_deadline(
    limits_broker: BrokerProcess, route: str
) -> None:
    """A bad line is answered 400 and the rest of the body read and dropped, its client
    writing a line every 0.6 s, each within the body's deadline (1 s) of the one before:
    the rest must come whole within one deadline of the answer, and the connection
    closes lingering (the client reads the 400, then an end). The deadline was set again
    at each read dropped, on both routes: trickling, the client held the connection (and
    its descriptor) for ever."""
    head = ingest_head(limits_broker, new_topic(), route)
    sock = socket.create_connection(("127.0.0.1", limits_broker.port), timeout=ANSWER_WAIT_S)
    try:
        sock.sendall(head + chunk(line(1)) + chunk(b"{not json}\n"))
        answer = await asyncio.to_thread(read_problem, sock, b"400")
        outcome = await asyncio.to_thread(trickle_until_closed, sock)
    finally:
        sock.close()
    assert outcome.ending == "end", outcome
    assert answer.split(b"HTTP/1.1 ")[-1].startswith(b"400 "), answer


def trickle_until_closed(sock: socket.socket) -> Outcome:
    """Write a line, wait ``TRICKLE_PACE_S`` for the broker to end its side, and again,
    ``TRICKLED_WRITES`` times at most."""
    received = bytearray()
    for _ in range(TRICKLED_WRITES):
        try:
            sock.sendall(chunk(line("trickled")))
            readable, _, _ = select.select([sock], [], [], TRICKLE_PACE_S)
            data = sock.recv(65536) if readable else None
        except OSError as error:
            return Outcome(bytes(received), f"{error!r}")
        if data == b"":
            return Outcome(bytes(received), "end")
        received += data or b""
    return Outcome(bytes(received), f"still open after {TRICKLED_WRITES} writes")


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_the_rest_of_a_body_answered_early_sent_at_once_keeps_the_connection(
    limits_broker: BrokerProcess, route: str
) -> None:
    """A bad line is answered 400; its client sends the rest of the body at once and a
    request after it: the rest is read and dropped within its deadline, and the request
    after it answered on the same connection (kept alive, as uvicorn keeps it)."""
    head = ingest_head(limits_broker, new_topic(), route)
    sock = socket.create_connection(("127.0.0.1", limits_broker.port), timeout=ANSWER_WAIT_S)
    try:
        sock.sendall(head + chunk(line(1)) + chunk(b"{not json}\n"))
        await asyncio.to_thread(read_problem, sock, b"400")
        rest = chunk(line(2) + line(3)) + b"0\r\n\r\n"
        sock.sendall(rest + request_bytes("GET", f"{limits_broker.url}/healthz"))
        after = await asyncio.to_thread(read_problem, sock, b"200")
    finally:
        sock.close()
    assert after.startswith(b"HTTP/1.1 200 "), after


def read_problem(sock: socket.socket, status: bytes) -> bytes:
    """Read until an answer of ``status`` whose JSON body ended (a problem, or
    /healthz's)."""
    received = bytearray()
    start = b"HTTP/1.1 " + status + b" "
    while not (start in received and received.endswith(b"}")):
        data = sock.recv(65536)
        assert data, received
        received += data
    return bytes(received[received.index(start) :])


UVICORN_KEEP_ALIVE_S = 5
"""uvicorn's own keep-alive timeout (its default): a connection idle this long after an
answer is closed, at once."""


TOO_LARGE = 3 << 20
"""A publish body over http_broker's limit (1 MiB): 413 from its head, the rest dropped."""


def answered_early(broker: BrokerProcess, route: str, answer: bytes) -> tuple[bytes, bytes]:
    """The bytes answered early (a bad line's 400, or a 413) and the rest of their body."""
    if answer == b"400":
        head = ingest_head(broker, new_topic(), route)
        return head + chunk(line(1)) + chunk(b"{not json}\n"), chunk(line(2)) + b"0\r\n\r\n"
    too_large = {"Content-Type": "application/json", "Content-Length": str(TOO_LARGE)}
    head = request_bytes("POST", f"{broker.url}/topics/{new_topic()}/events", too_large)
    head = head if route == "lean" else request_bytes("GET", f"{broker.url}/healthz") + head
    return head + b"[", b" " * (TOO_LARGE - 2) + b"]"


ANSWERED_EARLY = [(route, answer) for route in ("lean", "by-app") for answer in (b"400", b"413")]


async def test_the_rest_of_a_body_answered_early_may_pause_past_uvicorns_keep_alive(
    http_broker: BrokerProcess,
) -> None:
    """A bad line is answered 400 (or a body too large 413); its client pauses longer
    than uvicorn's keep-alive timeout (5 s) but within the body's deadline (30 s) of the
    answer, then sends the rest and a request after it: the request is answered on the
    same connection. uvicorn's keep-alive timer, armed at the answer while the body was
    still coming, closed the connection at once (no lingering: a producer writing on got
    a reset) well before the deadline README gives the rest. Each route and answer on a
    connection of its own, all paused at once (one pause for the four)."""
    afters = await asyncio.gather(
        *(
            asyncio.to_thread(paused_then_rest, http_broker, route, answer)
            for route, answer in ANSWERED_EARLY
        )
    )
    for (route, answer), after in zip(ANSWERED_EARLY, afters, strict=True):
        assert after.startswith(b"HTTP/1.1 200 "), (route, answer, after)


def paused_then_rest(broker: BrokerProcess, route: str, answer: bytes) -> bytes:
    """Answered early, paused past uvicorn's keep-alive, the rest and a request sent:
    the request's answer."""
    sent, rest = answered_early(broker, route, answer)
    sock = socket.create_connection(("127.0.0.1", broker.port), timeout=ANSWER_WAIT_S)
    try:
        sock.sendall(sent)
        read_problem(sock, answer)
        # (the producer's pause: the broker must not end its side within it)
        ended, _, _ = select.select([sock], [], [], UVICORN_KEEP_ALIVE_S + 1)
        assert not ended, f"{route} {answer!r}: the broker ended the connection in the pause"
        sock.sendall(rest + request_bytes("GET", f"{broker.url}/healthz"))
        return read_problem(sock, b"200")
    finally:
        sock.close()
