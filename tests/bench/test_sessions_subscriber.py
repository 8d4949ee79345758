"""The bench's SSE client reads a stream as EventSource does."""

from __future__ import annotations

from bench.sse import SseEvent, _EventParser


def test_the_parser_keeps_the_id_of_an_event_without_data_as_eventsource_does() -> None:
    events: list[SseEvent] = []
    ids: list[str] = []
    parser = _EventParser(events.append, ids.append)
    parser.feed(b"retry: 2000\n\nid: a\n\n: beat\n\nevent: x\n\nid: b\ndata: 1\n\n")
    assert ids == ["a"]  # the id line alone; the comment after it moves nothing
    assert events == [SseEvent("b", None, "1")]  # a type with no data is no event
    assert parser.last_id == "b" and parser.retry_ms == 2000
