"""The shipped load-balancer configs, really running on loopback in front of stand-in brokers."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.deploy.balancers import (
    FLOOD_LIMIT_BYTES,
    Balancer,
    StandInBroker,
    read_log,
    read_until,
    request,
    running_balancer,
    status_of,
)
from tests.support.broker_process import BrokerProcess
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer

BALANCERS: list[Balancer] = ["nginx", "haproxy"]
# Every test here runs nginx or HAProxy: not in `make test-fast` (-m "not e2e").
pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("kind", BALANCERS)
def test_first_event_arrives_before_the_upstream_response_ends(
    kind: Balancer, tmp_path: Path
) -> None:
    """Proves buffering is off: the stand-in holds its response open after the first frame.
    And the stream's head passes as the broker sent it (its ``Broker-Heartbeat`` too)."""
    with StandInBroker() as broker, running_balancer(kind, [broker.port], tmp_path) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                b"GET /topics/t/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
                b"Accept-Encoding: gzip\r\nLast-Event-ID: 1700000000000-7\r\n\r\n"
            )
            started = time.monotonic()
            head = read_until(sock, b"data: first", timeout=5)
            waited = time.monotonic() - started
            assert b"data: first" in head, f"no first event through {kind} in 5 s: {head!r}"
            assert not broker.finished.is_set(), "the upstream had already finished"
            assert waited < 5
            assert b"text/event-stream" in head.lower()
            assert b"\r\nbroker-heartbeat: 15\r\n" in head.lower(), "the heartbeat was not said"
            assert b"last-event-id=1700000000000-7" in head, "Last-Event-ID was not passed on"
            broker.release.set()
            rest = read_until(sock, b"data: last", timeout=5)
            assert b"data: last" in rest


@pytest.mark.parametrize("kind", BALANCERS)
def test_a_subscriber_that_stops_reading_holds_back_the_broker(
    kind: Balancer, tmp_path: Path
) -> None:
    """Without proxy buffering the broker sees a slow subscriber as slow, and can drop it.

    A buffering proxy would take the whole flood (nginx spools up to 1 GiB per
    response to disk), so the broker's bounded per-subscriber buffer would never fill.
    """
    with StandInBroker() as broker, running_balancer(kind, [broker.port], tmp_path) as port:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /flood HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert broker.flooded.wait(timeout=60), "the stand-in never stopped writing"
    # Loopback socket buffers on the way hold a few MiB; a buffering proxy takes it all.
    assert broker.flood_bytes < FLOOD_LIMIT_BYTES // 4, f"{broker.flood_bytes} bytes absorbed"


