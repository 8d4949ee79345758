"""``POST /topics/{topic}/events``: the publish route, as a raw ASGI endpoint.

It is the hottest request route, so it skips Starlette's Request and Response
objects (measured: about a fifth of a single publish's server CPU) and reads
the few headers it needs straight from the ASGI scope. Errors still become
problem+json through ``api.problems``, the one place statuses are decided.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
from starlette.types import Receive, Scope, Send

from api.auth import Grant, authorize
from api.ingest import AsgiBody, Ingest, IngestBody
from api.negotiation import media_type_of
from api.problems import HttpProblem, Unauthorized, problem_for
from api.settings import Settings
from api.sse import OpenStreams
from broker import (
    AppendResult,
    Broker,
    BrokerError,
    InvalidInput,
    NewEvent,
    StoreUnavailable,
    TooLarge,
)
from broker.validation import (
    check_idempotency_key,
    check_topic,
    event_from_text,
    events_from_json,
    loads_exactly,
)

NDJSON = "application/x-ndjson"
JSON_HEADERS = [(b"content-type", b"application/json"), (b"x-content-type-options", b"nosniff")]
"""(Constant bytes: the lean paths write them as they are, no formatting per answer.)"""
REPLAYED_HEADERS = [*JSON_HEADERS, (b"idempotent-replayed", b"true")]


class PublishEndpoint:
    """Append one event (JSON object or text/plain) or a batch (JSON array) to a topic."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            status, headers, body = await self._publish(scope, receive)
        except (BrokerError, HttpProblem) as error:
            await problem_for(error)(scope, receive, send)
            return
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _publish(self, scope: Scope, receive: Receive) -> tuple[int, list[Any], bytes]:
        state = scope["app"].state
        settings: Settings = state.settings
        broker: Broker = state.broker
        topic = check_topic(scope["path_params"]["topic"])
        grant = await authorize(scope, "publish", [topic])  # before the body is read
        headers = dict(scope["headers"])
        codings = [value for name, value in scope["headers"] if name == b"transfer-encoding"]
        coding = b", ".join(codings) if codings else None
        if coding is not None and coding.strip().lower() != b"chunked":
            # uvicorn undoes the chunking only: a gzip (say) under it would be taken
            # for the body itself.
            detail = f"Transfer-Encoding {coding.decode('latin-1')!r}: only chunked is understood"
            raise HttpProblem(501, "Not implemented", detail)
        key = idempotency_key(scope["headers"])
        close = _close_requested(scope)
        media_type, charset = media_type_of(headers.get(b"content-type", b"").decode("latin-1"))
        if media_type == NDJSON:
            _check_charset(charset)  # (before any line: one was stored, then the next refused)
            refuse_event_parameter(scope)
            ingest = ingest_of(broker, settings, topic, key, grant, state.streams)
            return await run_ingest(ingest, AsgiBody(receive), close)
        body = await read_body(receive, headers.get(b"content-length"), settings.max_body_bytes)
        lapsed = grant.lapsed()
        if lapsed is not None:
            # A slow body outlived the token (the lean path checks once the body is in).
            raise Unauthorized(f"{lapsed} while the body came", token_given=True)
        events, is_batch = parse_events(scope, headers, body, settings)
        try:
            async with asyncio.timeout(settings.publish_timeout_seconds):
                result = await broker.publish(topic, events, idempotency_key=key, close=close)
        except TimeoutError as error:
            raise StoreUnavailable("the store did not confirm the write in time") from error
        return answer(result, is_batch)


def idempotency_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The request's Idempotency-Key: the first, if it has several (on every route);
    without the spaces around it (HTTP's, which the parser keeps at its end: "k " and
    "k" are one key, and a retry that differed by one was stored twice)."""
    for name, value in headers:
        if name == b"idempotency-key":
            return value.strip(b" \t").decode("latin-1")
    return None


def _close_requested(scope: Scope) -> bool:
    """``?close=true``: close the topic after this publish's events."""
    value = query_value(scope, "close")
    if value not in (None, "true", "false"):
        raise InvalidInput("close must be 'true' or 'false'", field="close")
    return value == "true"


def refuse_event_parameter(scope: Scope) -> None:
    """``?event=`` names the type of a text/plain publish only: a JSON or NDJSON event
    carries its own ``event`` member, and a type given beside one was dropped in
    silence (the event stored with no type)."""
    if query_value(scope, "event") is not None:
        detail = "?event= is for a text/plain publish: put the type in each event's 'event'"
        raise InvalidInput(detail, field="event")


def query_value(scope: Scope, name: str) -> str | None:
    """The query parameter ``name`` (None if absent), its name compared decoded
    (``clos%65`` is ``close``); 400 if it is given twice or is not UTF-8 (an ``event``
    of ``%FF`` was stored as U+FFFD)."""
    query = scope.get("query_string", b"")
    if not query:  # (most publishes: asked twice each, for ``close`` and ``event``)
        return None
    wanted = name.encode()
    # Neither its name nor a %-escape (which may spell it) in the query: not given.
    # (``find``, not ``in``: see api.auth._token_and_source.)
    if query.find(wanted) < 0 and query.find(b"%") < 0:
        return None
    found: list[str] = []
    for pair in query.split(b"&"):  # (only this parameter is decoded: not the others)
        raw_name, _, raw_value = pair.partition(b"=")
        if unquote_to_bytes(raw_name.replace(b"+", b" ")) != wanted:
            continue
        try:
            found.append(unquote_to_bytes(raw_value.replace(b"+", b" ")).decode())
        except UnicodeDecodeError:
            raise InvalidInput(f"{name} is not UTF-8 once decoded", field=name) from None
    if len(found) > 1:
        raise InvalidInput(f"{name} is given more than once", field=name)
    return found[0] if found else None


