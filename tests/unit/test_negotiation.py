from __future__ import annotations

import pytest

from api.negotiation import media_type_of, prefers_json


@pytest.mark.parametrize(
    ("accept", "json"),
    [
        ("", False),
        ("*/*", False),
        ("text/event-stream", False),
        ("application/json", True),
        ("application/json, text/event-stream", False),
        ("text/event-stream;q=0.5, application/json", True),
        ("application/*", True),
        ("application/json;q=0", False),
        ("application/json;q=oops", False),
        ("text/html, */*;q=0.8", False),
    ],
)
def test_prefers_json(accept: str, json: bool) -> None:
    assert prefers_json(accept) is json


def test_media_type_and_charset() -> None:
    assert media_type_of("Text/Plain; charset=UTF-8") == ("text/plain", "utf-8")
    assert media_type_of("application/json") == ("application/json", None)
    assert media_type_of('text/plain; charset="latin-1"') == ("text/plain", "latin-1")
