"""The HTTP routes: each turns a request into one call on the core.

Every check on the request happens before the store is touched, so a bad
request stores nothing.

Who serves ``GET /topics/{t}/events`` and ``GET /events``: ``stream_topic``
decides, and every path asks it. A stream that is its connection's first
request is served by ``api.connections`` (lean); any other reaches
``BrokerApp.__call__``, which serves it before Starlette's middleware; the
router's ``topic_events`` sees only what is left, history pages (it asks
``stream_topic`` as well, should a stream ever reach it). All of them check a stream
request with ``stream_starts``, so they accept and refuse the same requests.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from api.auth import Authorizer, Grant, authorize
from api.cors import cors_headers
from api.negotiation import prefers_json
from api.problems import NOT_SNIFFED, Forbidden, KeysUnavailable, Unauthorized, problem_for
from api.settings import Settings
from api.sse import STREAM_HEADERS, EventStreamResponse, OpenStreams
from broker import (
    Broker,
    EventId,
    ForeignCursor,
    InvalidInput,
    StartFrom,
    StoreUnavailable,
    StreamOver,
    Subscription,
    TopicInfo,
    parse_last_event_id,
)
from broker import constants as c
from broker.framing import retry_hint
from broker.model import LogEntry
from broker.sink import StreamSink
from broker.store import Store
from broker.validation import check_topic

HISTORY_DEFAULT_LIMIT = 100
HISTORY_MAX_LIMIT = 1000
TOPIC_EVENTS_PATH = re.compile(r"/topics/([^/]+)/events")


NOT_STORED = {"Cache-Control": "no-store"}
"""A read of topics (history, topic info, listing): it changes with each event, and with
authorization on it is the caller's own (by cookie its URL is everyone's): a cache
between must keep none of it."""


def json_response(
    content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(content),
        status_code=status,
        media_type="application/json",
        headers=NOT_SNIFFED | headers if headers else NOT_SNIFFED,
    )


def _broker(request: Request) -> Broker:
    return request.app.state.broker  # type: ignore[no-any-return]


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _authorizer(request: Request) -> Authorizer:
    return request.app.state.authorizer  # type: ignore[no-any-return]


# -- subscribe and history ------------------------------------------------------


async def topic_events(request: Request) -> Response | EventStreamResponse:
    """A subscription (text/event-stream), or a page of history when JSON is preferred."""
    if request.method == "HEAD" and not _prefers_json(request):
        return await _head_of_stream(request, request.path_params["topic"])
    if stream_topic(request.scope) is None:
        return await history(request)
    return await open_stream(request, request.path_params["topic"])


async def multi_topic_events(request: Request) -> Response | EventStreamResponse:
    """One stream over several topics: ``/events?topic=a&topic=b``."""
    if request.method == "HEAD":
        return await _head_of_stream(request, None)
    return await open_stream(request, None)


async def _head_of_stream(request: Request, topic: str | None) -> Response:
    """HEAD of a stream: the head its GET would answer (a refusal, a 204 at the end of
    a closed topic, or a stream's), its subscription opened and closed at once (it was
    left open, and the answer never ended)."""
    await _authorizer(request).prepare(request.scope)
    headers: list[tuple[bytes, bytes]] = request.app.state.stream_headers
    head = Response(
        status_code=200, headers={name.decode(): value.decode() for name, value in headers}
    )
    try:
        starts = stream_starts(request, topic)
    except KeysUnavailable:
        return head  # (GET: a stream holding only a retry hint)
    streams: OpenStreams = request.app.state.streams
    if streams.draining:
        return head  # (as above)
    try:
        subscription = await _broker(request).subscribe(starts)
    except StoreUnavailable:
        return head  # (as above)
    except StreamOver as over:
        return problem_for(over)
    subscription.close()
    return head


def _prefers_json(request: Request) -> bool:
    return prefers_json(request.headers.get("accept", ""))


async def open_stream(request: Request, topic: str | None) -> Response | EventStreamResponse:
    """A stream of one topic, or (``topic`` None) of the ``?topic=`` list."""
    await _authorizer(request).prepare(request.scope)  # (a JWKS fetch, if one is due)
    retry_ms = _settings(request).retry_ms
    try:
        starts = stream_starts(request, topic)
    except KeysUnavailable as error:  # (a 401 would stop the EventSource for good)
        return come_back_later(retry_ms, error.detail, request.scope)
    streams: OpenStreams = request.app.state.streams
    if streams.draining:
        return come_back_later(retry_ms, "this instance is shutting down", request.scope)
    response = EventStreamResponse(streams, retry_ms, request.app.state.stream_headers)
    try:
        subscription = await subscribe(request, starts, response)
    except StoreUnavailable:
        return come_back_later(retry_ms, "store unavailable", request.scope)
    except StreamOver as over:
        return problem_for(over)  # 204: the EventSource stops reconnecting
    return response.attach(subscription)


def stream_starts(request: Request, topic: str | None) -> dict[str, StartFrom]:
    """Where each topic of a stream request starts; raises on any bad input, and
    401/403 unless the request may subscribe to every topic (its grant is kept in
    ``request.state`` for ``subscribe``).

    Shared by both ways a stream is served (``api.connections`` and the ASGI app),
    so they accept and refuse exactly the same requests.
    """
    topics = [topic] if topic is not None else _listed_topics(request)
    for name in topics:
        check_topic(name)
    request.state.grant = _authorizer(request).check(request.scope, "subscribe", topics)
    request.state.positions = _wants_positions(request)
    request.state.beat_events = _wants_beat_events(request)
    return _starts(request, topics)


def _wants_positions(request: Request) -> bool:
    """``?positions=true``: where the stream stands goes as ``broker.position`` events,
    which a script can see (``/client.js`` keeps them across page reloads)."""
    asked = request.query_params.get("positions", "false")
    if asked not in ("true", "false"):
        raise InvalidInput("positions must be 'true' or 'false'", field="positions")
    return asked == "true"


def _wants_beat_events(request: Request) -> bool:
    """``?heartbeat=event``: the heartbeats go as ``broker.beat`` events, not comments.
    An EventSource hands a script no comment (nor the Broker-Heartbeat header), so a
    page could not tell a live idle stream from one that died without a FIN (a NAT
    mapping dropped, a laptop asleep): ``/client.js`` asks, and watches for them."""
    asked = request.query_params.get("heartbeat", "comment")
    if asked not in ("comment", "event"):
        raise InvalidInput("heartbeat must be 'comment' or 'event'", field="heartbeat")
    return asked == "event"


async def subscribe(
    request: Request, starts: dict[str, StartFrom], sink: StreamSink | None = None
) -> Subscription:
    """The subscription of a request ``stream_starts`` accepted: it ends when the
    request's token expires, or its key leaves the key set (the core's heartbeat clock
    ends it then)."""
    grant: Grant = request.state.grant
    return await _broker(request).subscribe(
        starts,
        sink=sink,
        expires_at=grant.expires_at,
        trusted=grant.trusted,
        positions=request.state.positions,
        beat_events=request.state.beat_events,
    )


def _listed_topics(request: Request) -> list[str]:
    topics = list(dict.fromkeys(request.query_params.getlist("topic")))
    if not topics:
        raise InvalidInput("name at least one topic: /events?topic=a&topic=b", field="topic")
    limit = _settings(request).max_topics_per_subscription
    if len(topics) > limit:
        raise InvalidInput(f"at most {limit} topics per subscription", field="topic")
    return topics


def stream_topic(scope: Scope) -> str | None:
    """The topic of a stream request, "" for ``/events``, None for anything else."""
    if scope["type"] != "http" or scope["method"] != "GET":
        return None
    path = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root + "/"):  # mounted under a path (a FastAPI app's Mount)
        path = path[len(root) :]
    if path == "/events":
        return ""
    match = TOPIC_EVENTS_PATH.fullmatch(path)
    if match is None:
        return None
    accept = next((v for k, v in scope["headers"] if k == b"accept"), b"")
    if prefers_json(accept.decode("latin-1")):
        return None  # a history page
    scope["path_params"] = {"topic": match.group(1)}
    return match.group(1)


def come_back_later(retry_ms: int, why: str, scope: Scope | None = None) -> Response:
    """A stream that ends at once, so the client reconnects in ``retry_ms``.

    Not a 503: an EventSource treats any non-200 answer as final and never
    reconnects, while a 200 stream that ends makes it come back (through the
    load balancer, to an instance that can serve it).
    """
    return Response(
        retry_hint(retry_ms) + f": {why}, reconnect shortly\n\n".encode(),
        media_type="text/event-stream",
        headers={
            k.decode(): v.decode()
            for k, v in [*STREAM_HEADERS[1:], *(cors_headers(scope) if scope else [])]
        }
        | {"Connection": "close"},
    )


def _starts(request: Request, topics: list[str]) -> dict[str, StartFrom]:
    """Where each topic starts: Last-Event-ID header, else ?last_event_id, else ?from, else now."""
    source = request.query_params.get("from", "now")
    if source not in ("now", "earliest"):
        raise InvalidInput("from must be 'earliest' (or 'now')", field="from")
    default: StartFrom = "earliest" if source == "earliest" else "now"
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if not raw:
        return dict.fromkeys(topics, default)
    cursor = parse_last_event_id(raw.strip())
    if isinstance(cursor, EventId):
        return dict.fromkeys(topics, cursor)
    # A composite cursor: topics it does not name (added to the URL since) start by default.
    if cursor.keys().isdisjoint(topics):
        # It names none of them: another stream's cursor. Each topic is told (an id of
        # another topic's log: ``unknown``), not started "from now" in silence.
        return dict.fromkeys(topics, ForeignCursor(next(iter(cursor.values()))))
    return {topic: cursor.get(topic, default) for topic in topics}


async def history(request: Request) -> Response:
    """``{"events": [...], "next": id|null}``: retained events after ``?after``."""
    topic = check_topic(request.path_params["topic"])
    await authorize(request.scope, "subscribe", [topic])
    raw_after = request.query_params.get("after")
    after = EventId.parse(raw_after) if raw_after else None
    limit = _history_limit(request.query_params.get("limit"))
    page = await _broker(request).history(topic, after, limit)
    content: dict[str, Any] = {
        "events": [_event_json(entry) for entry in page.events],
        "next": str(page.next) if page.next else None,
    }
    if page.gap is not None:
        content["gap"] = {
            "reason": page.gap.reason,
            "requested": str(page.gap.requested),
            "resumed_after": str(page.gap.resumed_after) if page.gap.resumed_after else None,
            "topic": topic,  # (as in the broker.gap event's data)
        }
    return json_response(content, headers=NOT_STORED)


def _history_limit(raw: str | None) -> int:
    return _bounded_limit(raw, HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT)


def _bounded_limit(raw: str | None, default: int, most: int) -> int:
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or not 1 <= int(raw) <= most:
        raise InvalidInput(f"limit must be an integer from 1 to {most}", field="limit")
    return int(raw)


def _event_json(entry: LogEntry) -> dict[str, Any]:
    data: Any = orjson.Fragment(entry.data) if entry.is_json else entry.data_text
    return {"id": str(entry.id), "event": entry.event_type, "data": data}


async def topic_info(request: Request) -> Response:
    """``{"topic", "length", "first_id", "last_id", "closed"}``; 404 if it has no log."""
    await authorize(request.scope, "subscribe", [check_topic(request.path_params["topic"])])
    info = await _broker(request).topic_info(request.path_params["topic"])
    return json_response(
        {
            "topic": info.topic,
            "length": info.length,
            "first_id": _id_or_none(info.first_id),
            "last_id": _id_or_none(info.last_id),
            "closed": info.closed,  # (as in the listing: a stream from now would be 204)
        },
        headers=NOT_STORED,
    )


def _topic_json(info: TopicInfo) -> dict[str, Any]:
    return {
        "topic": info.topic,
        "length": info.length,
        "last_id": _id_or_none(info.last_id),
        "closed": info.closed,
    }


def _id_or_none(event_id: EventId | None) -> str | None:
    return str(event_id) if event_id else None


LIST_DEFAULT_LIMIT = 100
LIST_MAX_LIMIT = 1000


async def list_topics(request: Request) -> Response:
    """``{"topics": [{"topic", "length", "last_id", "closed"}], "next"}``, by SCAN.

    ``?prefix=`` narrows by name, ``?limit=`` (1..1000) bounds a page (which may hold
    fewer, even none, and still have a ``next``: SCAN steps that matched little);
    ``?cursor=`` is the ``next`` of the page before.
    """
    prefix = request.query_params.get("prefix", "")
    if prefix:
        check_topic(prefix)
    limit = _bounded_limit(request.query_params.get("limit"), LIST_DEFAULT_LIMIT, LIST_MAX_LIMIT)
    cursor = request.query_params.get("cursor") or None
    if cursor is not None:
        parsed = _LIST_CURSOR.fullmatch(cursor)
        if parsed is None or int(parsed.group(1)) > _SCAN_CURSOR_MAX:
            raise InvalidInput("cursor must be the 'next' of a page before", field="cursor")
    await check_listing_caller(request)
    topics, following = await _broker(request).list_topics(
        prefix,
        cursor,
        limit,
        shown=lambda topic: may_subscribe(request, topic),
        patterns=_authorizer(request).subscribe_patterns(request.scope),
    )
    content = {"topics": [_topic_json(t) for t in topics], "next": following}
    return json_response(content, headers=NOT_STORED)


async def check_listing_caller(request: Request) -> None:
    """A listing needs no token, but refuses one that is invalid or expired (401)."""
    authorizer = _authorizer(request)
    await authorizer.prepare(request.scope)
    authorizer.check_given_token(request.scope)


def may_subscribe(request: Request, topic: str) -> bool:
    """Whether the caller may subscribe to the topic: the listing shows no other."""
    try:
        _authorizer(request).check(request.scope, "subscribe", [topic])
    except (Unauthorized, Forbidden):
        return False
    return True


_TOPIC = r"[A-Za-z0-9_.:-]{1,200}"
_LIST_CURSOR = re.compile(
    rf"[0-9]{{1,4}}:([0-9]{{1,20}})(?::{_TOPIC}(?:,{_TOPIC}){{0,{c.LIST_STEP_SHOWN_MAX - 1}}})?"
)
_DIGITS = re.compile(r"[0-9]{1,9}")  # (str.isdigit takes "²", which int() refuses: a 500)
_SCAN_CURSOR_MAX = 2**64 - 1  # (Redis refuses a larger one: a 503, retried for good)


async def close_topic(request: Request) -> Response:
    """Close the topic (its log ends with ``broker.end``): ``201 {"id"}``; 200 if it was."""
    topic = check_topic(request.path_params["topic"])
    await authorize(request.scope, "close", [topic])
    await _refuse_any_body(request, "closing takes an empty body")
    result = await _broker(request).close_topic(topic)
    status = 200 if result.replayed else 201
    return json_response({"id": str(result.end_id)}, status=status)


async def _refuse_any_body(request: Request, detail: str) -> None:
    """400 at the first byte of a body, none read beyond (it was read whole, whatever
    its size, before being refused)."""
    if request.headers.get("content-length", "0").strip() not in ("", "0"):
        raise InvalidInput(detail)
    async for chunk in request.stream():
        if chunk:
            raise InvalidInput(detail)


async def delete_topic(request: Request) -> Response:
    """Delete the topic now: 204; its streams get a ``deleted`` gap and end.

    Deleting takes the right to publish to the topic. It takes no body, as closing
    takes none: one declared is refused, before anything is deleted (the handler ran at
    the head: a body that never came whole, its client gone, still deleted the topic).
    """
    topic = check_topic(request.path_params["topic"])
    await authorize(request.scope, "delete", [topic])
    await _refuse_any_body(request, "deleting takes no body")
    await _broker(request).delete_topic(topic)
    return Response(status_code=204)


async def bad_topic(request: Request) -> Response:
    """Any other path under /topics/: a topic name with "/" in it (sent as %2F), or an
    empty one (``/topics//events``), is a 400; a topic's path with a method it does not
    have, a 405; anything else, a 404."""
    name = request.path_params["topic"]
    if b"%2f" in request.scope.get("raw_path", b"").lower() or name.startswith("/"):
        check_topic(name.removesuffix("/events"))  # raises InvalidTopic
    rest = name.partition("/")[2]
    allowed = {"": "GET, HEAD, DELETE", "events": "GET, HEAD, POST", "close": "POST"}.get(rest)
    if allowed is None:
        raise HTTPException(404)
    raise HTTPException(405, headers={"Allow": allowed})


# -- operations ------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    """200 while the process is up."""
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 while the instance takes new connections; 503 only while it drains.

    Never 503 because the store is down: every instance shares the store, so a load
    balancer would pull them all and answer 503 itself, which ends every browser's
    EventSource for good. The instance instead holds new streams (a retry hint)
    until the store is back. /readyz/store tells the store's health, for monitoring.
    """
    streams: OpenStreams = request.app.state.streams
    if streams.draining:
        return json_response({"status": "draining"}, 503, headers={"Retry-After": "1"})
    return json_response({"status": "ready", "store": store_kind(_broker(request).store)})


def store_kind(store: Store) -> str:
    """What kind of store, for anyone who asks: its URL's scheme (``redis``,
    ``rediss``, ``redis+sentinel``...) or ``embedded``. Not its description: that names
    the Redis host, port, database and TLS files, which these unauthenticated probes
    gave to anyone reaching the edge (security audit); the log has it at start."""
    description = store.description
    return description.split("://", 1)[0] if "://" in description else description.split()[0]


async def readyz_store(request: Request) -> Response:
    """200 when the store answers; else 503 (for monitoring, not for load balancers)."""
    broker = _broker(request)
    if not await broker.ready():
        return json_response({"status": "store unavailable"}, 503, headers={"Retry-After": "1"})
    return json_response({"status": "ready", "store": store_kind(broker.store)})
