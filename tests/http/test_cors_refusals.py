"""CORS on the answers written on the connection itself, not by the app.

The README promises a listed origin's page the CORS headers on every answer,
errors included: without them the page sees a network error and cannot read
the status. A head too large (431), a body that stalls (408) and a host name
not served (421) are answered before the app reads the request (by
``api.connections``, or by uvicorn's guarded protocol for a request that came
in the same write as one it serves); each must carry them for a listed origin,
and none for another.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.http.conftest import HEARTBEAT
from tests.http.helpers import RawResponse, new_topic, request_bytes
from tests.support.broker_process import BrokerProcess
from tests.support.redis_server import RedisServer

LISTED = "http://127.0.0.1:47601"
UNLISTED = "http://127.0.0.1:47602"
MAX_HEAD_BYTES = 16384  # (the default; lower, the stream reconnects of 32 topics fail)
ENV = {
    **HEARTBEAT,
    "BROKER_CORS_ORIGINS": LISTED,
    "BROKER_HEAD_TIMEOUT_SECONDS": "1",
    "BROKER_BODY_TIMEOUT_SECONDS": "1",
}
PADDING = {"X-Padding": "a" * (2 * MAX_HEAD_BYTES)}
NDJSON = "application/x-ndjson"
STALLED_BODY = {"Content-Type": "application/json", "Content-Length": "100"}
CORS_NAMES = (
    "access-control-allow-origin",
    "access-control-allow-credentials",
    "access-control-expose-headers",
)


@pytest.fixture(scope="module")
def cors_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    process = BrokerProcess(redis_url=redis_server.url, env=ENV).start()
    yield process
    process.close()


@pytest.fixture
async def opened() -> AsyncIterator[list[asyncio.StreamWriter]]:
    """The test's raw connections, closed at its end whatever happened."""
    writers: list[asyncio.StreamWriter] = []
    yield writers
    for writer in writers:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def answer_to(
    broker: BrokerProcess,
    opened: list[asyncio.StreamWriter],
    sent: bytes,
    *,
    skip: int = 0,
    then: bytes = b"",
) -> RawResponse:
    """The answer to what is ``sent`` (and ``then``) on a new connection, after ``skip``
    answers (whole, sized) to requests before it; ``then`` is sent after those."""
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    opened.append(writer)
    writer.write(sent)
    await writer.drain()
    for _ in range(skip):
        earlier = RawResponse(reader, writer)
        await earlier.read_head()
        await earlier.read_sized_body()
    writer.write(then)
    await writer.drain()
    response = RawResponse(reader, writer)
    await response.read_head(timeout=10)
    return response


def assert_cors_for(response: RawResponse, origin: str, status: int) -> None:
    assert response.status == status, (response.status, response.headers)
    if origin == LISTED:
        assert response.headers.get("access-control-allow-origin") == LISTED, response.headers
        assert response.headers.get("access-control-allow-credentials") == "true"
        assert "Retry-After" in response.headers.get("access-control-expose-headers", "")
        assert response.count("access-control-allow-origin") == 1
    else:
        assert not set(CORS_NAMES) & set(response.headers), response.headers


def stream_url(broker: BrokerProcess) -> str:
    return f"{broker.url}/topics/{new_topic()}/events"


def healthz_then(broker: BrokerProcess, request: bytes) -> bytes:
    """``request`` begun in the same write as one uvicorn's protocol serves: it reads it."""
    return request_bytes("GET", f"{broker.url}/healthz") + request


@pytest.mark.parametrize("origin", [LISTED, UNLISTED])
async def test_a_head_too_large_is_answered_with_cors_for_a_listed_origin(
    cors_broker: BrokerProcess, opened: list[asyncio.StreamWriter], origin: str
) -> None:
    request = request_bytes("GET", stream_url(cors_broker), {"Origin": origin, **PADDING})
    assert_cors_for(await answer_to(cors_broker, opened, request), origin, 431)


@pytest.mark.parametrize("origin", [LISTED, UNLISTED])
async def test_a_head_cut_short_past_the_limit_has_cors_if_its_origin_came_whole(
    cors_broker: BrokerProcess, opened: list[asyncio.StreamWriter], origin: str
) -> None:
    """The head never ends: answered 431 once past the limit, from what was parsed."""
    whole = request_bytes("GET", stream_url(cors_broker), {"Origin": origin, **PADDING})
    cut = whole[: whole.index(b"X-Padding") + MAX_HEAD_BYTES + 100]
    assert_cors_for(await answer_to(cors_broker, opened, cut), origin, 431)


async def test_an_origin_in_the_part_of_a_head_not_read_gets_no_cors(
    cors_broker: BrokerProcess, opened: list[asyncio.StreamWriter]
) -> None:
    """Past the limit the rest is not read: an ``Origin`` there is never known."""
    request = request_bytes("GET", stream_url(cors_broker), {**PADDING, "Origin": LISTED})
    assert_cors_for(await answer_to(cors_broker, opened, request[:-4]), UNLISTED, 431)


