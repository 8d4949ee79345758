"""Authorization through a real ``broker serve``: every token source, every way a
token fails, every route of a topic (both stream paths), public topics, the end
of a stream at its token's expiry, CORS on every kind of response, and no token
in the logs.

The lean stream path serves a connection's first request; the ASGI path a
stream on a reused keep-alive connection (``tests/http/test_connections.py``).
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import orjson
import pytest

from tests.http.helpers import RawResponse, new_topic, raw_request, request_bytes
from tests.support.broker_process import BrokerProcess
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer
from tests.support.tokens import (
    JWT_SETTINGS,
    SECRET,
    KeyPair,
    claims,
    hs_token,
    unsigned_token,
)

APP_ORIGIN = "http://app.test:8080"
HEARTBEAT_SECONDS = 0.5


@pytest.fixture(scope="module")
def auth_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    env = {
        **JWT_SETTINGS,
        "BROKER_PUBLIC_TOPICS": "pub-*, news",
        "BROKER_CORS_ORIGINS": f"{APP_ORIGIN}, https://other.test",
        "BROKER_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
        "BROKER_ACCESS_LOG": "true",
        # (uvicorn's default, stated: the tests are the trusted proxy, X-Forwarded-Proto)
        "FORWARDED_ALLOW_IPS": "127.0.0.1",
    }
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


# -- calling each route over raw sockets -------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def problem(self) -> dict[str, object]:
        assert self.headers["content-type"] == "application/problem+json", self.headers
        body = orjson.loads(self.body)
        assert isinstance(body, dict)
        return body


async def _finish(response: RawResponse) -> Answer:
    """The head and (for a stream) its first block, or (else) the whole body."""
    try:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            if response.headers.get("transfer-encoding") == "chunked":
                await response.read_until(b"\n\n")
            else:
                await response.read_sized_body()
        else:
            await response.read_sized_body()
    finally:
        await response.close()
    return Answer(response.status, response.headers, bytes(response.body))


async def stream_lean(url: str, path: str, headers: dict[str, str]) -> Answer:
    """A stream as a connection's first request (``api.connections``)."""
    return await _finish(await raw_request(url + path, headers=headers))


async def stream_by_app(url: str, path: str, headers: dict[str, str]) -> Answer:
    """A stream pipelined behind a health check (uvicorn's protocol, handed the health
    check, reads it too, and the ASGI app serves it)."""
    port = int(url.rsplit(":", 1)[1])
    return await _finish(
        await _behind_health_check(port, url, request_bytes("GET", url + path, headers))
    )


