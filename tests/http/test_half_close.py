"""A client that half-closes (``shutdown(SHUT_WR)``: ``nc -N``, some proxies) right after
its requests: each request it sent whole is answered, then the connection closes.

HTTP lets a client end its side once its request is sent (RFC 9112 9.6; uvicorn issue
#1264): it sends nothing more, and still reads. uvicorn closed such a connection at
the end (its protocol has no ``eof_received``), and so did the lean route during a
publish: the request was carried out (a close, a delete, a publish) and its client
never learned the result; a client retrying an unkeyed publish stored it twice. A
request cut short by the half-close (its body unfinished) is still closed at once,
nothing carried out; a stream's client is taken for gone, on both routes.

Each request here is one uvicorn's protocol serves (the app route) unless named lean.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest

from tests.http.helpers import metric_value, new_topic, request_bytes
from tests.http.test_ingest import chunk, line
from tests.support.broker_process import BrokerProcess

END_WAIT_S = 10.0
"""How long the client reads for the broker's answers and the connection's end."""
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")  # (a body before it ends without a newline)
EVENT = json.dumps({"data": "once"}).encode()
JSON = {"Content-Type": "application/json"}
CHUNKED_JSON = {**JSON, "Transfer-Encoding": "chunked"}
NDJSON = {"Content-Type": "application/x-ndjson", "Transfer-Encoding": "chunked"}


@dataclass
class Ending:
    """What a half-closed client read: the statuses answered, and how the connection ended."""

    statuses: list[int]
    received: bytes
    ended: bool  # the broker closed the connection (a FIN) within END_WAIT_S


def read_until_end(sock: socket.socket, received: bytearray, deadline: float) -> bool:
    """Read into ``received`` until the broker ends the connection (True) or ``deadline``
    (``time.monotonic``) passes (False)."""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            return False
        if not piece:
            return True
        received += piece
    return False


def half_closed(broker: BrokerProcess, data: bytes) -> Ending:
    """Send ``data``, half-close, read until the broker closes the connection."""
    received = bytearray()
    deadline = time.monotonic() + END_WAIT_S
    with socket.create_connection(("127.0.0.1", broker.port), timeout=END_WAIT_S) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        ended = read_until_end(sock, received, deadline)
    statuses = [int(status) for status in STATUS_LINE.findall(bytes(received))]
    return Ending(statuses, bytes(received), ended)


def request(
    broker: BrokerProcess,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> bytes:
    return request_bytes(method, f"{broker.url}{path}", headers, body)


def whole_chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def http_1_0(data: bytes) -> bytes:
    return data.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)


def stored(client: httpx.Client, topic: str) -> list[object]:
    response = client.get(
        f"/topics/{topic}/events", params={"limit": 10}, headers={"Accept": "application/json"}
    )
    if response.status_code == 404:
        return []
    assert response.status_code == 200, response.text
    return [event["data"] for event in response.json()["events"]]


def topic_info(client: httpx.Client, topic: str) -> httpx.Response:
    return client.get(f"/topics/{topic}")


@dataclass(frozen=True)
class Kind:
    """A request, its answer's status, and what it carried out (checked after)."""

    send: Callable[[BrokerProcess, str], bytes]
    status: int
    check: Callable[[httpx.Client, str], None] = lambda client, topic: None


def stored_once_more(client: httpx.Client, topic: str) -> None:
    assert stored(client, topic) == ["before", "once"]


def closed(client: httpx.Client, topic: str) -> None:
    assert topic_info(client, topic).json()["closed"] is True


def deleted(client: httpx.Client, topic: str) -> None:
    assert topic_info(client, topic).status_code == 404


def ingested(client: httpx.Client, topic: str) -> None:
    assert stored(client, topic) == ["before", 1, 2]


INGEST_BODY = chunk(line(1) + line(2)) + b"0\r\n\r\n"


def lean_publish(b: BrokerProcess, t: str) -> bytes:
    return request(
        b, "POST", f"/topics/{t}/events", {**JSON, "Content-Length": str(len(EVENT))}, EVENT
    )


def stream(b: BrokerProcess, t: str, headers: dict[str, str] | None = None) -> bytes:
    return request(b, "GET", f"/topics/{t}/events", headers)


