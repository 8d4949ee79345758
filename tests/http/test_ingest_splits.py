"""Streaming ingests cut anywhere, through a real broker (property tests, few examples:
each is a round trip). A few requests pipelined on one raw connection (ingests chunked
in random chunks, hex in either case, extensions, a trailer, or sized; one with a bad
line; single publishes; a health check uvicorn serves) and a read of the topic's log,
written in random pieces: every line is stored once, in order, and every request
answered in turn, whatever the cuts. The lean route decodes the framing and the lines
where they arrive (``api.body_framing``, ``api.ingest``): a line, a CRLF or a
character cut between reads must not be lost, merged or split, and what follows a
body is the next request. A chunked framing broken anywhere is answered 400, and a
body changed at random is answered alike on the lean route and uvicorn's."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from api.body_framing import ChunkedBody
from api.raw_answers import INVALID_REQUEST
from tests.http.helpers import new_topic
from tests.http.test_lean_ingest import NDJSON, ROUTES, exchange_on, same, stored_is
from tests.http.test_lean_publish import Answer, Connection, history_bytes, publish_bytes
from tests.support.broker_process import BrokerProcess
from tests.support.polling import await_until
from tests.support.properties import bounded, pieces

DATA = st.text(max_size=8) | st.integers(-(2**70), 2**70)
LINES = st.lists(DATA.map(lambda data: json.dumps({"data": data}, ensure_ascii=False)), max_size=6)
BLANK = st.sampled_from(["", " ", "\r"])


@st.composite
def ndjson(draw: st.DrawFn) -> tuple[bytes, list[Any]]:
    """An NDJSON body (blank lines among its lines, LF or CRLF) and the data it holds."""
    lines = draw(LINES)
    body = ""
    for line in lines:
        if draw(st.booleans()):
            body += draw(BLANK) + "\n"
        body += line + draw(st.sampled_from(["\n", "\r\n"]))
    return body.encode(), [json.loads(line)["data"] for line in lines]


@st.composite
def chunks(draw: st.DrawFn, body: bytes) -> bytes:
    """``body`` in chunks of random sizes, hex in either case, some with extensions."""
    cuts = draw(st.lists(st.integers(0, len(body)), max_size=4))
    framed = b""
    for piece in pieces(body, cuts) if body else []:  # (a chunk of 0 would end the body)
        size = b"%x" % len(piece)
        size = size.upper() if draw(st.booleans()) else size
        framed += size + draw(st.sampled_from([b"", b";a=b", b';x="y z"'])) + b"\r\n"
        framed += piece + b"\r\n"
    return framed


@st.composite
def chunked(draw: st.DrawFn, body: bytes) -> bytes:
    """``body`` chunked, ended, with a trailer or not."""
    trailer = draw(st.sampled_from([b"", b"X-Sum: 1\r\n"]))
    return draw(chunks(body)) + b"0\r\n" + trailer + b"\r\n"


def ingest_bytes(port: int, topic: str, framing: str, body: bytes) -> bytes:
    head = [f"POST /topics/{topic}/events HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    head += [f"Content-Type: {NDJSON}", framing]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


def framed(draw: st.DrawFn, port: int, topic: str, body: bytes) -> bytes:
    """An ingest of ``body``, chunked or sized."""
    if draw(st.booleans()):
        return ingest_bytes(port, topic, "Transfer-Encoding: chunked", draw(chunked(body)))
    return ingest_bytes(port, topic, f"Content-Length: {len(body)}", body)


@st.composite
def ingest(draw: st.DrawFn, port: int, topic: str) -> tuple[bytes, int, list[Any]]:
    """A streaming ingest: its bytes, its status and the data stored."""
    body, datas = draw(ndjson())
    return framed(draw, port, topic, body), 201, datas


@st.composite
def bad_ingest(draw: st.DrawFn, port: int, topic: str) -> tuple[bytes, int, list[Any]]:
    """An ingest with a line that is not JSON: 400, the lines before it stored, the rest
    of its body read and dropped (the next request is served)."""
    before, datas = draw(ndjson())
    after, _ = draw(ndjson())
    return framed(draw, port, topic, before + b"{not json\n" + after), 400, datas


@st.composite
def publish(draw: st.DrawFn, port: int, topic: str) -> tuple[bytes, int, list[Any]]:
    """A single publish: sized (served lean) or chunked (uvicorn's)."""
    data = draw(DATA)
    body = json.dumps({"data": data}, ensure_ascii=False).encode()
    return publish_bytes(port, topic, body, chunked=draw(st.booleans())), 201, [data]


def health_check(port: int) -> tuple[bytes, int, list[Any]]:
    """A request uvicorn's protocol serves (the connection handed over, and taken back)."""
    return f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode(), 200, []


@st.composite
def exchanges(draw: st.DrawFn, port: int, topic: str) -> tuple[bytes, list[int], list[Any]]:
    """Requests pipelined on one connection (the last one reads the topic's log): their
    bytes, the statuses answered in order, and the data the log must hold."""
    kinds = st.sampled_from(
        [ingest, ingest, bad_ingest, publish, lambda port, topic: st.just(health_check(port))]
    )
    requests = [draw(draw(kinds)(port, topic)) for _ in range(draw(st.integers(1, 3)))]
    data = b"".join(request for request, _, _ in requests) + history_bytes(port, topic)
    statuses = [status for _, status, _ in requests] + [200]
    return data, statuses, [datum for _, _, datas in requests for datum in datas]


async def send_in_pieces(connection: Connection, data: bytes, cuts: list[int]) -> None:
    """Each piece written and flushed on its own (no Nagle: a segment each, most of the
    time; the broker may still read two at once)."""
    connection.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for piece in pieces(data, cuts):
        await connection.send(piece)


async def exchange_cut(port: int, data: bytes, cuts: list[int], count: int) -> list[Answer]:
    """The answers to ``data``, written in pieces: one a request, the last one the log."""
    connection = await Connection.open(port)
    try:
        await send_in_pieces(connection, data, cuts)
        return await connection.answers(count)
    finally:
        await connection.close()


@bounded(examples=25, deadline_ms=15_000)
@given(st.data(), st.lists(st.integers(0, 900), max_size=10))
def test_requests_cut_anywhere_store_their_lines_once_in_order(
    http_broker: BrokerProcess, draw: st.DataObject, cuts: list[int]
) -> None:
    topic = new_topic("split")
    data, statuses, stored = draw.draw(exchanges(http_broker.port, topic))
    answers = asyncio.run(exchange_cut(http_broker.port, data, cuts, len(statuses)))
    assert [answer.status for answer in answers] == statuses, answers
    # (the standard library's parse: orjson's makes a float of an integer past 64 bits)
    assert [event["data"] for event in json.loads(answers[-1].body)["events"]] == stored


BREAKS = [b"zz\r\n", b"-1\r\n", b"3 \r\n", b"3\nabc\r\n", b"3\r\nabcd\r\n", b"3;a\x01\r\nabc\r\n"]
BREAKS += [b"1" * 16 + b"\r\n", b"3\r\nabc\r\n0\r\nContent-Length: 3\r\n\r\n"]


@bounded(examples=20, deadline_ms=15_000)
@given(ndjson(), st.data(), st.sampled_from(BREAKS), st.lists(st.integers(0, 600), max_size=8))
def test_a_broken_framing_is_answered_400_in_any_split_the_lines_before_it_stored(
    http_broker: BrokerProcess,
    lines: tuple[bytes, list[Any]],
    draw: st.DataObject,
    broken: bytes,
    cuts: list[int],
) -> None:
    """As uvicorn answers bytes httptools cannot parse, the connection closed after; the
    lines whole before the break are stored (a deviation of the lean route: uvicorn's
    drops what the app had not read)."""
    body, datas = lines
    framing = draw.draw(chunks(body)) + broken + b'{"data": 1}\n'
    topic = new_topic("broken")
    request = ingest_bytes(http_broker.port, topic, "Transfer-Encoding: chunked", framing)

    async def exchange() -> None:
        connection = await Connection.open(http_broker.port)
        try:
            await send_in_pieces(connection, request, cuts)
            answer = await connection.answer()
            assert (answer.status, answer.body) == (400, INVALID_REQUEST.encode()), answer
            assert await connection.closed_by_server()
        finally:
            await connection.close()
        await await_until(
            lambda: stored_is(http_broker, topic, datas), timeout=5, what="the lines stored"
        )

    asyncio.run(exchange())


CHANGES = [b"\n", b"\r", b" ", b";", b"=", b'"', b"-", b"0", b"f", b"x", b"\x00", b"\r\n"]


def changed(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a byte inserted or deleted."""
    at = draw(st.integers(0, len(data)))
    if draw(st.booleans()):
        return data[:at] + draw(st.sampled_from(CHANGES)) + data[at:]
    return data[:at] + data[at + 1 :]


@st.composite
def changed_ingest(draw: st.DrawFn) -> bytes:
    """A chunked NDJSON body changed once: its framing (broken, most often, or not) or its
    lines (one made bad, or not)."""
    body, _ = draw(ndjson())
    if draw(st.booleans()):
        return draw(chunked(changed(draw, body)))
    return changed(draw, draw(chunked(body)))


def decided(framing: bytes) -> bool:
    """Whether the chunked framing ends or breaks in these bytes (not waiting for more)."""
    body = ChunkedBody()
    body.decode(framing)
    return body.ended or body.broken is not None


@bounded(examples=25, deadline_ms=15_000)
@given(changed_ingest().filter(decided))
def test_a_changed_ingest_is_answered_alike_on_both_routes(
    http_broker: BrokerProcess, framing: bytes
) -> None:
    """The lean route (its own decoder) and uvicorn's (httptools) answer alike: 201, a
    bad line's 400, or 400 for the framing. Written at once: in pieces, a bad line
    before a break could be answered before the break is read, or after."""

    async def answer(route: str) -> Answer:
        request = ingest_bytes(
            http_broker.port, new_topic("alike"), "Transfer-Encoding: chunked", framing
        )
        [answer] = await exchange_on(route, http_broker.port, request)
        return answer

    async def answers() -> dict[str, Answer]:
        return {route: await answer(route) for route in ROUTES}

    same(asyncio.run(answers()))
