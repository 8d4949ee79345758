"""Publish: ``POST /topics/{topic}/events`` with JSON, batches, text/plain and Idempotency-Key."""

from __future__ import annotations

import gzip

import httpx
import pytest

from tests.http.helpers import assert_id, assert_problem, new_topic, raw_request
from tests.support.broker_process import BrokerProcess


def history(client: httpx.Client, topic: str, **params: object) -> dict[str, object]:
    response = client.get(
        f"/topics/{topic}/events", params=params, headers={"Accept": "application/json"}
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def length(client: httpx.Client, topic: str) -> int:
    response = client.get(f"/topics/{topic}")
    assert response.status_code == 200, response.text
    return int(response.json()["length"])


def test_publish_json_answers_201_with_the_id(client: httpx.Client) -> None:
    topic = new_topic()
    response = client.post(f"/topics/{topic}/events", json={"data": {"n": 1}, "event": "created"})
    assert response.status_code == 201, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"id"}
    assert_id(body["id"])
    page = history(client, topic)
    assert page["events"] == [{"id": body["id"], "event": "created", "data": {"n": 1}}]


def test_ids_are_unique_and_increase_within_a_topic(client: httpx.Client) -> None:
    topic = new_topic()
    ids = [client.post(f"/topics/{topic}/events", json={"data": n}).json()["id"] for n in range(5)]
    assert len(set(ids)) == 5
    page = history(client, topic)
    assert [event["id"] for event in page["events"]] == ids  # type: ignore[index]


@pytest.mark.parametrize(
    "data", [None, True, 0, -1.5, "text", [], {}, [1, "two", {"three": [3]}], "é ✓ \n"]
)
def test_any_json_value_is_data(client: httpx.Client, data: object) -> None:
    topic = new_topic()
    response = client.post(f"/topics/{topic}/events", json={"data": data})
    assert response.status_code == 201, response.text
    assert history(client, topic)["events"][0]["data"] == data  # type: ignore[index]


def test_a_json_integer_beyond_64_bits_is_data_too(client: httpx.Client) -> None:
    topic = new_topic()
    body = b'{"data": 18446744073709551616}'
    response = client.post(
        f"/topics/{topic}/events", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 201, response.text


def test_batch_answers_201_with_ids_stored_in_order(client: httpx.Client) -> None:
    topic = new_topic()
    batch = [{"data": n, "event": f"e{n}"} for n in range(10)]
    response = client.post(f"/topics/{topic}/events", json=batch)
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"ids"}
    assert len(body["ids"]) == 10 and len(set(body["ids"])) == 10
    for event_id in body["ids"]:
        assert_id(event_id)
    page = history(client, topic)
    stored = [(e["id"], e["event"], e["data"]) for e in page["events"]]  # type: ignore[union-attr]
    assert stored == [(i, f"e{n}", n) for n, i in enumerate(body["ids"])]


def test_a_batch_of_one_still_answers_ids(client: httpx.Client) -> None:
    topic = new_topic()
    response = client.post(f"/topics/{topic}/events", json=[{"data": 1}])
    assert response.status_code == 201, response.text
    assert list(response.json()) == ["ids"]
    assert len(response.json()["ids"]) == 1


def test_a_batch_is_stored_atomically_between_other_publishes(client: httpx.Client) -> None:
    topic = new_topic()
    before = client.post(f"/topics/{topic}/events", json={"data": "before"}).json()["id"]
    ids = client.post(f"/topics/{topic}/events", json=[{"data": n} for n in range(50)]).json()
    after = client.post(f"/topics/{topic}/events", json={"data": "after"}).json()["id"]
    stored = [e["id"] for e in history(client, topic, limit=1000)["events"]]  # type: ignore[union-attr]
    assert stored == [before, *ids["ids"], after]


