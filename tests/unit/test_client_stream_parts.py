"""A stream the broker tells to send its rest as a stream of its own (``resend``:
``after_line``), or cannot tell which of its lines it kept (``unknown``): the client's
requests and result, against answers made up here (the real broker's are in
tests/face/test_client.py and tests/http/test_ingest_faults.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest

from brokerclient import (
    AsyncPublisher,
    Publisher,
    PublishResult,
    RequestFailed,
    RetryPolicy,
    StreamPartFailed,
    StreamStopped,
    TopicClosed,
    event,
)

Answer = Callable[[list[int]], httpx.Response]
QUICK = RetryPolicy(attempts=3, backoff=0.0)


def lines_lost(status: int | None = None, **members: object) -> Answer:
    """As the broker answers: 503 with Retry-After for ``resend: whole``, else 409
    without it (``status``: another, as a broker before it answered every one 503)."""
    status = status or (503 if members.get("resend") == "whole" else 409)
    problem = {"type": "/problems#ingest-lines-lost", "title": "Ingest lines lost"}
    body = problem | {"status": status, "detail": "lines lost"} | members
    headers = {"Retry-After": "0"} if status == 503 else {}
    return lambda _: httpx.Response(status, json=body, headers=headers)


def records_lapsed(last_line_kept: int, first_id: str) -> Answer:
    problem = {"type": "/problems#ingest-records-lapsed", "title": "Ingest records lapsed"}
    members = {"resend": "after_line", "last_line_kept": last_line_kept, "first_id": first_id}
    body = problem | {"status": 409, "detail": "records lapsed"} | members
    return lambda _: httpx.Response(409, json=body)


def undecodable(_: list[int]) -> httpx.Response:
    """An httpx error that is no transport's (not retried: raised)."""
    raise httpx.DecodingError("the answer's gzip is broken")


def stored(data: list[int]) -> httpx.Response:
    return httpx.Response(201, json={"ids": [f"e.{n}-0" for n in data]})


