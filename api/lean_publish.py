"""Single publishes served on the connection, without uvicorn's request cycle.

A publish is the hottest short request, and most of its server CPU went to
uvicorn's request/response cycle (the ASGI task, the cycle's events, the
proxy-headers middleware), not to Redis. So ``api.connections`` serves a
plain publish itself (HTTP/1.1, a Content-Length, JSON or text, not
``application/x-ndjson``: a streaming ingest stays on the ASGI route) with the
functions of ``api.publish``, so that both routes accept, refuse and answer
alike. This module decides which publishes those are, runs one, and writes
its answer as uvicorn would (same headers, same order).

Errors: whatever fails before the store (a bad body, 401, 415, ...) is
``NotValidated``: the connection hands the whole request to uvicorn, and the
app answers it, one place for statuses. Once the append is sent it is never
handed over (that would append twice): store errors are answered here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools
from starlette.responses import Response
from uvicorn.server import ServerState

from api import routes
from api.auth import authorize
from api.cors import cors_headers
from api.heads import RequestHead, parse_head
from api.negotiation import media_type_of
from api.publish import _close_requested, answer, parse_events
from api.settings import Settings
from broker import Broker, StoreUnavailable
from broker.validation import check_idempotency_key, check_topic

log = logging.getLogger(__name__)

LEAN_MEDIA_TYPES = ("application/json", "text/plain")
"""Bodies parsed whole; ``application/x-ndjson`` is a streaming ingest (the ASGI route)."""
CLOSE = (b"connection", b"close")


class NotValidated(Exception):
    """The publish failed before anything reached the store: uvicorn may answer it."""


@dataclass(slots=True)
class PublishHead:
    """A plain publish's head: what serving it needs besides its body."""

    scope: dict[str, Any]
    body_size: int
    content_type: bytes
    keep_alive: bool


def publish_head_of(
    head: RequestHead, parser: httptools.HttpRequestParser, app: Any
) -> PublishHead | None:
    """The head of a publish served lean, or None for uvicorn to serve."""
    if parser.get_method() != b"POST" or parser.get_http_version() != "1.1":
        return None
    try:
        url = httptools.parse_url(head.url)
        path = unquote(url.path.decode("ascii"))
    except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
        return None
    match = routes.TOPIC_EVENTS_PATH.fullmatch(path)
    framing = _framing_of(head.headers)
    if match is None or framing is None:
        return None
    size, content_type = framing
    settings: Settings = app.state.settings
    media_type = media_type_of(content_type.decode("latin-1"))[0]
    if size > settings.max_body_bytes or media_type not in LEAN_MEDIA_TYPES:
        return None  # the app refuses these before the body (413, 415) or streams it
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": url.path,
        "query_string": url.query or b"",
        "root_path": "",
        "headers": head.headers,
        "app": app,
        "path_params": {"topic": match.group(1)},
    }
    return PublishHead(scope, size, content_type, parser.should_keep_alive())


def _framing_of(headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes] | None:
    """The body's size and content type, if it is framed plainly: one Content-Length,
    no Transfer-Encoding, no ``Expect: 100-continue`` (uvicorn answers that)."""
    size: bytes | None = None
    content_type = b""
    for name, value in headers:
        if name == b"content-length":
            if size is not None:
                return None
            size = value
        elif name == b"content-type":
            content_type = value
        elif name in (b"transfer-encoding", b"expect"):
            return None
    if size is None or not size.isdigit():
        return None
    return int(size), content_type


def publish_request(data: bytes, app: Any) -> PublishHead | None:
    """``publish_head_of`` the head at the start of ``data`` (for tests)."""
    parsed = parse_head(data)
    return None if parsed is None else publish_head_of(*parsed, app)


async def publish(request: PublishHead, body: bytes) -> tuple[int, list[Any], bytes]:
    """Validate as ``api.publish`` does (else ``NotValidated``), append, and answer:
    status, headers (but content-length and CORS) and body."""
    scope = request.scope
    state = scope["app"].state
    settings: Settings = state.settings
    try:
        topic = check_topic(scope["path_params"]["topic"])
        await authorize(scope, "publish", [topic])
        key = _idempotency_key(scope["headers"])
        check_idempotency_key(key)
        close = _close_requested(scope)
        headers = {b"content-type": request.content_type}
        events, is_batch = parse_events(scope, headers, body, settings)
    except Exception as error:
        raise NotValidated from error
    broker: Broker = state.broker
    try:
        async with asyncio.timeout(settings.publish_timeout_seconds):
            result = await broker.publish(topic, events, idempotency_key=key, close=close)
    except TimeoutError as error:
        raise StoreUnavailable("the store did not confirm the write in time") from error
    return answer(result, is_batch)


def _idempotency_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"idempotency-key":
            return value.decode("latin-1")
    return None


def response_bytes(
    request: PublishHead,
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    server_state: ServerState,
) -> bytes:
    """The answer as uvicorn writes the ASGI route's: its date and server headers, the
    route's, content-length, CORS, and ``connection: close`` unless kept alive."""
    headers = [*headers, (b"content-length", b"%d" % len(body))]
    return _answer_bytes(request, status, headers, body, server_state)


def problem_bytes(request: PublishHead, response: Response, server_state: ServerState) -> bytes:
    """A problem (the app's own response) as the ASGI route writes it."""
    return _answer_bytes(
        request, response.status_code, response.raw_headers, bytes(response.body), server_state
    )


def _answer_bytes(
    request: PublishHead,
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    server_state: ServerState,
) -> bytes:
    lines = [_STATUS_LINES[status]]
    lines += [name + b": " + value for name, value in server_state.default_headers]
    lines += [name + b": " + value for name, value in headers]
    lines += [name + b": " + value for name, value in cors_headers(request.scope)]
    if not request.keep_alive:
        lines.append(b"connection: close")
    return b"\r\n".join([*lines, b"", body])


def with_cors(request: PublishHead, response: Response) -> Response:
    """``response`` with the CORS headers the ASGI route adds to every answer."""
    response.raw_headers.extend(cors_headers(request.scope))
    return response


_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s" % (s.value, s.phrase.encode()) for s in HTTPStatus}
