"""What the shipped load balancers re-send when a broker hangs up without answering.

A draining broker closes connections it had accepted but not read a request
from. A GET stream sent there must be retried on another broker: the balancer's
own 502 would end a browser's EventSource for good. A publish (POST) that a
broker may have read must never be re-sent by the balancer; the client retries
it under its Idempotency-Key. Each test runs the shipped config (deploy/render.py)
in front of one upstream that hangs up on every request and one that answers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.balancers import Balancer, request, running_balancer, status_of
from tests.deploy.closing_upstream import Reads, RecordingUpstream

BALANCERS: list[Balancer] = ["nginx", "haproxy"]
READS: list[Reads] = ["nothing", "head"]
# Both balancers spread sequential requests over two idle upstreams in turn, so
# a handful reaches the closing one more than once.
ATTEMPTS = 6
STREAM_HEAD = "GET /topics/t/events HTTP/1.1\r\nAccept: text/event-stream"
PUBLISH_HEAD = "POST /topics/t/events HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 5"
pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("reads", READS)
@pytest.mark.parametrize("kind", BALANCERS)
def test_a_stream_request_a_broker_hung_up_on_is_retried_on_another(
    kind: Balancer, reads: Reads, tmp_path: Path
) -> None:
    with (
        RecordingUpstream(answers=False, reads=reads) as closing,
        RecordingUpstream(answers=True) as answering,
        running_balancer(kind, [closing.port, answering.port], tmp_path) as port,
    ):
        replies = [request(port, STREAM_HEAD) for _ in range(ATTEMPTS)]
    assert closing.seen("GET") >= 1, "the closing upstream was never tried: the test proves nothing"
    assert [status_of(reply) for reply in replies] == [200] * ATTEMPTS, replies
    assert all(b"data: served" in reply for reply in replies)
    assert answering.seen("GET") == ATTEMPTS


@pytest.mark.parametrize("reads", READS)
@pytest.mark.parametrize("kind", BALANCERS)
def test_a_publish_a_broker_hung_up_on_is_not_sent_to_another(
    kind: Balancer, reads: Reads, tmp_path: Path
) -> None:
    """Publishes go out one at a time until one lands on the closing upstream.

    That one must reach no other upstream: its client gets the balancer's error
    and retries it with its Idempotency-Key. Every publish before it was answered
    by the healthy upstream, once.
    """
    statuses: list[int] = []
    with (
        RecordingUpstream(answers=False, reads=reads) as closing,
        RecordingUpstream(answers=True) as answering,
        running_balancer(kind, [closing.port, answering.port], tmp_path) as port,
    ):
        while closing.seen("POST") == 0 and len(statuses) < ATTEMPTS:
            statuses.append(status_of(request(port, PUBLISH_HEAD, b"hello")))
    assert closing.seen("POST") == 1, f"never or twice on the closing upstream: {statuses}"
    assert statuses[-1] == 502, statuses
    assert statuses[:-1] == [201] * (len(statuses) - 1), statuses
    assert answering.seen("POST") == len(statuses) - 1, "the dropped publish was re-sent"
