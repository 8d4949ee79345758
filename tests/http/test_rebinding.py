"""DNS rebinding against a broker on loopback with authorization off (``api.hosts``).

A page of any site can point its own host name at 127.0.0.1; its browser then
takes the broker for that site and lets the page publish, read and delete topics.
Such a request still names the attacker's host in ``Host``: the broker, on a
loopback address with no token check, serves only requests that name localhost
or an address, on every route and both ways a request is served (on the
connection, and by the app behind a request uvicorn serves), probes aside.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from api.hosts import ANY_NAME_SERVED, HostPolicy
from tests.http.helpers import RawResponse, new_topic
from tests.support.broker_process import BrokerProcess
from tests.support.redis_server import RedisServer
from tests.support.tokens import SECRET, claims, hs_token

FOREIGN = "rebound.example"


@pytest.fixture(scope="module")
def open_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """Authorization off, on 127.0.0.1 (the default bind of ``broker serve``)."""
    process = BrokerProcess(redis_url=redis_server.url, env={}).start()
    yield process
    process.close()


def _request(method: str, target: str, host: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


async def _answer(
    port: int,
    method: str,
    target: str,
    host: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    *,
    behind_health_check: bool = False,
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and (sized) body, or a stream's first block. Behind a health
    check, the request reaches the app (uvicorn serves the connection by then)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = _request(method, target, host, headers or {}, body)
        if behind_health_check:
            request = _request("GET", "/healthz", host, {}, b"") + request
        writer.write(request)
        if behind_health_check:
            first = RawResponse(reader, writer)
            await first.read_head()
            assert first.status == 200, "a health check is answered whatever the host"
            await first.read_sized_body()
        response = RawResponse(reader, writer)
        await asyncio.wait_for(response.read_head(), 10)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            await asyncio.wait_for(response.read_until(b"\n\n"), 10)
        elif method != "HEAD" and response.status not in (204, 304):
            await asyncio.wait_for(response.read_sized_body(), 10)
        return response.status, response.headers, bytes(response.body)
    finally:
        writer.close()


JSON = {"Content-Type": "application/json"}
NDJSON = {"Content-Type": "application/x-ndjson"}
JSON_ACCEPT = {"Accept": "application/json"}
EVENT = b'{"data": {"n": 1}}'


def _routes(topic: str) -> list[tuple[str, str, dict[str, str], bytes, bool]]:
    """Every kind of request a page could make: method, target, headers, body, and
    whether it is sent behind a health check (served by the app)."""
    stream = f"/topics/{topic}/events"
    return [
        ("POST", stream, JSON, EVENT, False),
        ("POST", stream, JSON, EVENT, True),
        ("POST", stream, {"Content-Type": "text/plain"}, b"hello", False),
        ("POST", stream, NDJSON, EVENT + b"\n", False),
        ("POST", f"/topics/{topic}/close", {}, b"", False),
        ("DELETE", f"/topics/{topic}", {}, b"", False),
        ("GET", stream, {}, b"", False),
        ("GET", stream + "?from=earliest", {}, b"", True),
        ("GET", f"/events?topic={topic}&topic={topic}-b", {}, b"", False),
        ("GET", stream, {"Accept": "application/json"}, b"", False),
        ("GET", f"/topics/{topic}", {}, b"", False),
        ("GET", "/topics", {}, b"", False),
        ("GET", "/stats", {}, b"", False),
        ("GET", "/", {}, b"", False),
        ("OPTIONS", stream, {"Origin": f"http://{FOREIGN}"}, b"", False),
    ]


async def test_a_request_naming_another_host_is_refused_on_every_route(
    open_broker: BrokerProcess,
) -> None:
    topic = new_topic("rebound")
    async with httpx.AsyncClient(base_url=open_broker.url) as client:
        stored = await client.post(f"/topics/{topic}/events", json={"data": "first"})
        assert stored.status_code == 201
        for method, target, headers, body, by_app in _routes(topic):
            status, answer_headers, answer = await _answer(
                open_broker.port,
                method,
                target,
                f"{FOREIGN}:{open_broker.port}",
                headers,
                body,
                behind_health_check=by_app,
            )
            where = f"{method} {target} {'(app)' if by_app else ''}"
            assert status == 421, (where, status, answer[:300])
            assert answer_headers["content-type"] == "application/problem+json", where
            problem: dict[str, Any] = orjson.loads(answer)
            assert problem["type"] == "/problems#host-not-served", problem
            assert FOREIGN in problem["detail"] and "localhost" in problem["detail"]
        # Said in the log, once (a proxy forwarding its clients' names is refused whole,
        # its probes passing), however many were refused.
        assert open_broker.log().count("refused requests sent to host") == 1, open_broker.log()
        # Nothing a refused request asked for happened: one event, open, not deleted.
        info = await client.get(f"/topics/{topic}")
        assert info.status_code == 200, info.text
        assert info.json()["length"] == 1, info.json()
        page = await client.get(
            f"/topics/{topic}/events?from=earliest&limit=10", headers=JSON_ACCEPT
        )
        assert [e["data"] for e in page.json()["events"]] == ["first"], page.json()


@pytest.mark.parametrize(
    "host", ["localhost", "127.0.0.1", "[::1]", "app.localhost", "LOCALHOST.", "127.0.0.2"]
)
async def test_a_request_naming_this_host_is_served(open_broker: BrokerProcess, host: str) -> None:
    topic = new_topic("local")
    port = open_broker.port
    name = f"{host}:{port}"
    status, _, body = await _answer(port, "POST", f"/topics/{topic}/events", name, JSON, EVENT)
    assert status == 201, body
    status, headers, _ = await _answer(port, "GET", f"/topics/{topic}/events?from=earliest", name)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    by_app = await _answer(
        port, "GET", f"/topics/{topic}", name, JSON_ACCEPT, behind_health_check=True
    )
    assert by_app[0] == 200, by_app


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/readyz/store", "/metrics"])
async def test_probes_are_answered_whatever_the_host(open_broker: BrokerProcess, path: str) -> None:
    status, _, body = await _answer(open_broker.port, "GET", path, "haproxy-check")
    assert status == 200, body


async def test_a_broker_with_authorization_serves_any_host(auth_broker_any: BrokerProcess) -> None:
    """A token guards the topics then (and a deployment names its own hosts)."""
    status, _, body = await _answer(
        auth_broker_any.port, "GET", "/topics", f"events.example.com:{auth_broker_any.port}"
    )
    assert status == 200, body


@pytest.fixture(scope="module")
def auth_broker_any(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    process = BrokerProcess(redis_url=redis_server.url, env={"BROKER_JWT_SECRET": SECRET}).start()
    yield process
    process.close()


@pytest.fixture(scope="module")
def listing_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """Authorization on, and a list of names: the list holds whatever the token."""
    env = {"BROKER_JWT_SECRET": SECRET, "BROKER_ALLOWED_HOSTS": "events.example.com, *.apps.test"}
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


@pytest.mark.parametrize(
    ("host", "served"),
    [
        ("events.example.com", True),
        ("EVENTS.example.com.", True),
        ("a.apps.test", True),
        ("a.b.apps.test", True),
        ("localhost", True),
        ("127.0.0.1", True),
        ("apps.test", False),
        ("other.example.com", False),
        ("events.example.com.rebound.example", False),
    ],
)
async def test_a_list_of_names_is_held_to_whatever_the_authorization(
    listing_broker: BrokerProcess, host: str, served: bool
) -> None:
    token = hs_token(claims(subscribe=["*"]))
    status, _, body = await _answer(
        listing_broker.port,
        "GET",
        "/topics",
        f"{host}:{listing_broker.port}",
        {"Authorization": f"Bearer {token}"},
    )
    assert status == (200 if served else 421), body


async def test_a_broker_with_authorization_and_no_names_says_so_at_start(
    auth_broker_any: BrokerProcess, listing_broker: BrokerProcess, open_broker: BrokerProcess
) -> None:
    """With no BROKER_ALLOWED_HOSTS a broker with authorization serves every name, so
    a rebound page passes for its own origin: a cookie sent to that name (one of a
    parent domain) publishes. Said loudly at start, not refused (see ``api.hosts``);
    a list, or authorization off on loopback (held to local names), says nothing."""
    topic = new_topic("rebound")
    cookie = {"Cookie": f"broker_token={hs_token(claims(publish=[topic]))}"}
    for broker, served in ((auth_broker_any, 201), (listing_broker, 421)):
        rebound = f"{FOREIGN}:{broker.port}"
        headers = JSON | cookie | {"Origin": f"http://{rebound}"}
        status, _, body = await _answer(
            broker.port, "POST", f"/topics/{topic}/events", rebound, headers, EVENT
        )
        assert status == served, body
    said = f"WARNING api.app: authorization: on, but {ANY_NAME_SERVED}"
    assert auth_broker_any.log().count(said) == 1, auth_broker_any.log()
    for quiet in (listing_broker, open_broker):
        assert "BROKER_ALLOWED_HOSTS is empty" not in quiet.log(), quiet.log()


@pytest.mark.parametrize(
    ("local_address", "auth", "listed", "checked"),
    [
        (("127.0.0.1", 8000), False, False, True),
        (("::1", 8000, 0, 0), False, False, True),
        (("127.8.9.10", 8000), False, False, True),
        (("192.0.2.7", 8000), False, False, False),  # a container's, a private network's
        (("0.0.0.0", 8000), False, False, False),
        (("127.0.0.1", 8000), True, False, False),  # authorization on: the token guards
        (("/run/broker.sock", None), False, False, False),  # a Unix socket: a local proxy's
        ("/run/broker.sock", False, False, False),
        (None, False, False, False),
        (("192.0.2.7", 8000), True, True, True),  # a list holds every connection
        # 127.0.0.1 on a dual-stack socket (the workers' on --host ::): not checked, it was
        (("::ffff:127.0.0.1", 8000, 0, 0), False, False, True),
        (("::ffff:192.0.2.7", 8000, 0, 0), False, False, False),
    ],
)
def test_which_connections_are_checked(
    local_address: Any, auth: bool, listed: bool, checked: bool
) -> None:
    policy = HostPolicy(["events.test"] if listed else [], auth_enabled=auth)
    assert policy.checks(local_address) is checked


@pytest.mark.parametrize(
    ("host", "named"),
    [
        (b"localhost:8000", True),
        (b"127.0.0.1", True),
        (b"[::1]:8000", True),
        (b"::1", True),
        (b"x.y.localhost:1", True),
        (b"localhost.rebound.example", False),
        (b"127.0.0.1.nip.io:8000", False),
        (b"rebound.example", False),
        (b"", False),
    ],
)
def test_which_hosts_name_the_broker(host: bytes, named: bool) -> None:
    assert HostPolicy([], auth_enabled=False).names_this_host(host) is named


def test_a_probe_under_a_root_path_is_answered_whatever_the_host() -> None:
    """``uvicorn --root-path /broker``: the probe's path carries the root, and HAProxy's
    health check (``Host: haproxy-check``) was refused: every backend down."""
    policy = HostPolicy([], auth_enabled=False)
    scope = {
        "server": ("127.0.0.1", 8000),
        "root_path": "/broker",
        "headers": [(b"host", b"haproxy-check")],
    }
    assert not policy.refuses(scope | {"path": "/broker/healthz"})
    assert policy.refuses(scope | {"path": "/broker/topics"})


def test_a_compose_service_name_with_an_underscore_may_be_listed() -> None:
    from api.settings import Settings

    assert Settings(allowed_hosts="my_broker, *.apps_internal").allowed_hosts
