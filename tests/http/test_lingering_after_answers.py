"""A connection closed after an answer while its client had sent requests ahead
(pipelined) behind the request answered: the client still sending must read the answer
and then an end, never a reset (``api.lingering.close_after_answer``: lingering is the
default close after an answer, whenever the client may still send).

Each answer here closes the connection after a request whose body ended, with a whole
request sent ahead behind it: a close at once (as these were) left the request sent
ahead, and what the client wrote next, unread, and the client got a reset, which may cost
it the answer (a system or a middlebox that drops what was not read yet). The client
writes on once the answer arrived (``write_on_then_read``): its writes failed, or its
read after the answer did.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from api.lingering import LINGER_SECONDS
from tests.http.helpers import new_topic, request_bytes
from tests.http.test_auth import _payload
from tests.http.test_auth import stored as stored_with_token
from tests.http.test_early_answers import (
    ANSWER_WAIT_S,
    PUBLISH,
    WRITES_AFTER_ANSWER,
    counted,
    lingering_closes,
    read_to_end,
    write_on_then_read,
)
from tests.http.test_ingest import chunk, line
from tests.support.broker_process import BrokerProcess
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer
from tests.support.tokens import JWT_SETTINGS, claims, hs_token


def sent_ahead(broker: BrokerProcess) -> bytes:
    """A whole request behind the one answered (its client reads on after the answers)."""
    return request_bytes("GET", f"{broker.url}/healthz")


@pytest.fixture(scope="module")
def jwt_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(redis_url=redis_server.url, env=JWT_SETTINGS).start()
    yield broker
    broker.close()


@pytest.mark.parametrize("route", ["lean", "by-app"])
async def test_an_ingest_whose_token_lapses_at_its_last_line_with_a_request_sent_ahead(
    jwt_broker: BrokerProcess, route: str
) -> None:
    """An ingest's token expires before its last line, which comes with its body's end
    and a request sent ahead: the line is refused 401 ``Connection: close``
    (``TokenLapsedMidIngest``), its body over. The client writing on reads the 401 then
    an end. It got a reset: the connection closed at once (its body had ended), the
    request sent ahead and what followed unread (lean: ``_close_after_ingest``; by-app:
    the guard's close, the ingest's message over, the request sent ahead queued)."""
    topic = new_topic("linger")
    token = hs_token(claims(publish=[topic], expires_in=3))
    exp = int(orjson.loads(_payload(token))["exp"])
    viewer = hs_token(claims(subscribe=[topic]))
    head = request_bytes(
        "POST",
        f"{jwt_broker.url}/topics/{topic}/events",
        {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/x-ndjson",
            "Transfer-Encoding": "chunked",
            # (uvicorn's protocol serves an ingest that expects 100 Continue)
            **({"Expect": "100-continue"} if route == "by-app" else {}),
        },
    )
    sock = socket.create_connection(("127.0.0.1", jwt_broker.port), timeout=ANSWER_WAIT_S)
    try:
        sock.sendall(head + chunk(line(1)))
        if route == "by-app":  # (its 100 Continue read: the next bytes read are the answer)
            assert (await asyncio.to_thread(sock.recv, 65536)).startswith(b"HTTP/1.1 100 ")
        await await_until(
            lambda: asyncio.to_thread(stored_lines, jwt_broker.url, topic, viewer),
            timeout=5,
            what="line 1 stored",
        )
        wait = max(0.0, exp + 0.2 - time.time())  # (the token's clock: whole seconds)
        assert wait < 5, wait
        await asyncio.sleep(wait)
        last = chunk(line(2)) + b"0\r\n\r\n" + sent_ahead(jwt_broker)
        outcome = await asyncio.to_thread(write_on_then_read, sock, last, WRITES_AFTER_ANSWER)
    finally:
        sock.close()
    assert outcome.ending == "end", outcome
    answer = outcome.received.split(b"HTTP/1.1 ")[-1]
    assert answer.startswith(b"401 "), outcome.received
    assert b"connection: close\r\n" in answer, outcome.received
    assert b"the token expired during the ingest" in answer, outcome.received


def stored_lines(url: str, topic: str, token: str) -> bool:
    return stored_with_token(url, topic, token) == [1]


async def test_a_publish_asking_to_close_with_a_request_sent_ahead_ends_cleanly(
    http_broker: BrokerProcess, aclient: httpx.AsyncClient
) -> None:
    """A lean publish with ``Connection: close``, a request sent ahead behind it (a
    client that should not, RFC 9112 9.6, but does): answered 201, then an end for the
    client writing on. It got a reset (``publish_answered`` closed at once)."""
    url = f"{http_broker.url}/topics/{new_topic()}/events"
    body = b'{"data": 1}'
    headers = {**PUBLISH, "Content-Length": str(len(body)), "Connection": "close"}
    received = await answered_once_then_ended(
        http_broker, aclient, request_bytes("POST", url, headers, body)
    )
    assert received.startswith(b"HTTP/1.1 201 "), received


async def answered_once_then_ended(
    broker: BrokerProcess, aclient: httpx.AsyncClient, request: bytes
) -> bytes:
    """``request`` (asking to close), a request sent ahead behind it, and the client
    writing on: what it read, one answer then an end (no reset), the close counted
    lingering (``client_end``)."""
    ended = await lingering_closes(aclient, "client_end")
    sock = socket.create_connection(("127.0.0.1", broker.port), timeout=ANSWER_WAIT_S)
    try:
        first = request + sent_ahead(broker)
        outcome = await asyncio.to_thread(write_on_then_read, sock, first, WRITES_AFTER_ANSWER)
    finally:
        sock.close()
    assert outcome.ending == "end", outcome
    assert outcome.received.count(b"HTTP/1.1 ") == 1, outcome.received
    await counted(aclient, "client_end", ended + 1)
    return outcome.received


@pytest.mark.parametrize("closing", ["connection-close", "http-1.0"])
async def test_an_ingest_whose_answer_closes_carries_out_nothing_sent_after_it(
    http_broker: BrokerProcess, aclient: httpx.AsyncClient, closing: str
) -> None:
    """An ingest whose answer closes the connection (``Connection: close``: lean; HTTP/1.0:
    uvicorn's protocol serves it), a publish sent after its body (which RFC 9112 9.6
    says is not processed): the ingest is answered, then an end; the publish is not
    stored. The lean one's was: its answer closed lingering (bytes after the body), and
    the ingest's end read on past it, as on a kept-alive connection (``ingest_over``),
    storing the publish unanswered (a client retrying it stored it twice)."""
    topic, other = new_topic("linger"), new_topic("linger")
    body = line(1) + line(2)
    headers = {"Content-Type": "application/x-ndjson", "Content-Length": str(len(body))}
    if closing == "connection-close":
        headers["Connection"] = "close"
    ingest = request_bytes("POST", f"{http_broker.url}/topics/{topic}/events", headers, body)
    if closing == "http-1.0":
        ingest = ingest.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    after = request_bytes(
        "POST",
        f"{http_broker.url}/topics/{other}/events",
        {**PUBLISH, "Content-Length": str(len(b'{"data": 3}'))},
        b'{"data": 3}',
    )
    sock = socket.create_connection(("127.0.0.1", http_broker.port), timeout=ANSWER_WAIT_S)
    try:
        sock.sendall(ingest + after)
        outcome = await asyncio.to_thread(read_to_end, sock)
    finally:
        sock.close()
    assert outcome.ending == "end", outcome
    assert outcome.received.startswith(b"HTTP/1.1 201 "), outcome.received
    assert outcome.received.count(b"HTTP/1.1 ") == 1, outcome.received
    history = await aclient.get(f"/topics/{topic}/events", headers={"Accept": "application/json"})
    assert [event["data"] for event in history.json()["events"]] == [1, 2]
    assert (await aclient.get(f"/topics/{other}")).status_code == 404


async def test_a_request_without_a_body_asking_to_close_with_one_sent_ahead_ends_cleanly(
    http_broker: BrokerProcess, aclient: httpx.AsyncClient
) -> None:
    """A request uvicorn's protocol serves, with no body, answered with ``Connection:
    close`` (its client's own here), a request sent ahead behind it (which httptools
    takes for bytes after the connection's end: not read, never answered): the client
    writing on reads the answer then an end. It got a reset: only a request declaring a
    body, or a drain's last, closed lingering."""
    health = request_bytes("GET", f"{http_broker.url}/healthz", {"Connection": "close"})
    received = await answered_once_then_ended(http_broker, aclient, health)
    assert received.startswith(b"HTTP/1.1 200 "), received


async def test_a_request_asking_to_close_with_nothing_after_it_closes_plainly(
    http_broker: BrokerProcess, aclient: httpx.AsyncClient
) -> None:
    """Nothing sent after a request answered with ``Connection: close``: the connection
    closes at once (an end after the answer), not lingering (no lingering close counted:
    nothing unread, nothing coming)."""
    before = {e: await lingering_closes(aclient, e) for e in ("client_end", "time", "reset")}
    health = request_bytes("GET", f"{http_broker.url}/healthz", {"Connection": "close"})
    with socket.create_connection(("127.0.0.1", http_broker.port), timeout=ANSWER_WAIT_S) as sock:
        sock.sendall(health)
        received = bytearray()
        for _ in range(100):  # (bounded: the socket's timeout bounds each read)
            data = await asyncio.to_thread(sock.recv, 65536)
            if not data:
                break
            received += data
        else:
            pytest.fail("no end")
    assert received.startswith(b"HTTP/1.1 200 "), received
    after = {e: await lingering_closes(aclient, e) for e in before}
    assert after == before


LONG_PAGE = 30
"""Events of 60 KB asked for: a history page of about 1 MB (its cap), more than the
socket buffers between broker and client hold (the broker's send buffer capped, the
client's receive buffer small)."""
SLOW_READ_BYTES = 4096
SLOW_READ_PACE_S = 0.03
"""The client reads 4 KB each 30 ms (some 130 KB/s): the page takes it several times
LINGER_SECONDS to read."""


def test_a_long_answer_closing_lingering_reaches_a_client_reading_it_slowly(
    http_broker: BrokerProcess, client: httpx.Client
) -> None:
    """A history page asking to close, a request sent ahead behind it (the close lingers):
    a client reading the page slowly reads it whole, then an end. It was cut short:
    the lingering close's deadline ran from the answer's write, and a page still going
    out after LINGER_SECONDS was dropped (a plain close, without the request sent ahead,
    sends it whole however slowly it is read)."""
    topic = new_topic("linger")
    for _ in range(LONG_PAGE):
        response = client.post(f"/topics/{topic}/events", json={"data": "x" * 60_000})
        assert response.status_code == 201
    page = request_bytes(
        "GET",
        f"{http_broker.url}/topics/{topic}/events?limit={LONG_PAGE}",
        {"Accept": "application/json", "Connection": "close"},
    )
    received = bytearray()
    started = time.monotonic()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_READ_BYTES)
        sock.settimeout(ANSWER_WAIT_S)
        sock.connect(("127.0.0.1", http_broker.port))
        sock.sendall(page + sent_ahead(http_broker))
        for _ in range(2000):  # (bounded: some 1 MB in 4 KB reads at most, and the end)
            piece = sock.recv(SLOW_READ_BYTES)
            if not piece:
                break
            received += piece
            time.sleep(SLOW_READ_PACE_S)
        else:
            pytest.fail("no end")
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert time.monotonic() - started > 2 * LINGER_SECONDS  # (read slowly indeed)
    assert len(orjson.loads(body)["events"]) > 1  # (whole: it parses)