def test_text_plain_with_event_type(client: httpx.Client) -> None:
    topic = new_topic()
    text = "hello\nworld ✓"
    response = client.post(
        f"/topics/{topic}/events",
        params={"event": "greeting"},
        content=text.encode(),
        headers={"Content-Type": "text/plain; charset=utf-8"},
    )
    assert response.status_code == 201, response.text
    event_id = response.json()["id"]
    assert list(response.json()) == ["id"]
    page = history(client, topic)
    assert page["events"] == [{"id": event_id, "event": "greeting", "data": text}]


def test_text_plain_without_event_type(client: httpx.Client) -> None:
    topic = new_topic()
    response = client.post(
        f"/topics/{topic}/events",
        content=b'{"data": "not parsed"}',
        headers={"Content-Type": "text/plain; charset=UTF-8"},
    )
    assert response.status_code == 201, response.text
    page = history(client, topic)
    assert page["events"][0]["event"] is None  # type: ignore[index]
    assert page["events"][0]["data"] == '{"data": "not parsed"}'  # type: ignore[index]


def test_media_types_are_case_insensitive(client: httpx.Client) -> None:
    topic = new_topic()
    response = client.post(
        f"/topics/{topic}/events",
        content=b'{"data": 1}',
        headers={"Content-Type": "Application/JSON; Charset=UTF-8"},
    )
    assert response.status_code == 201, response.text


# -- Idempotency-Key ----------------------------------------------------------------


def test_a_repeated_idempotency_key_stores_nothing_and_answers_200(client: httpx.Client) -> None:
    topic = new_topic()
    headers = {"Idempotency-Key": "order-42 / attempt (1)"}
    first = client.post(f"/topics/{topic}/events", json={"data": 1}, headers=headers)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    for _ in range(3):
        repeat = client.post(f"/topics/{topic}/events", json={"data": 1}, headers=headers)
        assert repeat.status_code == 200, repeat.text
        assert repeat.json() == first.json()
        assert repeat.headers.get("idempotent-replayed") == "true"
    assert length(client, topic) == 1


def test_a_repeated_key_answers_the_first_answer_even_for_another_body(
    client: httpx.Client,
) -> None:
    topic = new_topic()
    headers = {"Idempotency-Key": "k1"}
    first = client.post(f"/topics/{topic}/events", json=[{"data": 1}, {"data": 2}], headers=headers)
    assert first.status_code == 201, first.text
    repeat = client.post(
        f"/topics/{topic}/events", json=[{"data": 1}, {"data": 2}], headers=headers
    )
    assert repeat.status_code == 200
    assert repeat.json() == first.json() and "ids" in repeat.json()
    assert repeat.headers.get("idempotent-replayed") == "true"
    text = client.post(
        f"/topics/{topic}/events",
        content=b"other",
        headers={**headers, "Content-Type": "text/plain; charset=utf-8"},
    )
    assert text.status_code == 200
    assert text.json()["ids"] == first.json()["ids"]
    assert length(client, topic) == 2


def test_an_idempotency_key_is_per_topic(client: httpx.Client) -> None:
    first, second = new_topic(), new_topic()
    headers = {"Idempotency-Key": "same-key"}
    a = client.post(f"/topics/{first}/events", json={"data": 1}, headers=headers)
    b = client.post(f"/topics/{second}/events", json={"data": 1}, headers=headers)
    assert (a.status_code, b.status_code) == (201, 201)
    assert a.json() != b.json()


def test_idempotency_key_boundaries_are_accepted(client: httpx.Client) -> None:
    topic = new_topic()
    for key in ("x", "k" * 200, "".join(chr(c) for c in range(0x21, 0x7F))):
        response = client.post(
            f"/topics/{topic}/events", json={"data": key}, headers={"Idempotency-Key": key}
        )
        assert response.status_code == 201, (key, response.text)
    assert length(client, topic) == 3