def ingest(b: BrokerProcess, t: str) -> bytes:
    return request(b, "POST", f"/topics/{t}/events", NDJSON, INGEST_BODY)


def chunked_publish(b: BrokerProcess, t: str) -> bytes:
    """A publish the lean route hands to uvicorn's protocol: its body chunked."""
    return request(b, "POST", f"/topics/{t}/events", CHUNKED_JSON, whole_chunked(EVENT))


def healthz(b: BrokerProcess, t: str) -> bytes:
    return request(b, "GET", "/healthz")


def topic_info_request(b: BrokerProcess, t: str) -> bytes:
    return request(b, "GET", f"/topics/{t}")


def by_app_stream(b: BrokerProcess, t: str) -> bytes:
    """A stream request uvicorn's protocol serves: a head declaring a body (none)."""
    return stream(b, t, {"Content-Length": "0"})


KINDS = {
    "close": Kind(lambda b, t: request(b, "POST", f"/topics/{t}/close"), 201, closed),
    "delete": Kind(lambda b, t: request(b, "DELETE", f"/topics/{t}"), 204, deleted),
    "topic-info": Kind(topic_info_request, 200),
    "listing": Kind(lambda b, t: request(b, "GET", f"/topics?prefix={t}"), 200),
    "history": Kind(
        lambda b, t: request(
            b, "GET", f"/topics/{t}/events?limit=5", {"Accept": "application/json"}
        ),
        200,
    ),
    "stats": Kind(lambda b, t: request(b, "GET", "/stats"), 200),
    "healthz": Kind(healthz, 200),
    "readyz-store": Kind(lambda b, t: request(b, "GET", "/readyz/store"), 200),
    # Publishes the lean route hands over: a chunked body, HTTP/1.0.
    "chunked-publish": Kind(chunked_publish, 201, stored_once_more),
    "http-1.0-publish": Kind(lambda b, t: http_1_0(lean_publish(b, t)), 201, stored_once_more),
    # A streaming ingest behind a request uvicorn's protocol serves (as
    # tests/http/test_early_answers.ingest_head does): uvicorn's protocol reads it too.
    "ingest": Kind(lambda b, t: healthz(b, t) + ingest(b, t), 201, ingested),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_request_sent_whole_then_half_closed_is_answered_then_closed(
    http_broker: BrokerProcess, client: httpx.Client, kind: str
) -> None:
    """Each kind of request the app route serves: carried out, answered, then closed (the
    close, the delete and the publishes were carried out unanswered: the connection
    closed at the client's end)."""
    topic = new_topic("half")
    assert client.post(f"/topics/{topic}/events", json={"data": "before"}).status_code == 201
    what = KINDS[kind]
    ending = half_closed(http_broker, what.send(http_broker, topic))
    assert ending.ended, ending
    assert ending.statuses[-1:] == [what.status], ending.received[:300]
    what.check(client, topic)


@pytest.mark.parametrize("route", ["lean", "by-app"])
@pytest.mark.parametrize("what", ["publish", "ingest"])
def test_a_publish_or_ingest_sent_whole_then_half_closed_is_answered_and_stored_once(
    http_broker: BrokerProcess, client: httpx.Client, what: str, route: str
) -> None:
    """The lean route too: it closed the connection at the end while the store took a
    publish (stored, unanswered: a client retrying it stored it twice). (A lean ingest
    was answered: its connection is not read while it is.)"""
    topic = new_topic("half")
    if what == "publish":
        sent, each = lean_publish(http_broker, topic), ["once"]
    else:
        sent, each = ingest(http_broker, topic), [1, 2]
    if route == "by-app":
        sent = healthz(http_broker, topic) + sent
    for _ in range(3):  # (a topic's first publish and the ones after)
        ending = half_closed(http_broker, sent)
        assert ending.ended, ending
        assert ending.statuses[-1:] == [201], ending.received[:300]
    assert stored(client, topic) == each * 3


SENT_AHEAD = {
    # (the requests, in order; the statuses answered; the events stored)
    "lean-publishes": ([lean_publish, lean_publish], [201, 201], ["once"] * 2),
    "by-app": ([healthz, lean_publish, topic_info_request], [200, 201, 200], ["once"]),
    "lean-publish-then-ingest": ([lean_publish, ingest], [201, 201], ["once", 1, 2]),
    # A stream's client is taken for gone: the stream is not served, the answers before it are.
    "lean-publish-then-stream": ([lean_publish, stream], [201], ["once"]),
    "by-app-then-stream": ([healthz, lean_publish, by_app_stream], [200, 201], ["once"]),
}


@pytest.mark.parametrize("case", list(SENT_AHEAD))
def test_requests_sent_ahead_then_half_closed_are_each_answered(
    http_broker: BrokerProcess, client: httpx.Client, case: str
) -> None:
    """Requests pipelined, then the half-close: each answered in turn, then closed."""
    topic = new_topic("half")
    requests, statuses, events = SENT_AHEAD[case]
    ending = half_closed(http_broker, b"".join(make(http_broker, topic) for make in requests))
    assert ending.ended, ending
    assert ending.statuses == statuses, ending.received[:600]
    assert stored(client, topic) == events


CUT_SHORT = {
    "lean-publish": lambda b, t: lean_publish(b, t)[:-4],
    "chunked-publish": lambda b, t: chunked_publish(b, t)[:-5],  # (no last chunk)
    "lean-ingest": lambda b, t: request(b, "POST", f"/topics/{t}/events", NDJSON, chunk(line(1))),
    "after-a-whole-publish": lambda b, t: lean_publish(b, t) + chunked_publish(b, t)[:-7],
    "a-head": lambda b, t: request(b, "POST", f"/topics/{t}/events", JSON)[:-4],
    # Behind a request uvicorn's protocol serves: it was closed at once, the publish
    # before it stored unanswered (a retry stored it twice).
    "after-a-whole-chunked-publish": lambda b, t: (
        chunked_publish(b, t) + chunked_publish(b, t)[:-7]
    ),
    "a-head-after-a-whole-chunked-publish": lambda b, t: (
        chunked_publish(b, t) + request(b, "POST", f"/topics/{t}/events", JSON)[:-4]
    ),
    "a-body-awaiting-100-continue-after-a-whole-chunked-publish": lambda b, t: (
        chunked_publish(b, t)
        + request(b, "POST", f"/topics/{t}/events", {**JSON, "Expect": "100-continue"})[:-2]
        + b"Content-Length: %d\r\n\r\n" % len(EVENT)
    ),
}


@pytest.mark.parametrize("kind", list(CUT_SHORT))
def test_a_request_cut_short_by_the_half_close_is_closed_unanswered_with_nothing_stored(
    http_broker: BrokerProcess, client: httpx.Client, kind: str
) -> None:
    """Its body (or head) never whole: closed at once, unanswered, nothing carried out
    (a request whole before it is answered)."""
    topic = new_topic("half")
    ending = half_closed(http_broker, CUT_SHORT[kind](http_broker, topic))
    assert ending.ended, ending
    whole_before = "after-a-whole" in kind
    assert ending.statuses == ([201] if whole_before else []), ending.received[:300]
    if kind == "lean-ingest":  # (an ingest stores the lines it read whole, as when cut)
        assert stored(client, topic) in ([], [1])
    else:
        assert stored(client, topic) == (["once"] if whole_before else [])


@pytest.mark.parametrize("route", ["lean", "by-app"])
def test_a_stream_whose_client_half_closes_ends(
    http_broker: BrokerProcess, client: httpx.Client, route: str
) -> None:
    """A stream's client that half-closes is taken for gone, on both routes: the stream
    ends (its head, if written, and then the connection's end), not held open. (A head
    that declares a body, even none, is served by uvicorn's protocol.)"""
    topic = new_topic("half")
    assert client.post(f"/topics/{topic}/events", json={"data": "before"}).status_code == 201
    sent = by_app_stream(http_broker, topic) if route == "by-app" else stream(http_broker, topic)
    ending = half_closed(http_broker, sent)
    assert ending.ended, ending
    assert ending.statuses in ([], [200]), ending.received[:300]


NO_REQUEST = b"GARBAGE \x01\r\n\r\n"  # (bytes uvicorn's parser refuses: a 400)


@pytest.mark.parametrize("kind", ["chunked-publish", "close"])
def test_requests_whole_before_bytes_that_are_no_request_are_answered_then_the_400(
    http_broker: BrokerProcess, client: httpx.Client, kind: str
) -> None:
    """The requests read whole before the bad bytes are answered, then the 400, then the
    connection closes: it was closed at the half-close, the publish stored (or the topic
    closed) unanswered."""
    topic = new_topic("half")
    assert client.post(f"/topics/{topic}/events", json={"data": "before"}).status_code == 201
    what = KINDS[kind]
    ending = half_closed(http_broker, what.send(http_broker, topic) + NO_REQUEST)
    assert ending.ended, ending
    assert ending.statuses == [what.status, 400], ending.received[:600]
    what.check(client, topic)


BIG_DATA = "x" * 60_000
BIG_PAGE = 30
"""Events of a history page some 1.8 MB long: more than the socket's buffers hold (the
broker's send buffer is capped, the client's receive buffer small), so its answer still
waits, partly, in the broker's transport when it has been written whole."""


@pytest.mark.parametrize("after", ["a request", "bytes that are no request"])
def test_bytes_after_a_request_asking_to_close_then_half_closed_get_no_400_after_its_answer(
    http_broker: BrokerProcess, client: httpx.Client, after: str
) -> None:
    """A request asking to close (a long history page), then bytes (which httptools, past
    ``Connection: close``, cannot read: a parse error, its 400 held back behind the
    answer), then a half-close: the answer, then the end; no 400 after the answer that
    said ``connection: close`` (nor counted). The 400 came after it, on the wire while
    the answer was still being sent, and was counted always."""
    topic = new_topic("half")
    for _ in range(BIG_PAGE):
        assert client.post(f"/topics/{topic}/events", json={"data": BIG_DATA}).status_code == 201
    refusals = other_400s(client)
    page = request(
        http_broker,
        "GET",
        f"/topics/{topic}/events?limit={BIG_PAGE}",
        {"Accept": "application/json", "Connection": "close"},
    )
    tail = healthz(http_broker, topic) if after == "a request" else NO_REQUEST
    received = bytearray()
    deadline = time.monotonic() + END_WAIT_S
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(END_WAIT_S)
        sock.connect(("127.0.0.1", http_broker.port))
        sock.sendall(page + tail)
        sock.shutdown(socket.SHUT_WR)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            piece = sock.recv(1 << 20)
            if not piece:
                break
            received += piece
        else:
            pytest.fail(f"no end: {bytes(received[:300])!r}")
    statuses = [int(status) for status in STATUS_LINE.findall(bytes(received))]
    assert statuses == [200], bytes(received[-400:])
    assert received.endswith(b"}"), bytes(received[-400:])
    assert other_400s(client) == refusals


def other_400s(client: httpx.Client) -> float:
    response = client.get("/metrics")
    assert response.status_code == 200
    labels = {"route": "other", "status": "400"}
    return metric_value(response.text, "broker_http_responses_total", labels) or 0


HEARTBEAT = b"3\r\n:\n\n\r\n"  # (a chunk)


def test_a_stream_under_way_with_a_request_sent_behind_it_ends_at_the_half_close(
    http_broker: BrokerProcess, client: httpx.Client
) -> None:
    """A stream uvicorn's protocol serves, under way (its head read), then a request sent
    behind it, then the half-close: the stream ends (its client taken for gone), the
    request behind it unanswered. uvicorn paused reading to queue that request, after
    the stream's wait for its client's end had resumed it: the end was never seen, and
    the stream went on (heartbeats to a client that had ended) until it closed too."""
    topic = new_topic("half")
    assert client.post(f"/topics/{topic}/events", json={"data": "before"}).status_code == 201
    received = bytearray()
    deadline = time.monotonic() + END_WAIT_S
    with socket.create_connection(("127.0.0.1", http_broker.port), timeout=END_WAIT_S) as sock:
        sock.sendall(by_app_stream(http_broker, topic))
        # Its opening beat and a heartbeat (1 s): the stream awaits its client's end.
        while received.count(HEARTBEAT) < 2 and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            piece = sock.recv(65536)
            assert piece, bytes(received)
            received += piece
        assert STATUS_LINE.findall(bytes(received)) == [b"200"], bytes(received)
        sock.sendall(lean_publish(http_broker, topic))
        sock.shutdown(socket.SHUT_WR)
        ended = read_until_end(sock, received, deadline)
    assert ended, bytes(received[-300:])
    assert STATUS_LINE.findall(bytes(received)) == [b"200"], bytes(received[-300:])
    assert stored(client, topic) == ["before"]