INVALID_REQUEST = "Invalid HTTP request received."
"""uvicorn's warning for bytes its parser cannot read."""


def _warnings_of_invalid_requests(broker: BrokerProcess) -> int:
    return sum(INVALID_REQUEST in line for line in broker.log().splitlines())


def _closing(broker: BrokerProcess, how: str) -> bytes:
    """A request whose answer closes the connection: asking to, or HTTP/1.0."""
    if how == "connection-close":
        return request_bytes("GET", f"{broker.url}/healthz", {"Connection": "close"})
    return request_bytes("GET", f"{broker.url}/healthz").replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n")


@pytest.mark.parametrize("how", ["connection-close", "http-1.0"])
async def test_requests_sent_past_one_that_closes_are_not_warned_of_as_invalid(
    http_broker: BrokerProcess, how: str
) -> None:
    """Requests sent ahead behind one whose answer closes the connection (uvicorn's
    protocol serves it) are not answered (RFC 9112 9.6): an expected event, no warning.
    Bytes that are no request, on a connection of their own after it, still are, and
    answered 400: their warning comes after the one the first would have logged (one
    process, one log), so the count is read once the 400 is. The first was warned of as
    an invalid request: its parser, lenient about bytes after the close no longer
    (``api.guard``), raised, and uvicorn warned."""
    before = _warnings_of_invalid_requests(http_broker)
    with socket.create_connection(("127.0.0.1", http_broker.port), timeout=ANSWER_WAIT_S) as sock:
        sock.sendall(_closing(http_broker, how) + sent_ahead(http_broker) + sent_ahead(http_broker))
        outcome = await asyncio.to_thread(read_to_end, sock)
    assert outcome.ending == "end", outcome
    assert outcome.received.startswith(b"HTTP/1.1 200 "), outcome.received
    assert outcome.received.count(b"HTTP/1.1 ") == 1, outcome.received
    with socket.create_connection(("127.0.0.1", http_broker.port), timeout=ANSWER_WAIT_S) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        garbage = await asyncio.to_thread(read_to_end, sock)
    assert garbage.received.startswith(b"HTTP/1.1 400 "), garbage
    await await_until(
        lambda: _warnings_of_invalid_requests(http_broker) > before, timeout=10, what="a warning"
    )
    assert _warnings_of_invalid_requests(http_broker) == before + 1, http_broker.log()