def ingest_of(
    broker: Broker,
    settings: Settings,
    topic: str,
    key: str | None,
    grant: Grant,
    streams: OpenStreams,
) -> Ingest:
    """A streaming ingest of ``topic`` (its key checked): the last check before the store.
    ``grant``: the request's (until when its token lasts, and while its key is trusted);
    ``streams``: the process's (the ingest ends, answered, once they drain)."""
    check_idempotency_key(key)
    return Ingest(
        broker,
        topic,
        key=key,
        max_event_bytes=settings.max_event_bytes,
        max_batch=settings.max_batch,
        idle_timeout=settings.body_timeout_seconds,
        append_timeout=settings.publish_timeout_seconds,
        grant=grant,
        draining=lambda: streams.draining,
    )


async def run_ingest(ingest: Ingest, body: IngestBody, close: bool) -> tuple[int, list[Any], bytes]:
    """Store the body's lines, close the topic if asked once the body ended; the answer
    (both edges: the ASGI route and ``api.lean_ingest``). 200 where nothing was new: every
    line replayed (``Idempotent-Replayed``), the close too if asked; or no line, and a
    close of a topic closed already (as ``POST /topics/{t}/close`` answers it: it was
    201, as if this request had closed it)."""
    result = await ingest.run(body)
    content = result.content()
    closed_before = False
    if close:
        closing = await ingest.close_topic()
        content["end_id"] = str(closing.end_id)
        closed_before = closing.replayed
    if close and not result.count:  # (a close alone, blank lines at most: as a close answers)
        return (200 if closed_before else 201), JSON_HEADERS, orjson.dumps(content)
    everything_replayed = result.count and result.replayed == result.count
    everything_replayed = everything_replayed and (closed_before or not close)
    headers = REPLAYED_HEADERS if everything_replayed else JSON_HEADERS
    return (200 if everything_replayed else 201), headers, orjson.dumps(content)


async def read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over the limit."""
    if declared is not None:
        declared = declared.strip()  # (httptools keeps the spaces around a value)
        if not declared.isdigit():
            raise InvalidInput("Content-Length is not a number")
        if int(declared) > limit:
            raise TooLarge(f"the body is larger than {limit} bytes", limit=limit)
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidInput("the client went away before sending the whole body")
        body += bytes(message.get("body", b""))
        if len(body) > limit:
            raise TooLarge(f"the body is larger than {limit} bytes", limit=limit)
        if not message.get("more_body", False):
            return body


def parse_events(
    scope: Scope, headers: dict[bytes, bytes], body: bytes, settings: Settings
) -> tuple[list[NewEvent], bool]:
    media_type, charset = media_type_of(headers.get(b"content-type", b"").decode("latin-1"))
    return events_of(scope, media_type, charset, body, settings)


def events_of(
    scope: Scope, media_type: str, charset: str | None, body: bytes, settings: Settings
) -> tuple[list[NewEvent], bool]:
    """The body's events, and whether it was a batch, given its media type and charset
    (``media_type_of`` its Content-Type: the lean path parsed it already, with its head)."""
    _check_charset(charset)
    if media_type == "application/json":
        refuse_event_parameter(scope)
        try:
            document = loads_exactly(body)
        except orjson.JSONDecodeError as error:
            raise InvalidInput(f"malformed JSON (or not UTF-8): {error}") from error
        events = events_from_json(
            document, max_event_bytes=settings.max_event_bytes, max_batch=settings.max_batch
        )
        return events, isinstance(document, list)
    if media_type == "text/plain":
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidInput("the body is not valid UTF-8") from error
        event = query_value(scope, "event")  # (an empty one is refused, as in JSON)
        return [event_from_text(text, event, settings.max_event_bytes)], False
    raise HttpProblem(
        415,
        "Unsupported media type",
        "publish with Content-Type application/json, application/x-ndjson or "
        "text/plain; charset=utf-8",
    )


def _check_charset(charset: str | None) -> None:
    if charset not in (None, "utf-8", "utf8"):
        raise HttpProblem(415, "Unsupported media type", "only UTF-8 bodies are accepted")


def answer(result: AppendResult, is_batch: bool) -> tuple[int, list[Any], bytes]:
    if is_batch or len(result.ids) != 1:
        content: dict[str, Any] = {"ids": [str(event_id) for event_id in result.ids]}
    else:  # (a single publish: no list comprehension, a function call in Python 3.11)
        content = {"id": str(result.ids[0])}
    if result.end_id is not None:
        content["end_id"] = str(result.end_id)
    if result.replayed:
        return 200, REPLAYED_HEADERS, orjson.dumps(content)
    return 201, JSON_HEADERS, orjson.dumps(content)