def test_idempotency_holds_on_any_instance(
    client: httpx.Client, limits_broker: BrokerProcess
) -> None:
    """Another broker process on the same Redis answers the first one's key."""
    topic = new_topic()
    headers = {"Idempotency-Key": "cross-instance"}
    batch = [{"data": 1}, {"data": 2}]
    first = client.post(f"/topics/{topic}/events", json=batch, headers=headers)
    assert first.status_code == 201, first.text
    with httpx.Client(base_url=limits_broker.url, timeout=10) as second:
        repeat = second.post(f"/topics/{topic}/events", json=batch, headers=headers)
        assert repeat.status_code == 200, repeat.text
        assert repeat.json() == first.json()
        assert repeat.headers.get("idempotent-replayed") == "true"
        assert second.get(f"/topics/{topic}").json()["length"] == 2
    # ... and the other way round.
    with httpx.Client(base_url=limits_broker.url, timeout=10) as second:
        other_key = {"Idempotency-Key": "cross-instance-2"}
        on_second = second.post(f"/topics/{topic}/events", json={"data": 3}, headers=other_key)
        assert on_second.status_code == 201
    repeat = client.post(f"/topics/{topic}/events", json={"data": 3}, headers=other_key)
    assert repeat.status_code == 200 and repeat.json() == on_second.json()
    assert length(client, topic) == 3


# -- errors ----------------------------------------------------------------------------

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"

BAD_JSON_BODIES: list[tuple[str, bytes]] = [
    ("malformed", b'{"data": 1'),
    ("trailing-garbage", b'{"data": 1} x'),
    ("empty-body", b""),
    ("whitespace-body", b"  \n"),
    ("string-document", b'"data"'),
    ("number-document", b"42"),
    ("null-document", b"null"),
    ("true-document", b"true"),
    ("empty-array", b"[]"),
    ("array-of-non-objects", b"[1, 2]"),
    ("nested-array", b'[[{"data": 1}]]'),
    ("missing-data", b'{"event": "x"}'),
    ("empty-object", b"{}"),
    ("unknown-member", b'{"data": 1, "id": "mine"}'),
    ("event-with-lf", b'{"data": 1, "event": "a\\nb"}'),
    ("event-with-cr", b'{"data": 1, "event": "a\\rb"}'),
    ("event-with-crlf", b'{"data": 1, "event": "a\\r\\nb"}'),
    ("event-with-nul", b'{"data": 1, "event": "a\\u0000b"}'),
    ("event-broker-gap", b'{"data": 1, "event": "broker.gap"}'),
    ("event-broker-prefix", b'{"data": 1, "event": "broker."}'),
    ("event-number", b'{"data": 1, "event": 5}'),
    ("event-object", b'{"data": 1, "event": {"a": 1}}'),
    ("event-bool", b'{"data": 1, "event": true}'),
    ("retry-negative", b'{"data": 1, "retry": -1}'),
    ("retry-float", b'{"data": 1, "retry": 1.5}'),
    ("retry-string", b'{"data": 1, "retry": "100"}'),
    ("retry-bool", b'{"data": 1, "retry": true}'),
    ("invalid-utf8-in-string", b'{"data": "\xff\xfe"}'),
    ("invalid-utf8-in-key", b'{"da\xc3ta": 1}'),
    # Deeper than the standard library writes (orjson reads 1024 levels): was a 500.
    ("nested-1000-deep", b'{"data": ' + b"[" * 1000 + b"1" + b"]" * 1000 + b"}"),
    ("nested-deep-long-number", b'{"data": ' + b"[" * 1000 + b"1" * 20 + b"]" * 1000 + b"}"),
]


@pytest.mark.parametrize(("name", "body"), BAD_JSON_BODIES, ids=[n for n, _ in BAD_JSON_BODIES])
def test_bad_json_publish_is_400_and_stores_nothing(
    client: httpx.Client, name: str, body: bytes
) -> None:
    topic = new_topic()
    response = client.post(f"/topics/{topic}/events", content=body, headers={"Content-Type": JSON})
    assert_problem(response, 400)
    assert_problem(client.get(f"/topics/{topic}"), 404)


BAD_BATCH_ITEMS: list[tuple[str, object]] = [
    ("not-an-object", 5),
    ("missing-data", {"event": "x"}),
    ("reserved-event", {"data": 1, "event": "broker.x"}),
    ("bad-retry", {"data": 1, "retry": -5}),
    ("unknown-member", {"data": 1, "extra": True}),
]