@pytest.mark.parametrize("kind", BALANCERS)
def test_a_dead_broker_is_skipped_by_retrying_the_connect(kind: Balancer, tmp_path: Path) -> None:
    # Bound but not listening: every connect is refused, and while the socket holds the
    # port no other process can take it (a port merely found free could be taken by a
    # test running beside this one: a 502 once in a CI rehearsal).
    with (
        socket.socket() as dead,
        StandInBroker() as broker,
    ):
        dead.bind(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
        with running_balancer(kind, [dead_port, broker.port], tmp_path) as port:
            broker.release.set()  # streams end at once, so each request completes
            replies = [request(port, "GET /topics/t/events HTTP/1.1") for _ in range(6)]
    assert [status_of(reply) for reply in replies] == [200] * 6
    assert all(b"data: last" in reply for reply in replies)


@pytest.mark.parametrize("kind", BALANCERS)
def test_a_publish_that_reached_a_broker_is_never_sent_to_another(
    kind: Balancer, tmp_path: Path
) -> None:
    """Both stand-ins drop every POST unanswered; a retrying proxy would deliver it twice."""
    with StandInBroker() as first, StandInBroker() as second:
        with running_balancer(kind, [first.port, second.port], tmp_path) as port:
            head = "POST /topics/t/events HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 5"
            reply = request(port, head, b"hello")
    assert status_of(reply) == 502, reply
    assert first.posts + second.posts == 1


@pytest.mark.parametrize("kind", BALANCERS)
def test_a_streaming_ingest_reaches_the_broker_as_it_is_sent(
    kind: Balancer, tmp_path: Path
) -> None:
    """nginx buffered request bodies: a generation's tokens reached the broker (and its
    subscribers) all at once, at its end. And it cut a chunked body at 1 MiB (413)."""
    head = (
        "POST /topics/t/events HTTP/1.1\r\n"
        "Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked"
    )
    line = b'{"data": 1}\n'
    with StandInBroker() as broker, running_balancer(kind, [broker.port], tmp_path) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            first = b"%x\r\n%s\r\n" % (len(line), line)
            sock.sendall(f"{head}\r\nHost: 127.0.0.1\r\n\r\n".encode() + first)
            wait_until(lambda: broker.posts == 1, timeout=5, what="the POST before its end")
        long_body = b"%x\r\n%s\r\n0\r\n\r\n" % (1_200_000, b"x" * 1_200_000)
        reply = request(port, head, long_body)
    assert status_of(reply) != 413, reply


@pytest.mark.parametrize("kind", ["haproxy"])
def test_a_body_over_one_mebibyte_is_refused_at_the_proxy(kind: Balancer, tmp_path: Path) -> None:
    with StandInBroker() as broker, running_balancer(kind, [broker.port], tmp_path) as port:
        # Only the head is sent: the proxy must answer from Content-Length alone.
        head = f"POST /topics/t/events HTTP/1.1\r\nContent-Length: {1024 * 1024 + 1}"
        reply = request(port, head, until=b"\r\n\r\n")
        refused_there = broker.posts == 0
        # A streaming ingest's body has no such limit (each line has its own): it goes
        # on (what the stand-in answers, or a 503 while its first check is not in yet).
        ingest = f"{head}\r\nContent-Type: Application/X-NDJSON; charset=utf-8"  # (any case)
        ingest_reply = request(port, ingest, b'{"data": 1}\n', until=b"\r\n\r\n")
    assert status_of(reply) == 413, reply
    assert b"application/problem+json" in reply.lower(), "answered as the broker answers it"
    assert refused_there, "the refused body reached the broker"
    assert status_of(ingest_reply) != 413, ingest_reply


@pytest.mark.parametrize("kind", BALANCERS)
def test_metrics_stay_off_the_public_edge(kind: Balancer, tmp_path: Path) -> None:
    """The README says to keep /metrics off the public edge: the shipped proxies do."""
    with StandInBroker() as broker, running_balancer(kind, [broker.port], tmp_path) as port:
        replies = [
            request(port, f"GET {path} HTTP/1.1", until=b"\r\n\r\n")
            for path in ("/metrics", "/%6detrics", "/%6D%65trics")  # (HAProxy passed these)
        ]
    assert [status_of(reply) for reply in replies] == [404, 404, 404], replies
    assert broker.streams == 0


@pytest.mark.parametrize("kind", BALANCERS)
def test_metrics_stay_off_the_public_edge_with_a_line_feed_after_the_path(
    kind: Balancer, tmp_path: Path, redis_server: RedisServer
) -> None:
    """Both proxies pass ``/metrics%0A`` on (it is not ``/metrics`` to them), and a real
    broker served it as ``/metrics`` (a route pattern's ``$`` matches before a final
    line feed): the broker itself must name no route by it."""
    broker = BrokerProcess(redis_url=redis_server.url).start()
    try:
        with running_balancer(kind, [broker.port], tmp_path) as port:
            replies = [
                request(port, f"GET {path} HTTP/1.1", until=b"\r\n\r\n")
                for path in ("/metrics", "/metrics%0A", "/%6detrics%0a")
            ]
    finally:
        broker.close()
    assert [status_of(reply) for reply in replies] == [404, 404, 404], replies


def test_nginx_sends_to_a_restarted_broker_at_once_even_after_all_had_failed(
    tmp_path: Path,
) -> None:
    """A rolling restart must never leave nginx with "no live upstreams".

    Both brokers are down for a moment (nginx answers 502 then: nothing can be
    done), then one comes back on its port. The next stream must reach it: a
    `max_fails`/`fail_timeout` pair would keep both marked failed for
    fail_timeout and answer 502, and a browser's EventSource never retries a 502.
    """
    # Both ports held by bound sockets that do not listen (connects refused) while the
    # brokers are down, so that no test running beside this one can take them.
    with socket.socket() as first, socket.socket() as second:
        for sock in (first, second):
            sock.bind(("127.0.0.1", 0))
        ports = [first.getsockname()[1], second.getsockname()[1]]
        with running_balancer("nginx", ports, tmp_path) as port:
            down = [status_of(request(port, "GET /topics/t/events HTTP/1.1")) for _ in range(4)]
            assert down == [502] * 4
            first.close()  # its broker comes back on its port
            with StandInBroker(port=ports[0]) as broker:
                broker.release.set()
                reply = request(port, "GET /topics/t/events HTTP/1.1")
    assert status_of(reply) == 200, reply
    assert b"data: last" in reply


def test_haproxy_prefers_ready_brokers_and_falls_back_to_live_ones(tmp_path: Path) -> None:
    """/readyz decides where streams go; every broker draining at once is not a 503.

    A draining broker answers a new stream with a 200 "retry" and the browser
    comes back, whereas a 503 from HAProxy would close its EventSource for good.
    """
    fall = 2  # `fall 2` in haproxy.cfg: a third failed check finds the server down
    with StandInBroker() as ready, StandInBroker() as unready:
        ready.release.set()
        unready.release.set()
        unready.ready.clear()
        with running_balancer("haproxy", [ready.port, unready.port], tmp_path) as port:
            wait_until(
                lambda: unready.unready_checks > fall, timeout=10, what="HAProxy to check /readyz"
            )
            replies = [request(port, "GET /topics/t/events HTTP/1.1") for _ in range(6)]
            assert [status_of(reply) for reply in replies] == [200] * 6
            assert (ready.streams, unready.streams) == (6, 0), "an unready broker took streams"

            ready.ready.clear()  # now every broker drains
            wait_until(
                lambda: ready.unready_checks > fall,
                timeout=10,
                what="HAProxy to see every broker drain",
            )
            replies = [request(port, "GET /topics/t/events HTTP/1.1") for _ in range(4)]
    assert [status_of(reply) for reply in replies] == [200] * 4, replies
    assert all(b"data: last" in reply for reply in replies)
    assert ready.streams + unready.streams == 10


@pytest.mark.parametrize("kind", BALANCERS)
def test_the_proxies_do_not_log_a_token_in_the_query(kind: Balancer, tmp_path: Path) -> None:
    """A browser's EventSource carries its JWT in ?access_token=: the shipped access
    logs wrote it down whole (audit)."""
    token = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0.c2lnbmF0dXJl"
    with StandInBroker() as broker, running_balancer(kind, [broker.port], tmp_path) as port:
        reply = request(port, f"GET /healthz?access_token={token} HTTP/1.1")  # (to the close)
        assert status_of(reply) == 200, reply
        logs = [tmp_path / "logs" / "access.log", tmp_path / f"{kind}.out"]
        wait_until(
            lambda: any("/healthz" in read_log(log) for log in logs),
            timeout=5,
            what=f"the request was never logged: {[read_log(log) for log in logs]}",
        )
    written = "".join(read_log(log) for log in logs)
    assert token not in written and "access_token" not in written, written


@pytest.mark.parametrize("kind", BALANCERS)
def test_the_longest_stream_request_the_broker_takes_passes_the_proxy(
    kind: Balancer, tmp_path: Path
) -> None:
    """A multi-topic stream at the broker's defaults' edge (32 topics of 200
    characters, resumed by ``?last_event_id=``, as /client.js resumes) reaches the
    broker: nginx's 8 KiB default buffer for a request line answered it 414 (audit),
    and the browser was told the stream was refused for good."""
    topics = [f"t{n:02d}" + "x" * 197 for n in range(32)]
    cursor = "!".join(f"{t}~k3j9x0a2.1732388400000-{n}" for n, t in enumerate(topics))
    query = "&".join(f"topic={t}" for t in topics) + f"&last_event_id={quote(cursor)}"
    line = f"GET /events?{query} HTTP/1.1"
    assert len(line) > 13_500  # (the broker's own head limit is 16 KiB by default)
    with StandInBroker() as broker, running_balancer(kind, [broker.port], tmp_path) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(f"{line}\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
            head = read_until(sock, b"data: first", timeout=5)
            broker.release.set()
    assert status_of(head) == 200, head[:200]
    assert broker.streams == 1
