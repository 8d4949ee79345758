"""History pages (``Accept: application/json``) and ``GET /topics/{topic}``."""

from __future__ import annotations

import httpx
import pytest

from tests.http.helpers import assert_problem, new_topic

JSON = {"Accept": "application/json"}


def page(client: httpx.Client, topic: str, **params: object) -> dict[str, object]:
    response = client.get(f"/topics/{topic}/events", params=params, headers=JSON)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"events", "next"}
    return body  # type: ignore[no-any-return]


def publish(client: httpx.Client, topic: str, count: int) -> list[str]:
    response = client.post(
        f"/topics/{topic}/events", json=[{"data": n, "event": "n"} for n in range(count)]
    )
    assert response.status_code == 201, response.text
    return response.json()["ids"]  # type: ignore[no-any-return]


def test_paging_with_after_limit_and_next(client: httpx.Client) -> None:
    topic = new_topic()
    ids = publish(client, topic, 5)
    first = page(client, topic, limit=2)
    assert first["events"] == [
        {"id": ids[0], "event": "n", "data": 0},
        {"id": ids[1], "event": "n", "data": 1},
    ]
    assert first["next"] == ids[1]
    second = page(client, topic, after=first["next"], limit=2)
    assert [e["id"] for e in second["events"]] == ids[2:4]  # type: ignore[union-attr]
    assert second["next"] == ids[3]
    last = page(client, topic, after=second["next"], limit=2)
    assert [e["id"] for e in last["events"]] == ids[4:]  # type: ignore[union-attr]
    assert last["next"] is None


def test_following_next_to_the_end_reaches_every_event_once(client: httpx.Client) -> None:
    topic = new_topic()
    ids = publish(client, topic, 9)
    seen: list[str] = []
    after: object = None
    for _ in range(10):  # bounded: 9 events in pages of 3 need at most 4 pages
        params: dict[str, object] = {"limit": 3}
        if after:
            params["after"] = after
        current = page(client, topic, **params)
        seen += [e["id"] for e in current["events"]]  # type: ignore[union-attr]
        after = current["next"]
        if after is None:
            break
    assert after is None
    assert seen == ids


def test_the_default_page_and_the_largest_limit(client: httpx.Client) -> None:
    topic = new_topic()
    ids = publish(client, topic, 3)
    assert [e["id"] for e in page(client, topic)["events"]] == ids  # type: ignore[union-attr]
    assert [e["id"] for e in page(client, topic, limit=1000)["events"]] == ids  # type: ignore[union-attr]
    assert page(client, topic, limit=1)["next"] == ids[0]


def test_text_events_come_back_as_strings_and_json_as_json(client: httpx.Client) -> None:
    topic = new_topic()
    client.post(
        f"/topics/{topic}/events",
        content=b"a\r\nb",
        params={"event": "txt"},
        headers={"Content-Type": "text/plain; charset=utf-8"},
    )
    client.post(f"/topics/{topic}/events", json={"data": {"k": [1]}})
    events = page(client, topic)["events"]
    assert [(e["event"], e["data"]) for e in events] == [  # type: ignore[union-attr]
        ("txt", "a\r\nb"),
        (None, {"k": [1]}),
    ]


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "abc", "1.5", ""])
def test_a_limit_out_of_range_is_400(client: httpx.Client, limit: str) -> None:
    topic = new_topic()
    publish(client, topic, 1)
    response = client.get(f"/topics/{topic}/events", params={"limit": limit}, headers=JSON)
    assert_problem(response, 400)


@pytest.mark.parametrize("after", ["garbage", "1-0", "abcdefgh.x-0", "abcdefgh.1-0 1"])
def test_a_bad_after_is_400(client: httpx.Client, after: str) -> None:
    topic = new_topic()
    publish(client, topic, 1)
    response = client.get(f"/topics/{topic}/events", params={"after": after}, headers=JSON)
    assert_problem(response, 400)


def test_topic_info(client: httpx.Client) -> None:
    topic = new_topic()
    ids = publish(client, topic, 3)
    response = client.get(f"/topics/{topic}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {
        "topic": topic,
        "length": 3,
        "first_id": ids[0],
        "last_id": ids[-1],
        "closed": False,
    }
    client.post(f"/topics/{topic}/close")
    assert client.get(f"/topics/{topic}").json()["closed"] is True


def test_topic_info_of_a_topic_that_never_had_an_event_is_404(client: httpx.Client) -> None:
    assert_problem(client.get(f"/topics/{new_topic()}"), 404)
    assert_problem(client.get("/topics/bad%20name"), 400)


def test_reads_of_topics_are_not_stored_by_caches(client: httpx.Client) -> None:
    """History, topic info and listings change with each event and, with authorization
    on, are the caller's own (by cookie, their URL is everyone's): no cache may keep
    them. The live page may not be framed by another site (it has a publish form)."""
    topic = new_topic()
    publish(client, topic, 1)
    for path, params in ((f"/topics/{topic}/events", {}), (f"/topics/{topic}", {}),
                         ("/topics", {"prefix": topic})):  # fmt: skip
        response = client.get(path, params=params, headers=JSON)
        assert response.status_code == 200, (path, response.text)
        assert response.headers["cache-control"] == "no-store", path
    page_response = client.get("/")
    assert page_response.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page_response.headers["content-security-policy"]