@pytest.mark.parametrize(("name", "item"), BAD_BATCH_ITEMS, ids=[n for n, _ in BAD_BATCH_ITEMS])
def test_a_batch_with_one_bad_event_stores_none_of_it(
    client: httpx.Client, name: str, item: object
) -> None:
    topic = new_topic()
    assert client.post(f"/topics/{topic}/events", json={"data": "seed"}).status_code == 201
    batch = [{"data": 1}, {"data": 2}, item, {"data": 4}]
    assert_problem(client.post(f"/topics/{topic}/events", json=batch), 400)
    assert length(client, topic) == 1


@pytest.mark.parametrize(
    ("name", "body", "event"),
    [
        ("invalid-utf8", b"caf\xe9", None),
        ("truncated-utf8", b"\xe2\x9c", None),
        ("event-with-lf", b"x", "a\nb"),
        ("event-with-cr", b"x", "a\rb"),
        ("event-with-nul", b"x", "a\x00b"),
        ("event-broker-prefix", b"x", "broker.gap"),
    ],
)
def test_bad_text_publish_is_400_and_stores_nothing(
    client: httpx.Client, name: str, body: bytes, event: str | None
) -> None:
    topic = new_topic()
    params = {"event": event} if event is not None else None
    response = client.post(
        f"/topics/{topic}/events", content=body, params=params, headers={"Content-Type": TEXT}
    )
    assert_problem(response, 400)
    assert_problem(client.get(f"/topics/{topic}"), 404)


BAD_TOPICS = [
    ("too-long", "t" * 201),
    ("space", "a%20b"),
    ("encoded-slash", "a%2Fb"),
    ("unicode", "caf%C3%A9"),
    ("brace", "%7Btopic%7D"),
    ("star", "a*"),
    ("percent", "a%25b"),
    ("comma", "a,b"),
    ("tilde", "a~b"),
]


@pytest.mark.parametrize(("name", "path_topic"), BAD_TOPICS, ids=[n for n, _ in BAD_TOPICS])
def test_a_bad_topic_name_is_400_everywhere(
    client: httpx.Client, name: str, path_topic: str
) -> None:
    url = client.base_url.join(f"/topics/{path_topic}/events")
    assert_problem(client.post(str(url), json={"data": 1}), 400)
    assert_problem(client.get(str(url), headers={"Accept": "application/json"}), 400)  # history
    assert_problem(client.get(str(url), headers={"Accept": "text/event-stream"}), 400)
    assert_problem(client.get(str(client.base_url.join(f"/topics/{path_topic}"))), 400)
    assert_problem(client.delete(str(client.base_url.join(f"/topics/{path_topic}"))), 400)


@pytest.mark.parametrize(
    "number", ["123456789012345678901234567890", "18446744073709551616", "-9223372036854775809"]
)
def test_an_integer_past_64_bits_is_kept_as_written(client: httpx.Client, number: str) -> None:
    """The JSON parser turned one into a float silently (2**64 -> 1.8446744073709552e+19)."""
    topic = new_topic()
    event = b'{"data": {"n": %s, "s": "\xc3\xa9"}}' % number.encode()
    for content_type in ("application/json", "application/x-ndjson"):
        response = client.post(
            f"/topics/{topic}/events", content=event, headers={"Content-Type": content_type}
        )
        assert response.status_code == 201, response.text
    history = client.get(f"/topics/{topic}/events", headers={"Accept": "application/json"})
    assert [e["data"] for e in history.json()["events"]] == [{"n": int(number), "s": "\u00e9"}] * 2
    assert history.text.count(number) == 2


def test_the_longest_topic_name_and_every_allowed_character(client: httpx.Client) -> None:
    for topic in ("T" * 200, "Az09_.:-" + new_topic()):
        response = client.post(f"/topics/{topic}/events", json={"data": 1})
        assert response.status_code == 201, (topic, response.text)
        assert client.get(f"/topics/{topic}").json()["topic"] == topic


