"""/openapi.json against real answers: requests through real brokers (authorization off,
on, and a store that cannot be reached) answer only statuses and media types the
document lists for their route.

The document's structure and the routes it lists: tests/unit/test_openapi.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.http.helpers import new_topic
from tests.support.broker_process import BrokerProcess
from tests.support.redis_server import RedisServer, free_port
from tests.support.tokens import JWT_SETTINGS, claims, hs_token

EVENTS = "/topics/{topic}/events"
TOPIC = "/topics/{topic}"
CLOSE = "/topics/{topic}/close"
JSON = {"Accept": "application/json"}


@pytest.fixture(scope="module")
def auth_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    process = BrokerProcess(redis_url=redis_server.url, env=JWT_SETTINGS)
    yield process.start()
    process.close()


@pytest.fixture(scope="module")
def storeless_broker() -> Iterator[BrokerProcess]:
    """A broker whose Redis is not there (nothing listens on its port)."""
    url = f"redis://127.0.0.1:{free_port()}"
    process = BrokerProcess(redis_url=url, env={"BROKER_PUBLISH_TIMEOUT_SECONDS": "1"})
    yield process.start()
    process.close()


class Checker:
    """Sends requests to a broker and checks each answer against its /openapi.json."""

    def __init__(self, broker: BrokerProcess) -> None:
        self.client = httpx.Client(base_url=broker.url, timeout=10)
        self.document = httpx.get(broker.url + "/openapi.json", timeout=10).json()

    def __call__(self, status: int, method: str, path: str, topic: str = "", **kwargs: Any) -> None:
        """``method`` on ``path`` (a documented path, ``{topic}`` filled) answers
        ``status``, which the document lists for it, with a media type it lists; a body
        taken is of a media type it lists."""
        url = path.format(topic=topic)
        with self.client.stream(method, url, **kwargs) as response:  # (a stream: its head)
            answered, media = response.status_code, response.headers.get("content-type", "")
            sent = response.request.headers.get("content-type", "").split(";")[0]
        where = f"{method} {url}"
        assert answered == status, f"{where}: {answered}, not {status} (the test's premise)"
        operation = self.document["paths"][path][method.lower()]
        if sent and answered < 300:
            assert sent in operation["requestBody"]["content"], f"{where}: a {sent} body"
        responses = operation["responses"]
        assert str(status) in responses, f"{where} answers {status}, undocumented"
        documented = self._resolve(responses[str(status)]).get("content", {})
        media = media.split(";")[0].strip()
        assert media in documented if media else not documented, (where, media, documented)

    def _resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target = self.document
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = target
        return node

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def check(http_broker: BrokerProcess) -> Iterator[Checker]:
    checker = Checker(http_broker)
    yield checker
    checker.close()


def test_publishes_answer_documented_statuses(check: Checker) -> None:
    topic = new_topic()
    check(201, "POST", EVENTS, topic, json={"data": 1})
    check(201, "POST", EVENTS, topic, json=[{"data": 1}, {"data": 2}])
    text = {"Content-Type": "text/plain; charset=utf-8"}
    check(201, "POST", EVENTS, topic, content=b"hi", headers=text, params={"event": "x"})
    ndjson = {"Content-Type": "application/x-ndjson"}
    check(201, "POST", EVENTS, topic, content=b'{"data": 1}\n{"data": 2}\n', headers=ndjson)
    key = {"Idempotency-Key": f"k-{topic}"}
    check(201, "POST", EVENTS, topic, json={"data": 1}, headers=key)
    check(200, "POST", EVENTS, topic, json={"data": 1}, headers=key)
    check(400, "POST", EVENTS, topic, content=b"{", headers={"Content-Type": "application/json"})
    check(415, "POST", EVENTS, topic, content=b"<a/>", headers={"Content-Type": "text/xml"})
    check(413, "POST", EVENTS, topic, json={"data": "x" * 70_000})  # (over 64 KiB: one event)


def test_a_topic_s_life_answers_documented_statuses(check: Checker) -> None:
    topic, other = new_topic(), new_topic()
    check(404, "GET", TOPIC, topic)
    check(400, "GET", TOPIC, "bad!name")
    check(201, "POST", EVENTS, topic, json={"data": 1})
    check(200, "GET", EVENTS, topic)  # (the stream)
    check(200, "GET", EVENTS, topic, headers=JSON)  # (a history page)
    check(200, "GET", "/events", params=[("topic", topic), ("topic", other)])
    check(200, "GET", TOPIC, topic)
    check(200, "GET", "/topics", params={"prefix": topic})
    check(201, "POST", CLOSE, topic)
    check(200, "POST", CLOSE, topic)
    check(409, "POST", EVENTS, topic, json={"data": 1})
    check(204, "GET", EVENTS, topic)
    check(204, "GET", "/events", params={"topic": topic})
    check(204, "DELETE", TOPIC, topic)


def test_operations_and_hostile_heads_answer_documented_statuses(check: Checker) -> None:
    for path in ("/healthz", "/readyz", "/readyz/store", "/metrics", "/stats"):
        check(200, "GET", path)
    check(431, "GET", "/healthz", headers={"X-Big": "x" * 20_000})
    check(431, "POST", EVENTS, new_topic(), headers={"X-Big": "x" * 20_000})
    check(421, "GET", "/topics", headers={"Host": "rebound.example"})  # (loopback, auth off)


def test_refusals_of_tokens_are_documented(auth_broker: BrokerProcess) -> None:
    check = Checker(auth_broker)
    topic = new_topic()
    other = {"Authorization": "Bearer " + hs_token(claims(["x-*"], ["x-*"]))}
    try:
        check(401, "POST", EVENTS, topic, json={"data": 1})
        check(403, "POST", EVENTS, topic, json={"data": 1}, headers=other)
        check(401, "GET", EVENTS, topic)
        check(403, "GET", EVENTS, topic, headers=other | JSON)
        check(403, "GET", "/events", params={"topic": topic}, headers=other)
        check(401, "GET", TOPIC, topic)
        check(401, "GET", "/topics", headers={"Authorization": "Bearer not-a-token"})
        check(403, "DELETE", TOPIC, topic, headers=other)
        check(401, "POST", CLOSE, topic)
    finally:
        check.close()


def test_a_store_out_of_reach_answers_documented_statuses(
    storeless_broker: BrokerProcess,
) -> None:
    check = Checker(storeless_broker)
    topic = new_topic()
    try:
        check(503, "POST", EVENTS, topic, json={"data": 1})
        check(503, "GET", EVENTS, topic, headers=JSON)
        check(200, "GET", EVENTS, topic)  # (a stream is told to come back)
        for method, path in [("GET", TOPIC), ("DELETE", TOPIC), ("POST", CLOSE)]:
            check(503, method, path, topic)
        for path in ("/topics", "/stats", "/readyz/store"):
            check(503, "GET", path)
    finally:
        check.close()


def test_a_gap_s_reason_is_one_the_document_lists(check: Checker) -> None:
    """The reasons a history page's gap (and a stream's ``broker.gap``) carries are
    those of the document's GapNotice: it listed trimmed and unknown, not the
    ``deleted`` of a topic deleted since the cursor's id."""
    topic, other = new_topic(), new_topic()
    deleted_id = check.client.post(f"/topics/{topic}/events", json={"data": 1}).json()["id"]
    other_id = check.client.post(f"/topics/{other}/events", json={"data": 1}).json()["id"]
    assert check.client.delete(f"/topics/{topic}").status_code == 204
    assert check.client.post(f"/topics/{topic}/events", json={"data": 2}).status_code == 201
    listed = check.document["components"]["schemas"]["GapNotice"]["properties"]["reason"]["enum"]
    for after, reason in [(deleted_id, "deleted"), (other_id, "unknown")]:
        page = check.client.get(f"/topics/{topic}/events", params={"after": after}, headers=JSON)
        assert page.status_code == 200, page.text
        assert page.json()["gap"]["reason"] == reason, page.text  # (the test's premise)
        assert reason in listed, (reason, listed)