@pytest.mark.parametrize("origin", [LISTED, UNLISTED])
async def test_a_head_too_large_read_by_uvicorns_protocol_has_cors_for_a_listed_origin(
    cors_broker: BrokerProcess, opened: list[asyncio.StreamWriter], origin: str
) -> None:
    """Its head begun in the write of the request before it, more sent once that one is
    answered, and never ended (uvicorn's protocol counts a head from the read after
    the one it began in, up to the read that ends it)."""
    request = request_bytes("GET", stream_url(cors_broker), {"Origin": origin, **PADDING})
    sent, rest = healthz_then(cors_broker, request[:100]), request[100:-4]
    answer = await answer_to(cors_broker, opened, sent, skip=1, then=rest)
    assert_cors_for(answer, origin, 431)


@pytest.mark.parametrize("origin", [LISTED, UNLISTED])
async def test_a_publish_whose_body_stalls_is_answered_408_with_cors_for_a_listed_origin(
    cors_broker: BrokerProcess, opened: list[asyncio.StreamWriter], origin: str
) -> None:
    headers = {"Origin": origin, **STALLED_BODY}
    request = request_bytes("POST", stream_url(cors_broker), headers, b'{"data": ')
    assert_cors_for(await answer_to(cors_broker, opened, request), origin, 408)


@pytest.mark.parametrize("origin", [LISTED, UNLISTED])
async def test_a_stalled_body_read_by_uvicorns_protocol_has_cors_for_a_listed_origin(
    cors_broker: BrokerProcess, opened: list[asyncio.StreamWriter], origin: str
) -> None:
    headers = {"Origin": origin, **STALLED_BODY}
    request = request_bytes("POST", stream_url(cors_broker), headers, b'{"data": ')
    sent = healthz_then(cors_broker, request)
    assert_cors_for(await answer_to(cors_broker, opened, sent, skip=1), origin, 408)


@pytest.mark.parametrize("origin", [LISTED, UNLISTED])
async def test_a_host_not_served_is_answered_421_with_cors_for_a_listed_origin(
    cors_broker: BrokerProcess, opened: list[asyncio.StreamWriter], origin: str
) -> None:
    """A rebinding page's own origin is not listed: it gets none."""
    request = request_bytes("GET", stream_url(cors_broker), {"Origin": origin})
    request = request.replace(f"Host: 127.0.0.1:{cors_broker.port}".encode(), b"Host: a.test")
    assert_cors_for(await answer_to(cors_broker, opened, request), origin, 421)


@pytest.mark.parametrize("origin", [LISTED, UNLISTED])
async def test_a_broken_head_is_answered_400_with_cors_for_a_listed_origin(
    cors_broker: BrokerProcess, opened: list[asyncio.StreamWriter], origin: str
) -> None:
    """Bytes httptools cannot parse, after the ``Origin``: uvicorn's 400 (the lean path
    hands them over), with the CORS headers of what was parsed (httptools passes a
    header on once the next begins: the one before the bad bytes is never seen)."""
    headers = {"Origin": origin, "Accept": "text/event-stream"}
    request = request_bytes("GET", stream_url(cors_broker), headers)
    broken = request[:-2] + b"not a header\r\n\r\n"
    answer = await answer_to(cors_broker, opened, broken)
    assert_cors_for(answer, origin, 400)
    assert await answer.read_sized_body() == b"Invalid HTTP request received."


@pytest.mark.parametrize("origin", [LISTED, UNLISTED])
async def test_a_broken_ingest_framing_is_answered_400_with_cors_for_a_listed_origin(
    cors_broker: BrokerProcess, opened: list[asyncio.StreamWriter], origin: str
) -> None:
    headers = {"Origin": origin, "Content-Type": NDJSON, "Transfer-Encoding": "chunked"}
    line = b'{"data": 1}\n'
    body = b"%x\r\n%b\r\n" % (len(line), line) + b"zz\r\n"
    request = request_bytes("POST", stream_url(cors_broker), headers, body)
    assert_cors_for(await answer_to(cors_broker, opened, request), origin, 400)


async def test_bytes_after_a_listed_origins_request_are_answered_400_without_cors(
    cors_broker: BrokerProcess, opened: list[asyncio.StreamWriter]
) -> None:
    """They are no request of that origin's: its headers are not theirs."""
    healthz = request_bytes("GET", f"{cors_broker.url}/healthz", {"Origin": LISTED})
    answer = await answer_to(cors_broker, opened, healthz + b"\x01\x02\r\n\r\n", skip=1)
    assert_cors_for(answer, UNLISTED, 400)