def test_an_empty_topic_name_is_400(client: httpx.Client) -> None:
    assert_problem(client.post("/topics//events", json={"data": 1}), 400)
    assert_problem(client.get("/topics//events", headers={"Accept": "text/event-stream"}), 400)
    assert_problem(client.post("/topics//close"), 400)


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("POST", "/topics/t", 405, "GET, HEAD, DELETE"),
        ("PATCH", "/topics/t", 405, "GET, HEAD, DELETE"),
        ("DELETE", "/topics/t/events", 405, "GET, HEAD, POST"),
        ("PUT", "/topics/t/events", 405, "GET, HEAD, POST"),
        ("GET", "/topics/t/close", 405, "POST"),
        ("DELETE", "/topics/t/close", 405, "POST"),
        ("GET", "/topics/t/other", 404, None),
        ("PUT", "/topics/t/other", 404, None),
        ("DELETE", "/topics/t/a/b", 404, None),
    ],
)
def test_other_paths_under_topics_are_404_or_405(
    client: httpx.Client, method: str, path: str, status: int, allow: str | None
) -> None:
    response = client.request(method, path)
    assert response.status_code == status, response.text
    assert response.headers.get("allow") == allow


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("too-long", b"k" * 201),
        ("non-ascii", "clé".encode()),
        ("tab", b"a\tb"),
        ("empty", b""),
    ],
)
def test_a_bad_idempotency_key_is_400_and_stores_nothing(
    client: httpx.Client, name: str, key: bytes
) -> None:
    topic = new_topic()
    response = client.post(
        f"/topics/{topic}/events", json={"data": 1}, headers={"Idempotency-Key": key}
    )
    assert_problem(response, 400)
    assert_problem(client.get(f"/topics/{topic}"), 404)


@pytest.mark.parametrize("control", [b"\x01", b"\x1b", b"\x7f"])
async def test_an_idempotency_key_with_control_characters_is_400(
    http_broker: BrokerProcess, control: bytes
) -> None:
    """h11 will not send these, so the request is written by hand."""
    topic = new_topic()
    body = b'{"data": 1}'
    head = (
        (
            f"POST /topics/{topic}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
        ).encode()
        + b"Idempotency-Key: a"
        + control
        + b"b\r\n\r\n"
        + body
    )
    response = await raw_request(http_broker.url, raw_head=head)
    try:
        data = await response.read_sized_body()
    finally:
        await response.close()
    # uvicorn's HTTP parser refuses such a header before the app sees it, with a plain-text
    # 400: the status is the contract's; the body is the server's (noted in the report).
    assert response.status == 400, (response.status, data)
    with httpx.Client(base_url=http_broker.url) as check:
        assert_problem(check.get(f"/topics/{topic}"), 404)


UNSUPPORTED = [
    ("xml", "application/xml", b"<data>1</data>"),
    ("form", "application/x-www-form-urlencoded", b"data=1"),
    ("multipart", "multipart/form-data; boundary=x", b"--x\r\n\r\n1\r\n--x--\r\n"),
    ("html", "text/html", b"<p>1</p>"),
    ("latin-1-text", "text/plain; charset=latin-1", b"caf\xe9"),
    ("iso-8859-1-text", "text/plain; charset=ISO-8859-1", b"x"),
    ("latin-1-json", "application/json; charset=latin-1", b'{"data": 1}'),
    ("octet-stream", "application/octet-stream", b"\x00\x01"),
    ("event-stream", "text/event-stream", b"data: 1\n\n"),
]


@pytest.mark.parametrize(
    ("name", "content_type", "body"), UNSUPPORTED, ids=[n for n, _, _ in UNSUPPORTED]
)
def test_another_content_type_is_415_and_stores_nothing(
    client: httpx.Client, name: str, content_type: str, body: bytes
) -> None:
    topic = new_topic()
    response = client.post(
        f"/topics/{topic}/events", content=body, headers={"Content-Type": content_type}
    )
    assert_problem(response, 415)
    assert_problem(client.get(f"/topics/{topic}"), 404)


