"""The app's CORS wrapper of ``send``: headers added once, never beside the response's own."""

from __future__ import annotations

from typing import Any

from api.cors import adding_headers

CORS = [(b"access-control-allow-origin", b"https://app.test"), (b"vary", b"Origin")]


async def test_headers_the_response_already_has_are_not_added_again() -> None:
    """A come-back answer carries its own CORS headers (the lean path writes it too);
    through the app a second Access-Control-Allow-Origin made browsers refuse it."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    own = [(b"content-type", b"text/event-stream"), (b"Access-Control-Allow-Origin", b"x")]
    await adding_headers(CORS, send)({"type": "http.response.start", "headers": own})
    await adding_headers(CORS, send)({"type": "http.response.start", "headers": []})
    await adding_headers(CORS, send)({"type": "http.response.body", "body": b""})
    assert sent[0]["headers"] == [*own, (b"vary", b"Origin")]
    assert sent[1]["headers"] == CORS
    assert sent[2] == {"type": "http.response.body", "body": b""}
