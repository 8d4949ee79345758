"""Too many connections: past ``BROKER_MAX_CONNECTIONS`` (or what the process's
open-file limit allows) streams are told to come back and publishes get 503, and
the process survives running out of file descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Literal

import httpx
import pytest

from tests.http.conftest import HEARTBEAT
from tests.http.helpers import (
    PROBLEM_JSON,
    RawResponse,
    new_topic,
    raw_request,
)
from tests.support.broker_process import BrokerProcess
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer

MAX_CONNECTIONS = 20
OPEN_FILES = 256

Outcome = Literal["stream", "come back", "closed"]


@pytest.fixture
def capped_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    env = {**HEARTBEAT, "BROKER_MAX_CONNECTIONS": str(MAX_CONNECTIONS)}
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


ORIGIN = "https://app.test"


@pytest.fixture
def capped_cors_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    env = {
        **HEARTBEAT,
        "BROKER_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "BROKER_CORS_ORIGINS": ORIGIN,
    }
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


@pytest.fixture
def few_files_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """A broker allowed far more connections than it has file descriptors for."""
    env = {**HEARTBEAT, "BROKER_MAX_CONNECTIONS": "100000"}
    process = BrokerProcess(redis_url=redis_server.url, env=env, max_open_files=OPEN_FILES)
    yield process.start()
    process.close()


async def open_stream(url: str, topic: str) -> tuple[Outcome, RawResponse | None]:
    """A stream request on a new connection, and what became of it.

    "stream": served and still open (the response is returned, to be closed);
    "come back": a 200 event stream holding a retry hint that then ends;
    "closed": the connection was closed (or reset) without an answer.
    """
    try:
        response = await raw_request(f"{url}/topics/{topic}/events")
    except (ConnectionError, asyncio.IncompleteReadError):
        return "closed", None
    assert response.status == 200, response.headers
    assert response.headers["content-type"].startswith("text/event-stream")
    if response.headers.get("transfer-encoding") == "chunked":
        await response.read_until(b"retry:")
        return "stream", response
    body = await response.read_sized_body()
    await response.close()
    assert body.startswith(b"retry: ") and b"reconnect shortly" in body, body
    return "come back", None


async def close_responses(responses: list[RawResponse]) -> None:
    for response in responses:
        await response.close()


async def still_streaming(url: str, topic: str) -> RawResponse | None:
    outcome, response = await open_stream(url, topic)
    return response if outcome == "stream" else None


async def a_served_stream(url: str, topic: str, timeout: float) -> RawResponse:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = await still_streaming(url, topic)
        if response is not None:
            return response
        await asyncio.sleep(0.1)
    raise AssertionError(f"no stream served within {timeout}s")


async def delivers(url: str, stream: RawResponse, topic: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        answer = await client.post(f"/topics/{topic}/events", json={"data": "again"})
        assert answer.status_code == 201, answer.text
    await stream.read_until(b'data: "again"')


async def hold_every_connection(url: str, topic: str, held: list[RawResponse]) -> None:
    """Open streams up to the limit, each served, into ``held`` (the caller closes them)."""
    for _ in range(MAX_CONNECTIONS):
        outcome, response = await open_stream(url, topic)
        assert response is not None, f"{outcome} at {len(held)} open connections"
        held.append(response)


async def test_past_max_connections_streams_come_back_and_publishes_get_503(
    capped_broker: BrokerProcess,
) -> None:
    url, topic = capped_broker.url, new_topic()
    held: list[RawResponse] = []
    try:
        await hold_every_connection(url, topic, held)
        outcome, response = await open_stream(url, topic)
        held += [response] if response is not None else []
        assert outcome == "come back"
        publish = await raw_request(
            f"{url}/topics/{topic}/events",
            "POST",
            {"Content-Type": "text/plain", "Content-Length": "1"},
            b"x",
        )
        held.append(publish)
        assert publish.status == 503, publish.headers
        assert publish.headers["content-type"] == PROBLEM_JSON
        assert int(publish.headers["retry-after"]) >= 1
        assert b'"status":503' in await publish.read_sized_body()
        # What operators need still answers; anything else is 503 (a history page, held
        # by a client that does not read, was served past the limit: megabytes each).
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        assert httpx.get(f"{url}/topics/{topic}", timeout=5).status_code == 503
        history = {"Accept": "application/json"}
        assert (
            httpx.get(f"{url}/topics/{topic}/events", headers=history, timeout=5).status_code == 503
        )
        await close_responses(held[:5])
        del held[:5]
        assert httpx.get(f"{url}/topics/{topic}", timeout=5).status_code == 404  # nothing stored
        stream = await a_served_stream(url, topic, timeout=5)
        held.append(stream)
        await delivers(url, stream, topic)
    finally:
        await close_responses(held)


async def test_the_process_survives_running_out_of_file_descriptors(
    few_files_broker: BrokerProcess,
) -> None:
    """More connections than the process has file descriptors: past its limit streams
    are told to come back, past what it can hold at all connections are closed; the
    process lives on, and serves again once they go."""
    url, topic = few_files_broker.url, new_topic()
    held: list[RawResponse] = []
    silent: list[asyncio.StreamWriter] = []
    outcomes: dict[Outcome, int] = {"stream": 0, "come back": 0, "closed": 0}
    try:
        for _ in range(OPEN_FILES):  # streams until the broker refuses one
            outcome, response = await open_stream(url, topic)
            outcomes[outcome] += 1
            held += [response] if response is not None else []
            if outcome != "stream":
                break
        assert outcomes["come back"] == 1, outcomes
        assert outcomes["stream"] < OPEN_FILES - 16, outcomes  # some kept for the process
        # Then more connections than it has descriptors left, sending nothing.
        readers = []
        for _ in range(OPEN_FILES):
            reader, writer = await asyncio.open_connection("127.0.0.1", few_files_broker.port)
            readers.append(reader)
            silent.append(writer)
        assert await _closed_soon(readers) > 0, "every connection held: the limit is not real"
        assert few_files_broker.process is not None
        assert few_files_broker.process.poll() is None, few_files_broker.log()
        for writer in silent:
            writer.close()
        await close_responses(held)
        held = []
        wait_until(lambda: _healthy(url), timeout=10, what="/healthz once the connections closed")
        stream = await a_served_stream(url, topic, timeout=5)
        held.append(stream)
        await delivers(url, stream, topic)
    finally:
        for writer in silent:
            writer.close()
        await close_responses(held)


async def _closed_soon(readers: list[asyncio.StreamReader]) -> int:
    """How many of these connections the server closes within a second or so."""

    async def closed(reader: asyncio.StreamReader) -> bool:
        try:
            return await asyncio.wait_for(reader.read(1), 1.5) == b""
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    return sum(await asyncio.gather(*(closed(reader) for reader in readers)))


def _healthy(url: str) -> bool:
    with contextlib.suppress(httpx.TransportError):
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    return False


async def test_refusals_past_max_connections_pass_cors(capped_cors_broker: BrokerProcess) -> None:
    """A cross-origin EventSource takes a come-back without CORS headers for a network
    error and gives up for good; a cross-origin publisher could not read its 503."""
    url, topic = capped_cors_broker.url, new_topic()
    held: list[RawResponse] = []
    try:
        await hold_every_connection(url, topic, held)
        origin = {"Origin": ORIGIN}
        come_back = await raw_request(f"{url}/topics/{topic}/events", headers=origin)
        publish = await raw_request(
            f"{url}/topics/{topic}/events",
            "POST",
            {"Content-Type": "text/plain", "Content-Length": "1", **origin},
            b"x",
        )
        held += [come_back, publish]
        assert (come_back.status, publish.status) == (200, 503)
        assert b"reconnect shortly" in await come_back.read_sized_body()
        for answer in (come_back, publish):
            assert answer.headers.get("access-control-allow-origin") == ORIGIN, answer.headers
            assert answer.count("access-control-allow-origin") == 1
    finally:
        await close_responses(held)