def test_a_missing_content_type_is_415(client: httpx.Client) -> None:
    topic = new_topic()
    response = client.post(f"/topics/{topic}/events", content=b'{"data": 1}')
    assert "content-type" not in response.request.headers
    assert_problem(response, 415)
    assert_problem(client.get(f"/topics/{topic}"), 404)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/topics/{t}/events"),
        ("DELETE", "/topics/{t}/events"),
        ("PATCH", "/topics/{t}/events"),
        ("POST", "/topics/{t}"),
        ("PUT", "/topics/{t}"),
        ("GET", "/topics/{t}/close"),
        ("POST", "/topics"),
        ("POST", "/events"),
        ("POST", "/healthz"),
        ("PUT", "/readyz"),
        ("POST", "/metrics"),
    ],
)
def test_an_unsupported_method_is_405_problem(client: httpx.Client, method: str, path: str) -> None:
    topic = new_topic()
    response = client.request(method, path.format(t=topic), json={"data": 1})
    assert_problem(response, 405)
    assert response.headers.get("allow"), "a 405 names the allowed methods (RFC 9110)"
    assert_problem(client.get(f"/topics/{topic}"), 404)


@pytest.mark.parametrize(
    "path", ["/nope", "/topic", "/topics/x/events/extra", "/topics/x/event", "/event"]
)
def test_an_unknown_route_is_404_problem(client: httpx.Client, path: str) -> None:
    assert_problem(client.get(path), 404)
    assert_problem(client.post(path, json={"data": 1}), 404)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/metrics%0A"),
        ("GET", "/%6detrics%0a"),
        ("GET", "/healthz%0A"),
        ("GET", "/topics%0A"),
        ("GET", "/openapi.json%0A"),
        ("GET", "/topics/{t}/events%0A"),
        ("POST", "/topics/{t}/events%0A"),
        ("POST", "/topics/{t}/close%0A"),
    ],
)
async def test_a_path_ending_in_a_line_feed_names_no_route(
    http_broker: BrokerProcess, method: str, path: str
) -> None:
    """A route's pattern ended in ``$``, which also matches before a final line feed:
    ``/metrics%0A`` was served as ``/metrics``, past the shipped nginx and HAProxy,
    which answer ``/metrics`` 404 (the README keeps it off the public edge), and
    ``POST /topics/t/close%0A`` closed ``t`` past any proxy rule on that path."""
    topic, body = new_topic(), b'{"data": 1}'
    head = (
        f"{method} {path.format(t=topic)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    response = await raw_request(
        http_broker.url, raw_head=head + (body if method == "POST" else b"")
    )
    try:
        answered = await response.read_sized_body()
    finally:
        await response.close()
    assert response.status == 404, (response.status, answered[:200])
    with httpx.Client(base_url=http_broker.url) as check:
        assert_problem(check.get(f"/topics/{topic}"), 404)  # nothing stored, nothing closed


async def test_a_content_length_with_spaces_around_it_is_read(http_broker: BrokerProcess) -> None:
    """HTTP allows spaces around a field's value; the length was refused as "not a number"."""
    topic, body = new_topic(), b'{"data": 1}'
    head = (
        f"POST /topics/{topic}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)} \r\n\r\n"
    ).encode()
    response = await raw_request(http_broker.url, raw_head=head + body)
    await response.close()
    assert response.status == 201, response.status


@pytest.mark.parametrize("content_type", ["application/json", "application/x-ndjson"])
@pytest.mark.parametrize("codings", ["gzip, chunked", "gzip\r\nTransfer-Encoding: chunked"])
async def test_a_transfer_coding_other_than_chunked_is_501(
    http_broker: BrokerProcess, content_type: str, codings: str
) -> None:
    """uvicorn undoes the chunking only: a gzip body under it was taken for the body
    itself (an ingest of gzip bytes answered 201 with no ids); on one line or two."""
    topic, data = new_topic(), gzip.compress(b'{"data": 1}\n')
    head = (
        f"POST /topics/{topic}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: {content_type}\r\nTransfer-Encoding: {codings}\r\n\r\n"
    ).encode()
    chunked = b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data)
    response = await raw_request(http_broker.url, raw_head=head + chunked)
    await response.close()
    assert response.status == 501, response.status