async def _behind_health_check(port: int, url: str, request: bytes) -> RawResponse:
    """``request``'s response, sent in the same write as a health check (answered first)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes("GET", f"{url}/healthz") + request)
    first = RawResponse(reader, writer)
    await first.read_head()
    assert first.status == 200
    await first.read_sized_body()
    response = RawResponse(reader, writer)
    await response.read_head()
    return response


async def publish(url: str, topic: str, headers: dict[str, str], query: str = "") -> Answer:
    body = b'{"data": {"n": 1}}'
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}
    target = f"{url}/topics/{topic}/events{query}"
    return await _finish(await raw_request(target, "POST", headers=headers, body=body))


async def history(url: str, topic: str, headers: dict[str, str], query: str = "") -> Answer:
    headers = {"Accept": "application/json", **headers}
    return await _finish(await raw_request(f"{url}/topics/{topic}/events{query}", headers=headers))


async def topic_info(url: str, topic: str, headers: dict[str, str]) -> Answer:
    return await _finish(await raw_request(f"{url}/topics/{topic}", headers=headers))


async def call(
    route: str, url: str, topic: str, headers: dict[str, str], query: str = ""
) -> Answer:
    """``route`` on ``topic``; ``query`` (``name=value&...``) is added to its URL."""
    one, both = f"/topics/{topic}/events?{query}", f"/events?topic={topic}&topic={topic}-2&{query}"
    if route == "publish":
        return await publish(url, topic, headers, f"?{query}")
    if route == "stream-lean":
        return await stream_lean(url, one, headers)
    if route == "stream-by-app":
        return await stream_by_app(url, one, headers)
    if route == "multi-stream-lean":
        return await stream_lean(url, both, headers)
    if route == "multi-stream-by-app":
        return await stream_by_app(url, both, headers)
    if route == "history":
        return await history(url, topic, headers, f"?{query}")
    assert route == "topic-info"
    return await topic_info(url, f"{topic}?{query}", headers)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_unauthorized(answer: Answer, token: str | None = None) -> None:
    assert answer.status == 401, (answer.status, answer.body)
    assert answer.headers["www-authenticate"].startswith("Bearer"), answer.headers
    problem = answer.problem
    assert problem["type"] == "/problems#unauthorized", problem
    assert problem["status"] == 401
    if token is not None:
        assert token not in answer.body.decode(), "the token is echoed back"


def assert_forbidden(answer: Answer) -> None:
    assert answer.status == 403, (answer.status, answer.body)
    assert answer.problem["type"] == "/problems#forbidden", answer.problem


def assert_allowed(route: str, answer: Answer) -> None:
    expected = 201 if route == "publish" else 200
    assert answer.status == expected, (answer.status, answer.body)


ROUTES = [
    "publish",
    "stream-lean",
    "stream-by-app",
    "multi-stream-lean",
    "multi-stream-by-app",
    "history",
    "topic-info",
]
SUBSCRIBE_ROUTES = [route for route in ROUTES if route != "publish"]


async def _topic_with_an_event(url: str, prefix: str = "auth") -> str:
    """A new topic (named ``prefix-...``) and its ``-2`` sibling, an event in each."""
    topic = new_topic(prefix)
    token = hs_token(claims(publish=[f"{topic}*"]))
    for name in (topic, f"{topic}-2"):
        assert (await publish(url, name, bearer(token))).status == 201
    return topic


# -- every route -------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
async def test_every_route_needs_a_token(auth_broker: BrokerProcess, route: str) -> None:
    topic = await _topic_with_an_event(auth_broker.url)
    assert_unauthorized(await call(route, auth_broker.url, topic, {}))


@pytest.mark.parametrize("route", ROUTES)
async def test_every_route_refuses_a_token_without_its_right(
    auth_broker: BrokerProcess, route: str
) -> None:
    """Publish needs ``publish``; everything else ``subscribe``: the other right is not enough."""
    topic = await _topic_with_an_event(auth_broker.url)
    if route == "publish":
        token = hs_token(claims(subscribe=[f"{topic}*"], publish=["elsewhere-*"]))
    else:
        token = hs_token(claims(publish=[f"{topic}*"], subscribe=["elsewhere-*"]))
    assert_forbidden(await call(route, auth_broker.url, topic, bearer(token)))


@pytest.mark.parametrize("route", ROUTES)
async def test_every_route_serves_a_token_with_its_right(
    auth_broker: BrokerProcess, route: str
) -> None:
    topic = await _topic_with_an_event(auth_broker.url)
    token = hs_token(claims(publish=[topic], subscribe=[f"{topic}*"]))
    assert_allowed(route, await call(route, auth_broker.url, topic, bearer(token)))


@pytest.mark.parametrize("route", ["multi-stream-lean", "multi-stream-by-app"])
async def test_a_multi_topic_stream_is_refused_if_any_topic_is_not_allowed(
    auth_broker: BrokerProcess, route: str
) -> None:
    topic = await _topic_with_an_event(auth_broker.url)
    token = hs_token(claims(subscribe=[topic]))  # not f"{topic}-2"
    assert_forbidden(await call(route, auth_broker.url, topic, bearer(token)))


# -- token sources -------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["bearer", "cookie", "query"])
@pytest.mark.parametrize("route", ["publish", "stream-lean", "stream-by-app", "history"])
async def test_each_token_source(auth_broker: BrokerProcess, source: str, route: str) -> None:
    topic = await _topic_with_an_event(auth_broker.url)
    token = hs_token(claims(publish=[topic], subscribe=[topic]))
    headers, query = {}, ""
    if source == "bearer":
        headers = bearer(token)
    elif source == "cookie":  # (as the broker's own page sends it: a publish names its origin)
        headers = {"Cookie": f"theme=dark; broker_token={token}", "Origin": auth_broker.url}
    else:
        query = f"?from=earliest&access_token={token}"
    url, path = auth_broker.url, f"/topics/{topic}/events{query}"
    if route == "publish":
        answer = await publish(url, topic, headers, query)
    elif route == "stream-lean":
        answer = await stream_lean(url, path, headers)
    elif route == "stream-by-app":
        answer = await stream_by_app(url, path, headers)
    else:
        answer = await history(url, topic, headers, query)
    assert_allowed(route, answer)


async def test_the_bearer_header_comes_before_the_cookie(auth_broker: BrokerProcess) -> None:
    topic = await _topic_with_an_event(auth_broker.url)
    good = hs_token(claims(subscribe=[topic]))
    bad = hs_token(claims(subscribe=[topic]), secret="another-secret-" + "y" * 40)
    headers = {"Authorization": f"Bearer {bad}", "Cookie": f"broker_token={good}"}
    assert_unauthorized(await stream_lean(auth_broker.url, f"/topics/{topic}/events", headers))


# -- each way a token fails ---------------------------------------------------------------


def _failing_tokens(topic: str) -> dict[str, str]:
    rights = {"publish": [topic], "subscribe": [topic]}
    good = claims(**rights)
    no_exp = {k: v for k, v in good.items() if k != "exp"}
    return {
        "expired": hs_token(claims(**rights, expires_in=-30)),
        "bad-signature": hs_token(good, secret="not-the-broker-secret-" + "z" * 40),
        "wrong-alg-rs256": KeyPair.rsa().token(good),
        "alg-none": unsigned_token(good, {"alg": "none", "typ": "JWT"}),
        "alg-none-uppercase": unsigned_token(good, {"alg": "NONE", "typ": "JWT"}),
        "wrong-audience": hs_token(good | {"aud": "another-service"}),
        "no-audience": hs_token({k: v for k, v in good.items() if k != "aud"}),
        "wrong-issuer": hs_token(good | {"iss": "https://evil.test"}),
        "no-exp": hs_token(no_exp),
        "not-a-jwt": "not.a.jwt",
        "broker-claim-not-an-object": hs_token(good | {"broker": ["publish"]}),
    }


FAILURES = list(_failing_tokens("t"))


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("route", ["publish", "stream-lean", "stream-by-app"])
async def test_each_bad_token_is_refused_with_401(
    auth_broker: BrokerProcess, failure: str, route: str
) -> None:
    topic = await _topic_with_an_event(auth_broker.url)
    token = _failing_tokens(topic)[failure]
    answer = await call(route, auth_broker.url, topic, bearer(token))
    assert_unauthorized(answer, token)
    assert 'error="invalid_token"' in answer.headers["www-authenticate"]


async def test_no_token_gets_the_bare_challenge(auth_broker: BrokerProcess) -> None:
    answer = await publish(auth_broker.url, new_topic("auth"), {})
    assert_unauthorized(answer)
    assert answer.headers["www-authenticate"] == 'Bearer realm="broker"'


# -- public topics ----------------------------------------------------------------------------


@pytest.mark.parametrize("route", SUBSCRIBE_ROUTES)
async def test_public_topics_are_subscribed_to_without_a_token(
    auth_broker: BrokerProcess, route: str
) -> None:
    topic = await _topic_with_an_event(auth_broker.url, "pub")
    assert_allowed(route, await call(route, auth_broker.url, topic, {}))
    # Nor does a valid token need a right to them (not a 403).
    no_rights = bearer(hs_token(claims(publish=["elsewhere-*"])))
    assert_allowed(route, await call(route, auth_broker.url, topic, no_rights))
    # Empty credentials are none: no token was sent.
    empty = {"Authorization": "Bearer ", "Cookie": "broker_token="}
    assert_allowed(route, await call(route, auth_broker.url, topic, empty, "access_token="))


def _unusable_tokens(topic: str) -> dict[str, str]:
    """Tokens that would allow subscribing to ``topic``, were they valid."""
    rights = claims(subscribe=[f"{topic}*"])
    return {
        "expired": hs_token(claims(subscribe=[f"{topic}*"], expires_in=-60)),
        "bad-signature": hs_token(rights, secret="not-the-broker-secret-" + "z" * 40),
        "wrong-audience": hs_token(rights | {"aud": "another-service"}),
        "not-a-jwt": "not.a.jwt",
    }


def _sent_by(source: str, token: str) -> tuple[dict[str, str], str]:
    """The headers and the query carrying ``token`` from ``source``."""
    if source == "bearer":
        return bearer(token), ""
    if source == "cookie":
        return {"Cookie": f"theme=dark; broker_token={token}"}, ""
    assert source == "query"
    return {}, f"access_token={token}"


@pytest.mark.parametrize("failure", list(_unusable_tokens("t")))
@pytest.mark.parametrize("source", ["bearer", "cookie", "query"])
@pytest.mark.parametrize("route", SUBSCRIBE_ROUTES)
async def test_a_public_topic_refuses_a_token_it_cannot_use(
    auth_broker: BrokerProcess, failure: str, source: str, route: str
) -> None:
    """A token sent is judged wherever it goes: an expired or forged one on a public
    topic was served (200), so its client, a page with a stale cookie among them, was
    never told (401) to get a fresh one."""
    topic = await _topic_with_an_event(auth_broker.url, "pub")
    token = _unusable_tokens(topic)[failure]
    headers, query = _sent_by(source, token)
    assert_unauthorized(await call(route, auth_broker.url, topic, headers, query), token)


async def test_public_topics_are_not_public_to_publish(auth_broker: BrokerProcess) -> None:
    assert_unauthorized(await publish(auth_broker.url, new_topic("pub"), {}))
    assert_unauthorized(await publish(auth_broker.url, "news", {}))


async def test_a_multi_topic_stream_with_a_private_topic_needs_its_token(
    auth_broker: BrokerProcess,
) -> None:
    public, private = new_topic("pub"), new_topic("auth")
    path = f"/events?topic={public}&topic={private}"
    assert_unauthorized(await stream_lean(auth_broker.url, path, {}))
    token = hs_token(claims(subscribe=[private]))  # the public one needs no right
    assert (await stream_lean(auth_broker.url, path, bearer(token))).status == 200


# -- a stream ends when its token does -------------------------------------------------------


async def _time_of_end(response: RawResponse, deadline: float) -> float:
    """Read the stream until it ends (cleanly or cut); the time it did."""
    while time.time() < deadline:
        try:
            if await response.read_chunk(timeout=max(0.01, deadline - time.time())) is None:
                return time.time()
        except (asyncio.IncompleteReadError, ConnectionError):
            return time.time()
        except TimeoutError:
            break
    raise AssertionError(f"the stream did not end by its token's expiry: {response.body!r}")


@pytest.mark.parametrize(
    ("path_kind", "topic_kind"), [("lean", "own"), ("by-app", "own"), ("lean", "public")]
)
async def test_a_stream_ends_when_its_token_expires(
    auth_broker: BrokerProcess, path_kind: str, topic_kind: str
) -> None:
    """A public topic's stream too, when a token was sent: its reconnect with that
    token is refused (401), so the client is told now to get a fresh one."""
    topic = new_topic("auth" if topic_kind == "own" else "pub")
    token = hs_token(claims(subscribe=[topic] if topic_kind == "own" else [], expires_in=3))
    exp = orjson.loads(_payload(token))["exp"]
    path = f"{auth_broker.url}/topics/{topic}/events"
    if path_kind == "lean":
        response = await raw_request(path, headers=bearer(token))
    else:
        stream_request = request_bytes("GET", path, bearer(token))
        response = await _behind_health_check(auth_broker.port, auth_broker.url, stream_request)
    try:
        assert response.status == 200
        ended = await _time_of_end(response, deadline=exp + 2 + 4 * HEARTBEAT_SECONDS)
        assert ended >= exp - 1, f"ended {exp - ended:.1f}s before the token's expiry"
    finally:
        await response.close()
    # Coming back with the same (now expired) token: 401, and EventSource stops.
    assert_unauthorized(
        await stream_lean(auth_broker.url, f"/topics/{topic}/events", bearer(token))
    )


def _payload(token: str) -> bytes:
    part = token.split(".")[1]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


# -- CORS ----------------------------------------------------------------------------------------


def assert_cors_for(answer: Answer, origin: str) -> None:
    assert answer.headers.get("access-control-allow-origin") == origin, answer.headers
    assert answer.headers.get("access-control-allow-credentials") == "true", answer.headers
    assert "origin" in answer.headers.get("vary", "").lower(), answer.headers


@pytest.mark.parametrize("route", [*ROUTES, "unauthorized-stream", "healthz"])
async def test_cors_headers_on_every_kind_of_response(
    auth_broker: BrokerProcess, route: str
) -> None:
    topic = await _topic_with_an_event(auth_broker.url)
    token = hs_token(claims(publish=[topic], subscribe=[f"{topic}*"]))
    origin = {"Origin": APP_ORIGIN}
    if route == "unauthorized-stream":
        answer = await stream_lean(auth_broker.url, f"/topics/{topic}/events", origin)
        assert answer.status == 401
    elif route == "healthz":
        answer = await _finish(await raw_request(f"{auth_broker.url}/healthz", headers=origin))
    else:
        answer = await call(route, auth_broker.url, topic, bearer(token) | origin)
        assert_allowed(route, answer)
    assert_cors_for(answer, APP_ORIGIN)


@pytest.mark.parametrize("route", ["stream-lean", "stream-by-app"])
async def test_the_204_of_a_closed_topic_passes_cors(
    auth_broker: BrokerProcess, route: str
) -> None:
    """A cross-origin EventSource stops on a 204 only if it passes CORS: one that does
    not is a network error to it, and it reconnects for ever (the lean 204 had none)."""
    topic, url = new_topic("auth"), auth_broker.url
    token = hs_token(claims(publish=[topic], subscribe=[topic]))
    closing = request_bytes(
        "POST", f"{url}/topics/{topic}/close", bearer(token) | {"Content-Length": "0"}
    )
    port = auth_broker.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(closing)
    closed = RawResponse(reader, writer)
    await closed.read_head()
    await closed.close()
    assert closed.status == 201, closed.headers
    headers = bearer(token) | {"Origin": APP_ORIGIN}
    if route == "stream-lean":
        response = await raw_request(f"{url}/topics/{topic}/events", headers=headers)
    else:
        stream = request_bytes("GET", f"{url}/topics/{topic}/events", headers)
        response = await _behind_health_check(port, url, stream)
    await response.close()
    assert response.status == 204, response.headers
    assert_cors_for(Answer(response.status, response.headers, b""), APP_ORIGIN)
    for name in ("access-control-allow-origin", "access-control-allow-credentials", "vary"):
        assert response.count(name) == 1, (name, response.names)


@pytest.mark.parametrize("route", ["publish", "stream-lean", "stream-by-app", "history"])
async def test_no_cors_for_an_origin_not_listed(auth_broker: BrokerProcess, route: str) -> None:
    topic = await _topic_with_an_event(auth_broker.url)
    token = hs_token(claims(publish=[topic], subscribe=[f"{topic}*"]))
    headers = bearer(token) | {"Origin": "https://evil.test"}
    answer = await call(route, auth_broker.url, topic, headers)
    assert "access-control-allow-origin" not in answer.headers, answer.headers
    assert "access-control-allow-credentials" not in answer.headers, answer.headers
    assert answer.headers.get("vary", "").lower() == "origin"


async def test_a_preflight_for_publish(auth_broker: BrokerProcess) -> None:
    headers = {
        "Origin": "https://other.test",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
    }
    answer = await _finish(
        await raw_request(f"{auth_broker.url}/topics/t/events", "OPTIONS", headers=headers)
    )
    assert answer.status == 204, answer
    assert_cors_for(answer, "https://other.test")
    allowed = answer.headers["access-control-allow-headers"].lower()
    for name in ("authorization", "content-type", "idempotency-key", "last-event-id"):
        assert name in allowed, allowed
    assert "POST" in answer.headers["access-control-allow-methods"]
    assert answer.headers.get("access-control-allow-origin") != "*"
    # Each header once: a browser refuses a preflight with two Allow-Origin values.
    head = await _raw_head(f"{auth_broker.url}/topics/t/events", "OPTIONS", headers)
    assert head.lower().count(b"access-control-allow-origin:") == 1, head


async def _raw_head(url: str, method: str, headers: dict[str, str]) -> bytes:
    port = int(url.split(":")[2].split("/")[0])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes(method, url, headers))
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()


async def test_a_preflight_from_an_origin_not_listed_is_refused(
    auth_broker: BrokerProcess,
) -> None:
    headers = {"Origin": "https://evil.test", "Access-Control-Request-Method": "POST"}
    answer = await _finish(
        await raw_request(f"{auth_broker.url}/topics/t/events", "OPTIONS", headers=headers)
    )
    assert answer.status == 403
    assert "access-control-allow-origin" not in answer.headers


# -- no token in the logs ----------------------------------------------------------------------


async def test_no_token_is_ever_logged(auth_broker: BrokerProcess) -> None:
    """With the access log on: tokens in the query (every path) and bad tokens."""
    topic = await _topic_with_an_event(auth_broker.url)
    marker = uuid.uuid4().hex
    good = hs_token(claims(publish=[topic], subscribe=[topic], jti=marker))
    bad = hs_token(claims(subscribe=[topic], jti=marker), secret="wrong-secret-" + "q" * 40)
    tokens = [good, bad]
    query = f"/topics/{topic}/events?access_token={good}"
    await stream_lean(auth_broker.url, query, {})
    await stream_by_app(auth_broker.url, query, {})
    await stream_lean(auth_broker.url, f"/topics/{topic}/events?access_token={bad}", {})
    await publish(auth_broker.url, topic, {}, f"?access_token={good}")
    # A name with a space is no token to the query parser (refused), and was logged whole.
    await publish(auth_broker.url, topic, {}, f"?access_token+={good}")
    # With its "=" encoded, the pair is one name to the parser (refused), and was logged.
    await publish(auth_broker.url, topic, {}, f"?access_token%3D{good}")
    await stream_lean(auth_broker.url, f"/topics/{topic}/events?a=1&access_token%3d{good}", {})
    # A WebSocket upgrade: uvicorn wrote its request line to the error log, token and all.
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}
    upgrade["Sec-WebSocket-Key"] = base64.b64encode(b"k" * 16).decode()
    await stream_lean(auth_broker.url, query, upgrade)
    wait_until(
        lambda: auth_broker.log().count(f"/topics/{topic}/events?") >= 8,
        timeout=10,
        what="the access log lines of these requests",
    )
    log = auth_broker.log()
    assert "access_token=[redacted]" in log
    for token in tokens:
        assert token not in log
        for part in token.split("."):
            assert part not in log, "a part of a token is in the log"


async def test_a_listing_names_no_topic_the_caller_may_not_see_not_even_in_its_cursor(
    auth_broker: BrokerProcess,
) -> None:
    """Pages of one topic, followed to the end: every page and every ``next`` names
    only topics the caller may subscribe to (a cursor that resumes inside a SCAN step
    names the page's last topic: it must be one the caller was shown)."""
    run = uuid.uuid4().hex[:8]
    hidden = [f"sec-{run}-{n}" for n in range(6)]
    seen = [f"pub-{run}-{n}" for n in range(3)]
    admin = bearer(hs_token(claims(publish=[f"*-{run}-*"])))
    for topic in hidden + seen:
        assert (await publish(auth_broker.url, topic, admin)).status == 201
    for who, headers in {
        "anonymous": {},
        "pub-only": bearer(hs_token(claims(subscribe=["pub-*"]))),
    }.items():
        listed: list[str] = []
        cursor = ""
        async with httpx.AsyncClient(base_url=auth_broker.url, timeout=10) as client:
            for _ in range(1000):
                params = {"limit": "1"} | ({"cursor": cursor} if cursor else {})
                page = (await client.get("/topics", params=params, headers=headers)).json()
                listed += [t["topic"] for t in page["topics"]]
                assert len(page["topics"]) <= 1, page
                cursor = page["next"] or ""
                assert not any(name in cursor for name in hidden), (who, cursor)
                if not cursor:
                    break
        assert not set(hidden) & set(listed), (who, listed)
        assert set(seen) <= set(listed), (who, listed)


async def test_a_token_under_an_encoded_parameter_name_is_not_logged(
    auth_broker: BrokerProcess,
) -> None:
    """``access%5Ftoken=`` is the same parameter once decoded (and a token there is
    used): the access log must not show it, on the lean path or through the app."""
    topic = await _topic_with_an_event(auth_broker.url)
    marker = uuid.uuid4().hex
    token = hs_token(claims(publish=[topic], subscribe=[topic], jti=marker))
    query = f"?x=access_token&access%5Ftoken={token}&access%5ftoken={token}"
    assert (await stream_lean(auth_broker.url, f"/topics/{topic}/events{query}", {})).status == 200
    assert (
        await stream_by_app(auth_broker.url, f"/topics/{topic}/events{query}", {})
    ).status == 200
    assert (await publish(auth_broker.url, topic, {}, query)).status == 201
    wait_until(
        lambda: auth_broker.log().count(f"/topics/{topic}/events?x=access_token") >= 3,
        timeout=10,
        what="the access log lines of these requests",
    )
    log = auth_broker.log()
    for part in token.split("."):
        assert part not in log, "a part of a token is in the log"


# -- cookie publishes: cross-site request forgery ------------------------------------------

COOKIE_ROUTES = ["publish-lean", "publish-by-app", "ingest-lean", "close", "delete"]
OWN = "<the broker's own origin>"


def _change_of(route: str, topic: str) -> tuple[str, list[str], bytes]:
    """A change to ``topic`` by ``route``: its request line, framing headers and body."""
    events = f"POST /topics/{topic}/events HTTP/1.1"
    if route == "publish-lean":  # (a short text/plain body: served on the connection)
        return events, ["Content-Type: text/plain", "Content-Length: 5"], b"hello"
    if route == "publish-by-app":  # (chunked: uvicorn's request cycle and the app serve it)
        framing = ["Content-Type: application/json", "Transfer-Encoding: chunked"]
        return events, framing, b'b\r\n{"data": 1}\r\n0\r\n\r\n'
    if route == "ingest-lean":
        line = b'{"data": 1}\n'
        return events, ["Content-Type: application/x-ndjson", f"Content-Length: {len(line)}"], line
    if route == "close":
        return f"POST /topics/{topic}/close HTTP/1.1", ["Content-Length: 0"], b""
    assert route == "delete"
    return f"DELETE /topics/{topic} HTTP/1.1", [], b""


async def cookie_change(
    broker: BrokerProcess, route: str, headers: dict[str, str], host: str | None = None
) -> Answer:
    """``route``'s change to a topic of its own, authorized by the cookie alone, its
    ``Host`` ``host`` (else the broker's address)."""
    topic = await _topic_with_an_event(broker.url)
    token = hs_token(claims(publish=[topic], subscribe=[topic]))
    request_line, framing, body = _change_of(route, topic)
    lines = [
        request_line,
        f"Host: {host or f'127.0.0.1:{broker.port}'}",
        f"Cookie: broker_token={token}",
        *framing,
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    head = "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n"
    return await _finish(await raw_request(broker.url, raw_head=head + body))


def assert_refused_as_forgery(answer: Answer) -> None:
    assert_forbidden(answer)
    assert "Authorization header" in str(answer.problem["detail"]), answer.problem


@pytest.mark.parametrize("route", COOKIE_ROUTES)
@pytest.mark.parametrize(
    ("sent", "allowed"),
    [
        ({"Origin": "https://evil.example"}, False),  # another site's page, riding the cookie
        ({"Origin": APP_ORIGIN}, True),  # a listed origin
        ({"Origin": OWN}, True),  # the broker's own pages (the live page publishes)
        ({"Origin": "null"}, False),  # a sandboxed frame, a redirect across sites
        # No Origin: browsers send one with every publish, so this is no browser's, or a
        # browser's whose Origin something (a proxy, an extension) removed; the cookie
        # may be any visitor's.
        ({}, False),
        ({"Sec-Fetch-Site": "cross-site"}, False),
        ({"Sec-Fetch-Site": "same-site"}, False),  # (another origin of the same site)
        ({"Sec-Fetch-Site": "same-origin"}, True),  # none, but the browser says it is ours
        # The Origin decides when there is one: the broker's own is same-origin, whatever
        # else is said, and another's is refused.
        ({"Origin": OWN, "Sec-Fetch-Site": "cross-site"}, True),
        ({"Origin": "https://evil.example", "Sec-Fetch-Site": "same-origin"}, False),
    ],
)
async def test_a_cookie_publishes_only_from_a_listed_or_the_brokers_own_origin(
    auth_broker: BrokerProcess, route: str, sent: dict[str, str], allowed: bool
) -> None:
    """Cross-site request forgery: a browser sends the broker's cookie with a form or a
    plain fetch from any site (no preflight for text/plain). A publish (every form), a
    close or a delete by cookie from an origin neither listed nor the broker's own is
    refused, and so is one that names no origin at all."""
    headers = {k: auth_broker.url if v == OWN else v for k, v in sent.items()}
    answer = await cookie_change(auth_broker, route, headers)
    if allowed:
        assert answer.status in (200, 201, 204), (answer.status, answer.body)
    else:
        assert_refused_as_forgery(answer)


ACTION_OF_ROUTE = {
    "publish-lean": "publish",
    "publish-by-app": "publish",
    "ingest-lean": "publish",
    "close": "close",
    "delete": "delete",
}


@pytest.mark.parametrize("route", COOKIE_ROUTES)
@pytest.mark.parametrize("sent", [{"Origin": "https://evil.example"}, {}])
async def test_a_refusal_as_forgery_names_the_action_refused(
    auth_broker: BrokerProcess, route: str, sent: dict[str, str]
) -> None:
    """A close or a delete refused was told as "a publish by cookie", which its
    caller did not send."""
    answer = await cookie_change(auth_broker, route, sent)
    assert_refused_as_forgery(answer)
    detail = str(answer.problem["detail"])
    assert detail.startswith(f"a {ACTION_OF_ROUTE[route]} by cookie "), detail


async def test_a_publish_from_another_site_with_the_token_in_a_header_is_no_forgery(
    auth_broker: BrokerProcess,
) -> None:
    """No other site's page can add the header: any origin may publish with it."""
    topic = new_topic("auth")
    token = bearer(hs_token(claims(publish=[topic])))
    for headers in ({"Origin": "https://evil.example"}, {}):
        assert (await publish(auth_broker.url, topic, token | headers)).status == 201


@pytest.mark.parametrize("route", COOKIE_ROUTES)
@pytest.mark.parametrize(
    ("host", "forwarded_proto", "origin", "allowed"),
    [
        # Behind a proxy ending TLS that the broker trusts (uvicorn believes the
        # X-Forwarded-Proto of 127.0.0.1): the page's scheme must be the request's.
        ("broker.test", "https", "https://broker.test", True),
        ("broker.test:443", "https", "https://broker.test", True),  # (443: https's default)
        ("broker.test", "https", "http://broker.test", False),  # a page served in the clear
        ("broker.test", "https", "https://broker.test:8443", False),  # another port
        # In the clear: 80 is http's default port, any other is another origin.
        ("broker.test", None, "http://broker.test", True),
        ("broker.test:80", None, "http://broker.test", True),
        ("broker.test:8080", None, "http://broker.test", False),
        ("broker.test", None, "http://other.test", False),
        # The broker sees http, the page is on https: a TLS proxy it does not trust
        # (FORWARDED_ALLOW_IPS) says nothing it believes. Its own page, taken.
        ("broker.test", None, "https://broker.test", True),
        ("broker.test", "http", "https://broker.test", True),
        ("broker.test:8080", None, "https://broker.test:8080", True),
        ("broker.test:8080", None, "https://broker.test", False),
    ],
)
async def test_the_brokers_own_origin_is_its_scheme_host_and_port(
    auth_broker: BrokerProcess,
    route: str,
    host: str,
    forwarded_proto: str | None,
    origin: str,
    allowed: bool,
) -> None:
    """A page's origin is the broker's own only with the scheme, host and port the
    request was sent to. The host alone let a page of ``http://broker.test``, which
    anyone on its way can rewrite, publish with the cookie of ``https://broker.test``,
    and refused ``broker.test:443`` named with its port. On every path: a lean publish
    or ingest took its scheme as http whatever the proxy said."""
    headers = {"Origin": origin}
    if forwarded_proto is not None:
        headers["X-Forwarded-Proto"] = forwarded_proto
    answer = await cookie_change(auth_broker, route, headers, host=host)
    if allowed:
        assert answer.status in (200, 201, 204), (answer.status, answer.body)
    else:
        assert_refused_as_forgery(answer)


# -- a streaming ingest outliving its token ------------------------------------------------------


async def _ingest_past_its_token(
    broker: BrokerProcess, path_kind: str, then: bytes, headers: tuple[str, ...] = ()
) -> tuple[bytes, bytes]:
    """An ingest on a new topic whose token expires 4 s on: line 1 stored under it,
    then, once it expired, ``then`` and the body's end; line 1 alone stored. Its final
    answer."""
    topic = new_topic("auth")
    token = hs_token(claims(publish=[topic], expires_in=4))
    viewer = hs_token(claims(subscribe=[topic]))
    exp = orjson.loads(_payload(token))["exp"]
    head = [
        f"POST /topics/{topic}/events HTTP/1.1",
        f"Host: 127.0.0.1:{broker.port}",
        f"Authorization: Bearer {token}",
        "Content-Type: application/x-ndjson",
        *headers,
        "Transfer-Encoding: chunked",
        *(["Expect: 100-continue"] if path_kind == "by-app" else []),
    ]
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    try:
        writer.write("\r\n".join(head).encode() + b"\r\n\r\n" + chunk(b'{"data": 1}\n'))
        await writer.drain()
        wait_until(lambda: stored(broker.url, topic, viewer) == [1], timeout=5, what="line 1")
        while time.time() < exp + 0.2:  # (the token's clock: whole seconds)
            await asyncio.sleep(0.1)
        writer.write(chunk(then) + b"0\r\n\r\n")
        await writer.drain()
        status, body = await _final_answer(reader)
    finally:
        writer.close()
    assert await asyncio.to_thread(stored, broker.url, topic, viewer) == [1]
    return status, body


@pytest.mark.parametrize("path_kind", ["lean", "by-app"])
async def test_a_streaming_ingest_stops_storing_when_its_token_expires(
    auth_broker: BrokerProcess, path_kind: str
) -> None:
    """A token is checked at the request's head; an ingest lasts as long as its
    producer sends. Lines that came after the token's expiry were stored for as long
    as they came (a publish right outliving its token by hours). They are refused
    with 401; the lines before stay stored."""
    status, body = await _ingest_past_its_token(auth_broker, path_kind, b'{"data": 2}\n')
    assert status.startswith(b"HTTP/1.1 401 "), status
    assert "the token expired during the ingest" in orjson.loads(body)["detail"]


@pytest.mark.parametrize("path_kind", ["lean", "by-app"])
async def test_a_keyed_ingest_whose_token_expires_in_its_blank_last_lines_is_answered(
    auth_broker: BrokerProcess, path_kind: str
) -> None:
    """Every line stored before the token expired, only blank lines after it: nothing
    is refused storing, and the answer is its ids, as a body without those blank lines
    is answered. The end's check of its blank lines (it stores nothing) refused it 401,
    a producer told its stream failed."""
    key = ("Idempotency-Key: blank-last-lines",)
    status, body = await _ingest_past_its_token(auth_broker, path_kind, b"\n\n", key)
    assert status.startswith(b"HTTP/1.1 201 "), (status, body)
    assert len(orjson.loads(body)["ids"]) == 1, body


@pytest.mark.parametrize("path_kind", ["lean", "by-app"])
async def test_a_publish_whose_body_outlives_its_token_is_refused(
    auth_broker: BrokerProcess, path_kind: str
) -> None:
    """The app's route checked the token before the body: a slow body was stored after
    the token's expiry (the lean path checks once the body is in)."""
    topic = new_topic("auth")
    token = hs_token(claims(publish=[topic], expires_in=3))
    exp = orjson.loads(_payload(token))["exp"]
    body = b'{"data": 1}'
    head = [
        f"POST /topics/{topic}/events HTTP/1.1",
        f"Host: 127.0.0.1:{auth_broker.port}",
        f"Authorization: Bearer {token}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(["Expect: 100-continue"] if path_kind == "by-app" else []),
    ]
    stream, writer = await asyncio.open_connection("127.0.0.1", auth_broker.port)
    try:
        writer.write("\r\n".join(head).encode() + b"\r\n\r\n" + body[:5])
        await writer.drain()
        while time.time() < exp + 0.2:  # (the token's clock: whole seconds)
            await asyncio.sleep(0.1)
        writer.write(body[5:])
        await writer.drain()
        status, _ = await _final_answer(stream)
    finally:
        writer.close()
    assert status.startswith(b"HTTP/1.1 401 "), status
    viewer = hs_token(claims(subscribe=[topic]))
    assert await asyncio.to_thread(stored, auth_broker.url, topic, viewer) == []


async def _final_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The status line and body of the answer after any ``100 Continue``."""
    head, body = await final_answer(reader)
    return head.split(b"\r\n")[0], body


async def final_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The head (its status line and headers) and body of the answer after any
    ``100 Continue``."""
    while True:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        if not head.startswith(b"HTTP/1.1 100 "):
            break
    [size] = [
        line.split(b":")[1]
        for line in head.lower().split(b"\r\n")[1:]
        if line.startswith(b"content-length:")
    ]
    return head, await asyncio.wait_for(reader.readexactly(int(size)), 5)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def stored(url: str, topic: str, token: str) -> list[int]:
    response = httpx.get(
        f"{url}/topics/{topic}/events",
        params={"from": "earliest"},
        headers={"Accept": "application/json", **bearer(token)},
    )
    return [event["data"] for event in response.json()["events"]]


@pytest.mark.parametrize("path", ["/topics", "/stats"])
@pytest.mark.parametrize("token_kind", ["expired", "bad-signature"])
@pytest.mark.parametrize("source", ["bearer", "cookie", "query"])
async def test_a_listing_refuses_a_token_it_cannot_use(
    auth_broker: BrokerProcess, path: str, token_kind: str, source: str
) -> None:
    """A listing needs no token, but one that is expired or invalid gets 401: it was
    answered 200 with only the public topics, and the client never learnt to get a
    new token (as a public topic's own routes answer it)."""
    token = {
        "expired": hs_token(claims(subscribe=["*"], expires_in=-10)),
        "bad-signature": hs_token(claims(subscribe=["*"]), secret=SECRET[::-1]),
    }[token_kind]
    headers, query = _sent_by(source, token)
    async with httpx.AsyncClient(base_url=auth_broker.url, timeout=10) as client:
        response = await client.get(f"{path}?{query}", headers=headers)
    assert_unauthorized(Answer(response.status_code, dict(response.headers), response.content))


async def test_a_token_under_an_encoded_parameter_name_alone_is_used(
    auth_broker: BrokerProcess,
) -> None:
    """``?access%5Ftoken=`` is ``access_token`` to the query parser: a token there was
    not looked for unless the plain name was in the query too (401)."""
    topic = await _topic_with_an_event(auth_broker.url)
    token = hs_token(claims(subscribe=[topic]))
    path = f"/topics/{topic}/events?access%5Ftoken={token}"
    assert (await stream_lean(auth_broker.url, path, {})).status == 200
    assert (await stream_by_app(auth_broker.url, path, {})).status == 200


async def test_stats_names_its_instance_by_an_opaque_id_with_authorization_on(
    auth_broker: BrokerProcess,
) -> None:
    """``/stats`` answers anyone: its ``instance`` gave every anonymous caller the host's
    name and the process's pid (``/readyz`` gave the Redis host, for the same reason
    cleaned). With authorization on it is an opaque id, the same for every caller and
    answer of the process (the page tells instances apart by it), that the broker's log
    maps to the host and pid."""
    topic = new_topic("stats")
    async with httpx.AsyncClient(base_url=auth_broker.url, timeout=10) as client:
        anonymous = await client.get("/stats")
        again = await client.get("/stats")
        holder = await client.get("/stats", headers=bearer(hs_token(claims(subscribe=[topic]))))
    assert [r.status_code for r in (anonymous, again, holder)] == [200, 200, 200]
    instance = anonymous.json()["instance"]
    assert re.fullmatch(r"[0-9a-f]{12}", instance), instance
    assert again.json()["instance"] == holder.json()["instance"] == instance
    assert socket.gethostname() not in anonymous.text + holder.text
    [mapped] = [line for line in auth_broker.log().splitlines() if f"is {instance} in" in line]
    assert f"({socket.gethostname()}:" in mapped, mapped


def test_stats_names_an_open_brokers_instance_by_its_host_and_pid(
    http_broker: BrokerProcess,
) -> None:
    """With authorization off anyone may publish and delete: nothing is hidden by an id."""
    stats = httpx.get(f"{http_broker.url}/stats", timeout=10).json()
    host, _, pid = stats["instance"].rpartition(":")
    assert host == socket.gethostname() and pid.isdigit(), stats


def assert_not_sniffed(answer: Answer) -> None:
    options = answer.headers.get("x-content-type-options")
    assert options == "nosniff", (answer.status, answer.headers)


@pytest.mark.parametrize("route", ROUTES)
async def test_no_answer_of_a_topic_is_sniffed(auth_broker: BrokerProcess, route: str) -> None:
    """Served or refused (a problem), by the lean paths or the app: every answer says
    ``X-Content-Type-Options: nosniff``, so a browser never takes JSON holding an
    event's data, or a problem's detail naming a topic, for a page or a script of the
    broker's origin (history, topic info and problems lacked it; streams too)."""
    topic = await _topic_with_an_event(auth_broker.url)
    token = hs_token(claims(publish=[topic], subscribe=[f"{topic}*"]))
    served = await call(route, auth_broker.url, topic, bearer(token))
    assert_allowed(route, served)
    refused = await call(route, auth_broker.url, topic, {})
    assert_unauthorized(refused)
    for answer in (served, refused):
        assert_not_sniffed(answer)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/topics", 200),
        ("/topics?limit=0", 400),
        ("/topics/auth-never-had-an-event", 404),
        ("/no-such-route", 404),
        ("/healthz", 200),
        ("/readyz", 200),
        ("/stats", 200),
    ],
)
async def test_no_listing_probe_or_refusal_is_sniffed(
    auth_broker: BrokerProcess, path: str, status: int
) -> None:
    headers = bearer(hs_token(claims(subscribe=["auth-*"])))
    async with httpx.AsyncClient(base_url=auth_broker.url, timeout=10) as client:
        response = await client.get(path, headers=headers)
    answer = Answer(response.status_code, dict(response.headers), response.content)
    assert answer.status == status, (answer.status, answer.body)
    assert_not_sniffed(answer)