class Broker:
    """Answers each request with the next of ``answers``, recording its key and lines."""

    def __init__(self, *answers: Answer) -> None:
        self._answers = list(answers)
        self.requests: list[tuple[str, list[int]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        data = [json.loads(line)["data"] for line in request.read().splitlines()]
        self.requests.append((request.headers["idempotency-key"], data))
        return self._answers.pop(0)(data)

    async def async_stream(self, count: int, key: str) -> PublishResult:
        transport = httpx.MockTransport(self)
        async with (
            httpx.AsyncClient(base_url="http://b.test", transport=transport) as client,
            AsyncPublisher(client=client, retry=QUICK) as publisher,
        ):
            return await publisher.stream(
                "t", [event(n) for n in range(1, count + 1)], idempotency_key=key
            )

    def stream(self, count: int, key: str) -> PublishResult:
        transport = httpx.MockTransport(self)
        with (
            httpx.Client(base_url="http://b.test", transport=transport) as client,
            Publisher(client=client, retry=QUICK) as publisher,
        ):
            return publisher.stream(
                "t", (event(n) for n in range(1, count + 1)), idempotency_key=key
            )


@pytest.mark.parametrize("lines_lost_status", [409, 503])
def test_a_stream_told_twice_to_go_on_alone_sends_each_rest_under_a_key_of_its_own(
    lines_lost_status: int,
) -> None:
    """Lines 1-2 kept (409 records lapsed), then of the rest, its line 1 (the stream's
    line 3) kept (lines lost: 409, or 503 from a broker before it said 409): lines 3-5
    under K+2, lines 4-5 under K+3, and the result the whole stream's."""
    kept_1 = lines_lost(lines_lost_status, resend="after_line", last_line_kept=1)
    broker = Broker(records_lapsed(2, "e.1-0"), kept_1, stored)
    result = broker.stream(5, "K")
    assert broker.requests == [("K", [1, 2, 3, 4, 5]), ("K+2", [3, 4, 5]), ("K+3", [4, 5])]
    assert (result.count, result.ids, result.after_line) == (5, [], 3)
    assert (result.first_id, result.last_id) == ("e.1-0", "e.5-0")
    assert result.idempotency_key == "K+3"


def test_a_stream_told_to_resend_whole_is_resent_whole_under_its_key() -> None:
    broker = Broker(lines_lost(resend="whole"), stored)
    result = broker.stream(3, "K")
    assert broker.requests == [("K", [1, 2, 3]), ("K", [1, 2, 3])]
    assert (result.ids, result.after_line) == (["e.1-0", "e.2-0", "e.3-0"], 0)


def log_lost(_: list[int]) -> httpx.Response:
    problem = {"type": "/problems#ingest-log-lost", "title": "Ingest log lost", "status": 503}
    body = problem | {"detail": "log lost", "resend": "whole"}
    return httpx.Response(503, json=body, headers={"Retry-After": "0"})


@pytest.mark.parametrize("through", ["Publisher", "AsyncPublisher"])
def test_a_stream_gone_on_alone_whose_log_is_lost_is_resent_whole_under_its_key(
    through: str,
) -> None:
    """The log lost under the K+2 part took lines 1-2 (the first part's) with it: the
    whole stream goes again under K, not the part alone (lines 1-2 lost, untold)."""
    broker = Broker(records_lapsed(2, "e.1-0"), log_lost, stored)
    if through == "Publisher":
        result = broker.stream(5, "K")
    else:
        result = asyncio.run(broker.async_stream(5, "K"))
    assert broker.requests == [("K", [1, 2, 3, 4, 5]), ("K+2", [3, 4, 5]), ("K", [1, 2, 3, 4, 5])]
    assert (result.count, result.after_line, result.idempotency_key) == (5, 0, "K")
    assert result.ids == [f"e.{n}-0" for n in range(1, 6)]


def test_a_stream_whose_lines_kept_are_unknown_raises_naming_the_last_at_most() -> None:
    """Sent whole again, it stored the lines kept twice; no part can be told exactly."""
    broker = Broker(lines_lost(resend="after_line", last_line_kept=2), lines_lost(
        resend="unknown", last_line_kept_at_most=1
    ))  # fmt: skip
    with pytest.raises(StreamStopped) as stopped:
        broker.stream(4, "K")
    assert (stopped.value.last_line_kept, stopped.value.exact) == (3, False)
    assert (stopped.value.status, stopped.value.idempotency_key) == (409, "K+2")
    assert "at most up to line 3" in str(stopped.value)
    assert len(broker.requests) == 2  # (not retried)


def test_a_stream_whose_key_is_too_long_to_derive_one_from_raises_naming_the_last_kept() -> None:
    key = "k" * 199  # (K+2 would be 201 characters: a key the broker refuses)
    broker = Broker(records_lapsed(2, "e.1-0"))
    with pytest.raises(StreamStopped) as stopped:
        broker.stream(3, key)
    assert (stopped.value.last_line_kept, stopped.value.exact) == (2, True)
    assert "up to line 2 were kept" in str(stopped.value)
    assert len(broker.requests) == 1


def test_a_stream_answered_a_line_kept_it_never_sent_is_not_gone_on_with() -> None:
    broker = Broker(lines_lost(resend="after_line", last_line_kept=7))
    with pytest.raises(StreamStopped) as stopped:
        broker.stream(3, "K")
    assert stopped.value.last_line_kept == 7 and len(broker.requests) == 1


@pytest.mark.parametrize(
    "members", [{}, {"resend": "after_line"}, {"resend": "after_line", "last_line_kept": "3"}]
)
def test_a_409_lines_lost_the_client_cannot_go_on_from_is_a_request_failed_not_a_closed_topic(
    members: dict[str, object],
) -> None:
    """A 409 ingest-lines-lost without members the client can use (a broker's that it
    does not understand): raised, not retried, and not taken for a closed topic (the
    topic is not closed: a caller that stopped publishing to it, as to a closed one,
    lost the rest of its stream)."""
    broker = Broker(lines_lost(409, **members))
    with pytest.raises(RequestFailed) as failed:
        broker.stream(3, "K")
    assert not isinstance(failed.value, (TopicClosed, StreamStopped)), type(failed.value)
    assert failed.value.status == 409 and len(broker.requests) == 1
    assert failed.value.problem["type"] == "/problems#ingest-lines-lost"


def test_an_httpx_error_once_a_stream_went_on_alone_names_its_parts() -> None:
    """Raised as it was, it said nothing of the parts: resent whole under K, lines 1-2
    were stored twice."""
    broker = Broker(records_lapsed(2, "e.1-0"), undecodable)
    with pytest.raises(StreamPartFailed) as failed:
        broker.stream(5, "K")
    assert isinstance(failed.value.__cause__, httpx.DecodingError)
    assert (failed.value.after_line, failed.value.idempotency_key) == (2, "K+2")
    assert failed.value.lines_sent == 5 and "after line 2 under K+2" in str(failed.value)


def test_an_httpx_error_before_any_part_went_on_is_raised_as_it_is() -> None:
    with pytest.raises(httpx.DecodingError):
        Broker(undecodable).stream(3, "K")