# -- inputs an audit found answered wrongly (each was a 500, a 503, a silent change, or
# -- a body read whole) --------------------------------------------------------------------


async def test_an_idempotency_key_with_a_trailing_space_is_the_same_key(
    http_broker: BrokerProcess,
) -> None:
    """HTTP drops the spaces around a header value; the parser kept those at its end:
    a retry whose key differed by one was stored twice."""
    topic = new_topic()
    statuses = []
    for key in ("k9 ", "k9", "k9\t"):
        response = await raw_request(
            f"{http_broker.url}/topics/{topic}/events",
            "POST",
            {"Content-Type": JSON, "Idempotency-Key": key, "Content-Length": "11"},
            b'{"data": 1}',
        )
        statuses.append(response.status)
        await response.close()
    assert statuses == [201, 200, 200]


@pytest.mark.parametrize("path", ["/topics/{topic}/events", "/topics"])
@pytest.mark.parametrize("limit", ["%C2%B2", "%D9%A3", "1e3"])
def test_a_limit_not_in_ascii_digits_is_400(client: httpx.Client, path: str, limit: str) -> None:
    """``str.isdigit`` took "²" (then ``int`` raised: a 500) and "٣" (read as 3)."""
    topic = new_topic()
    client.post(f"/topics/{topic}/events", json={"data": 1})
    target = path.format(topic=topic) + f"?limit={limit}"
    assert_problem(client.get(target, headers={"Accept": "application/json"}), 400)


@pytest.mark.parametrize("cursor", ["0:18446744073709551616", "0:%D9%A3"])
def test_a_listing_cursor_redis_would_refuse_is_400(client: httpx.Client, cursor: str) -> None:
    """Past 2**64 - 1 Redis refuses the SCAN cursor: the broker answered 503 with
    Retry-After, and a client retried it for good."""
    assert_problem(client.get(f"/topics?cursor={cursor}"), 400)


async def test_closing_with_a_body_is_refused_before_the_body_is_read(
    http_broker: BrokerProcess,
) -> None:
    """It was read whole, whatever its size (3 MB here), and only then refused."""
    topic = new_topic()
    response = await raw_request(
        f"{http_broker.url}/topics/{topic}/close",
        "POST",
        {"Content-Type": JSON, "Content-Length": str(3 * 1024 * 1024)},
        b"{" * 1000,  # the rest never comes
    )
    try:
        assert response.status == 400
    finally:
        await response.close()
    assert_problem(httpx.get(f"{http_broker.url}/topics/{topic}"), 404)


def test_an_ingest_in_another_charset_is_415_before_any_line(client: httpx.Client) -> None:
    """The charset of an ingest was not looked at: line 1 was stored, line 2 (not
    UTF-8) refused, and the resend stored line 1 again."""
    topic = new_topic()
    body = b'{"data": "ascii"}\n{"data": "caf\xe9"}\n'
    for _ in range(2):
        response = client.post(
            f"/topics/{topic}/events",
            content=body,
            headers={"Content-Type": "application/x-ndjson; charset=iso-8859-1"},
        )
        assert_problem(response, 415)
    assert_problem(client.get(f"/topics/{topic}"), 404)


@pytest.mark.parametrize(
    "query",
    ["event=%FF", "event=", "event=a&event=b", "close=true&clos%65=false", "close="],
)
def test_a_bad_query_parameter_of_a_publish_is_400(client: httpx.Client, query: str) -> None:
    """``?event=%FF`` was stored as U+FFFD, an empty event as none, a repeated one as its
    last, a percent-encoded ``close`` was ignored."""
    topic = new_topic()
    response = client.post(
        f"/topics/{topic}/events?{query}", content=b"x", headers={"Content-Type": TEXT}
    )
    assert_problem(response, 400)
    assert_problem(client.get(f"/topics/{topic}"), 404)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (JSON, b'{"data": 1}'),
        (JSON, b'[{"data": 1}, {"data": 2}]'),
        ("application/x-ndjson", b'{"data": 1}\n'),
    ],
    ids=["json", "batch", "ndjson"],
)
def test_an_event_parameter_beside_a_json_body_is_400_and_stores_nothing(
    client: httpx.Client, content_type: str, body: bytes
) -> None:
    """``?event=`` names the type of a text/plain publish; beside JSON (or NDJSON) it
    was dropped in silence, and the event stored with no type at all."""
    for _ in range(2):  # a connection's first request is served lean, the next by the app
        topic = new_topic()
        response = client.post(
            f"/topics/{topic}/events?event=created",
            content=body,
            headers={"Content-Type": content_type},
        )
        assert_problem(response, 400)
        assert_problem(client.get(f"/topics/{topic}"), 404)


@pytest.mark.parametrize(("depth", "status"), [(254, 201), (255, 400)])
@pytest.mark.parametrize("number", ["1", "1" * 20])
def test_data_nests_254_levels_deep_at_most(
    client: httpx.Client, depth: int, status: int, number: str
) -> None:
    """A set limit, the same on both paths: past orjson's 254 levels the standard
    library's recursion limit decided, and it counts the caller's frames too."""
    body = b'{"data": ' + b"[" * depth + number.encode() + b"]" * depth + b"}"
    for _ in range(2):  # a connection's first request is served lean, the next by the app
        response = client.post(
            f"/topics/{new_topic()}/events", content=body, headers={"Content-Type": JSON}
        )
        assert response.status_code == status, response.text


def test_other_query_parameters_are_not_read(client: httpx.Client) -> None:
    """Only the publish's own parameters are decoded: a review found a tracking
    parameter not in UTF-8 (?x=%FF) refused the publish."""
    topic = new_topic()
    response = client.post(f"/topics/{topic}/events?x=%FF&utm=a&utm=b", json={"data": 1})
    assert response.status_code == 201, response.text


def test_a_percent_encoded_close_closes(client: httpx.Client) -> None:
    topic = new_topic()
    response = client.post(f"/topics/{topic}/events?clos%65=true", json={"data": 1})
    assert response.status_code == 201 and "end_id" in response.json(), response.text


@pytest.mark.parametrize("path", ["/topics/{topic}/events", "/events?topic={topic}"])
def test_a_head_of_a_stream_answers_its_head_and_ends(client: httpx.Client, path: str) -> None:
    """HEAD of /events opened a subscription whose answer never ended; HEAD of a topic's
    stream answered a history page's head (application/json)."""
    topic = new_topic()
    response = client.head(path.format(topic=topic), timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.content == b""
    bad = client.head(path.format(topic="a%2Fb"), timeout=5)
    assert bad.status_code == 400
    client.post(f"/topics/{topic}/close")
    assert client.head(path.format(topic=topic), timeout=5).status_code == 204  # as GET


def test_a_listing_cursor_naming_the_topics_shown_of_a_split_scan_step_is_taken(
    client: httpx.Client,
) -> None:
    """A SCAN step split across pages has the cursor name every topic its pages showed
    (comma-separated): a page of one topic that ended inside a step is followed by the
    next. The names are left out of that step; a listing from there ends."""
    prefix = new_topic()
    for n in range(3):
        client.post(f"/topics/{prefix}-{n}/events", json={"data": n})
    cursor: str | None = f"0:0:{prefix}-0,{prefix}-1"
    seen: list[str] = []
    for _ in range(100):
        response = client.get("/topics", params={"prefix": prefix, "limit": 1, "cursor": cursor})
        assert response.status_code == 200, response.text
        seen += [topic["topic"] for topic in response.json()["topics"]]
        cursor = response.json()["next"]
        if cursor is None:
            break
    assert cursor is None
    assert f"{prefix}-2" in seen
