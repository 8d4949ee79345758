"""Publishing over HTTP, sync (``Publisher``) and async (``AsyncPublisher``).

Every publish carries one ``Idempotency-Key`` (the caller's, or a fresh one)
through all its attempts: a retry after a 503 or a broken connection can never
store an event twice, whichever instance it lands on, because the broker answers
a repeated key with the first attempt's ids.

A streaming ingest (``stream``) sends the events as ``application/x-ndjson``,
one line each, stored as they arrive. Its lines sent so far are kept, so a retry
can send the whole stream again under the same key (the broker stores line n
under key K:n, so nothing is stored twice) and then go on with the rest. But where
the broker says that would store the lines it kept twice (``resend: after_line``:
its newest lines lost by a failover with its line records lapsed, or those records
lapsed; ``ingest-lines-lost``, ``ingest-records-lapsed``), the lines after the last
one kept go on as a stream of their own, under the key ``K+n`` (n: that line);
where it cannot tell which were kept, ``StreamStopped`` is raised.

``token`` may be a callable returning the current token: it is asked at each
attempt, and a 401 is tried once more at once with a token asked anew (the same
key: a stream refused as its token expired goes on from where it was). A token
refused twice in a row raises ``RequestFailed``.

This module sends and retries; what is sent (the JSON and text bodies, a stream's
lines kept for the retries) is made in ``brokerclient.publish_body``, and the attempts
are counted, and the delays between them told, in ``brokerclient.attempts``; a stream
told to go on as a stream of its own is handled in ``brokerclient.stream_parts``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

from brokerclient.attempts import Attempts
from brokerclient.http import (
    DEFAULT_URL,
    RETRY_STATUSES,
    AsyncToken,
    PublishResult,
    RetryPolicy,
    Token,
    async_token_now,
    base_headers,
    checked_url,
    idempotency_key_of,
    kept_lines,
    refreshes,
    retry_after,
    shared_tls,
    token_now,
    topic_path,
)
from brokerclient.keepalive import KEEPALIVE_SECONDS, keepalive_of
from brokerclient.publish_body import (
    NDJSON,
    _aiter,
    _AsyncSentLines,
    _Interrupted,
    _json_body,
    _Lines,
    _SentLines,
    _utf8,
)

# (EventObject re-exported: the type of the events publish_batch and stream take)
from brokerclient.publish_body import EventObject as EventObject
from brokerclient.stream_parts import (
    UNREAD,
    answered,
    ctrl_c_in,
    failed_in_parts,
    go_on_alone,
    start_over_if_log_lost,
    stream_result,
    unanswered,
)

DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)


def event(data: Any, event: str | None = None, retry: int | None = None) -> dict[str, Any]:
    """An event object for ``publish_batch`` and ``stream``."""
    item: dict[str, Any] = {"data": data}
    if event is not None:
        item["event"] = event
    if retry is not None:
        item["retry"] = retry
    return item


def _query(close: bool, event_type: str | None = None) -> dict[str, str]:
    params = {"close": "true"} if close else {}
    if event_type is not None:
        _utf8(event_type)  # (a lone surrogate: a ValueError here, not from inside httpx)
        params["event"] = event_type
    return params


class Publisher:
    """Publishes to a broker over HTTP (blocking). Use as a context manager, or ``close()``.

    ``url`` is the broker's base URL (behind a load balancer: the balancer's);
    ``token`` a JWT sent as ``Authorization: Bearer``, or a callable returning the
    current one, asked at each attempt (and once more after a 401).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: Token = None,
        retry: RetryPolicy | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        client: httpx.Client | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._client = client or httpx.Client(
            base_url=checked_url(url), timeout=timeout, verify=shared_tls()
        )
        self._own_client = client is None  # (a client passed in is the caller's to close)
        self._token = token

    def publish(
        self,
        topic: str,
        data: Any,
        *,
        event: str | None = None,
        retry: int | None = None,
        idempotency_key: str | None = None,
        close: bool = False,
    ) -> PublishResult:
        """Publish one event whose data is any JSON value; ``close`` closes the topic after it."""
        body = _json_body({"data": data} | _optional(event=event, retry=retry))
        return self._send(topic, body, "application/json", _query(close), idempotency_key)

    def publish_text(
        self,
        topic: str,
        text: str,
        *,
        event: str | None = None,
        idempotency_key: str | None = None,
        close: bool = False,
    ) -> PublishResult:
        """Publish one event whose data is text (delivered as that text, not as JSON)."""
        content_type = "text/plain; charset=utf-8"
        return self._send(topic, _utf8(text), content_type, _query(close, event), idempotency_key)

    def publish_batch(
        self,
        topic: str,
        events: Sequence[EventObject],
        *,
        idempotency_key: str | None = None,
        close: bool = False,
    ) -> PublishResult:
        """Publish several events, stored atomically and in order (see ``event()``)."""
        body = _json_body(list(events))
        return self._send(topic, body, "application/json", _query(close), idempotency_key)

    def stream(
        self,
        topic: str,
        events: Iterable[EventObject],
        *,
        idempotency_key: str | None = None,
        close: bool = False,
        keepalive_seconds: float | None = KEEPALIVE_SECONDS,
    ) -> PublishResult:
        """Streaming ingest: each event is stored as the iterator yields it.

        ``close`` closes the topic once the iterator is exhausted (never if it raises).
        An iterator that raises (an ``Exception``), or an event that is not JSON, ends
        it with ``StreamInterrupted``, raised from that error: the lines sent before it
        are stored (those that reached the broker), the request broken off (no
        ``close``), and its ``idempotency_key`` is the key to resend under, which stores
        those lines no second time: sent in one part, the one given (or the one made
        up), under which the whole stream goes again (the same events first: others in
        their place are refused, 400); gone on after its line n as a stream of its own
        (the broker said so; ``after_line`` n), ``K+n``, under which only the events
        after line n go (never the whole stream again, under either key: under K it
        stores lines 1..n twice). A broker that had refused the stream before it raised
        has its refusal raised instead (see ``StreamInterrupted``). Any refusal after
        the stream went on so carries ``after_line`` and ``K+n`` too, and an error not
        the broker's (the ``token`` callable's) is ``StreamPartFailed``, carrying them. A
        Ctrl-C, wherever it lands (the iterator, a send, a retry's wait), is raised as
        ``StreamKeyboardInterrupt``, a ``KeyboardInterrupt`` carrying that key and
        ``after_line`` as well; any other ``BaseException`` goes through as it is.

        ``keepalive_seconds`` (None or 0: off): while the iterator has given nothing for
        that long, a space is sent, the start of its next line (the broker stops a body
        without a read for ``BROKER_BODY_TIMEOUT_SECONDS``, 30 s; a space numbers no line,
        so any resend is exact), up to 1024 before one line. The iterator is then read in
        a worker thread, one event when the stream asks for it (in a copy of the caller's
        ``contextvars``): one bound to its thread (a ``sqlite3`` cursor) needs it off, and
        a list or a tuple never has it. A call that ends while the iterator is silent (a
        Ctrl-C, the broker unreachable) leaves that thread in the iterator until its next
        event, which it drops (a daemon thread): resend from a copy of the events.
        """
        key = idempotency_key_of(idempotency_key)
        keepalive = keepalive_of(keepalive_seconds)
        keepalive = None if isinstance(events, (list, tuple)) else keepalive  # (never silent)
        lines = _SentLines(iter(events), key, keepalive)
        try:
            return self._send(topic, lines, NDJSON, _query(close), key, "stream")
        finally:
            lines.close()

    def _send(
        self,
        topic: str,
        body: bytes | _SentLines,
        content_type: str,
        params: Mapping[str, str],
        key: str | None,
        what: str = "publish",
    ) -> PublishResult:
        """POST, retried under one Idempotency-Key; ``body`` bytes, or a stream's lines
        (sent afresh by each attempt: the lines sent already, then the rest). An error
        not the broker's, once a stream went on in parts, says them (``failed_in_parts``)."""
        try:
            return self._attempts(topic, body, content_type, params, key, what)
        except Exception as error:
            if (in_parts := failed_in_parts(error, body)) is None:
                raise
            raise in_parts from error
        except KeyboardInterrupt as error:  # (wherever it landed: the part under way's key)
            if isinstance(body, bytes):
                raise
            raise ctrl_c_in(body) from error

    def _attempts(
        self,
        topic: str,
        body: bytes | _SentLines,
        content_type: str,
        params: Mapping[str, str],
        key: str | None,
        what: str,
    ) -> PublishResult:
        key = idempotency_key_of(key)
        attempts = Attempts(self.retry, f"{what} to {topic}", key)
        while True:
            key = key if isinstance(body, bytes) else body.key  # (a stream gone on: its own)
            headers = _headers_for(token_now(self._token), content_type, key)
            content = body if isinstance(body, bytes) else body.replay_then_rest()
            request = self._client.build_request(
                "POST", topic_path(topic), content=content, params=params, headers=headers
            )
            try:
                response = self._client.send(_sent_as(body, request))
            except _Interrupted as stopped:  # (the caller's iterator: never retried)
                raise stopped.public(UNREAD) from stopped.error  # (a transport not httpcore's)
            except httpx.TransportError as error:
                if (interrupted := _interrupted(body)) is not None:
                    raise unanswered(interrupted, error) from interrupted.error
                time.sleep(attempts.failed(repr(error), lines=_taken(body)))
                continue
            if not isinstance(body, bytes) and body.interrupted:  # (answered before it raised)
                raise answered(response, body, body.interrupted) from body.interrupted.error
            if not isinstance(body, bytes) and (kept := kept_lines(response)) is not None:
                time.sleep(go_on_alone(body, kept, response, attempts))
                continue
            if not isinstance(body, bytes):
                start_over_if_log_lost(body, response, attempts)
            if response.status_code in RETRY_STATUSES:
                hinted = retry_after(response)
                time.sleep(
                    attempts.failed(f"{response.status_code}", hinted, _taken(body), answered=True)
                )
                continue
            if response.status_code == 401 and attempts.refused(
                refreshes(self._token), _taken(body)
            ):
                continue
            return stream_result(response, key, body)

    def close(self) -> None:
        if self._own_client:
            self._client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncPublisher:
    """``Publisher`` for asyncio: the same methods, awaited; ``stream`` also takes an
    async iterator (a token stream, say). Use as an async context manager, or ``aclose()``."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: AsyncToken = None,
        retry: RetryPolicy | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._client = client or httpx.AsyncClient(
            base_url=checked_url(url), timeout=timeout, verify=shared_tls()
        )
        self._own_client = client is None  # (a client passed in is the caller's to close)
        self._token = token

    async def publish(
        self,
        topic: str,
        data: Any,
        *,
        event: str | None = None,
        retry: int | None = None,
        idempotency_key: str | None = None,
        close: bool = False,
    ) -> PublishResult:
        """Publish one event whose data is any JSON value; ``close`` closes the topic after it."""
        body = _json_body({"data": data} | _optional(event=event, retry=retry))
        return await self._send(topic, body, "application/json", _query(close), idempotency_key)

    async def publish_text(
        self,
        topic: str,
        text: str,
        *,
        event: str | None = None,
        idempotency_key: str | None = None,
        close: bool = False,
    ) -> PublishResult:
        """Publish one event whose data is text (delivered as that text, not as JSON)."""
        content_type = "text/plain; charset=utf-8"
        params = _query(close, event)
        return await self._send(topic, _utf8(text), content_type, params, idempotency_key)

    async def publish_batch(
        self,
        topic: str,
        events: Sequence[EventObject],
        *,
        idempotency_key: str | None = None,
        close: bool = False,
    ) -> PublishResult:
        """Publish several events, stored atomically and in order (see ``event()``)."""
        body = _json_body(list(events))
        return await self._send(topic, body, "application/json", _query(close), idempotency_key)

    async def stream(
        self,
        topic: str,
        events: Iterable[EventObject] | AsyncIterable[EventObject],
        *,
        idempotency_key: str | None = None,
        close: bool = False,
        keepalive_seconds: float | None = KEEPALIVE_SECONDS,
    ) -> PublishResult:
        """``Publisher.stream``, awaited: an iterator that raises ends it with
        ``StreamInterrupted`` (its ``idempotency_key`` to resend under: the one given,
        or ``K+n`` once gone on after line n, ``after_line``); a ``KeyboardInterrupt`` is
        raised as ``StreamKeyboardInterrupt``, carrying them; a cancellation goes through
        as it is. ``keepalive_seconds``: as ``Publisher.stream``'s, for an async iterator,
        one step of it pending in a task, waited on (never cancelled by the wait), each
        in one copy of the caller's ``contextvars``; a step pending when the call ends
        (cancelled, or given up) is cancelled. A sync iterable is read on the event loop,
        as ever: no keep-alive (a wait could not run)."""
        key = idempotency_key_of(idempotency_key)
        keepalive = keepalive_of(keepalive_seconds)
        keepalive = keepalive if isinstance(events, AsyncIterable) else None
        lines = _AsyncSentLines(_aiter(events), key, keepalive)
        try:
            return await self._send(topic, lines, NDJSON, _query(close), key, "stream")
        finally:
            lines.close()

    async def _send(
        self,
        topic: str,
        body: bytes | _AsyncSentLines,
        content_type: str,
        params: Mapping[str, str],
        key: str | None,
        what: str = "publish",
    ) -> PublishResult:
        """``Publisher._send``, awaited."""
        try:
            return await self._attempts(topic, body, content_type, params, key, what)
        except Exception as error:
            if (in_parts := failed_in_parts(error, body)) is None:
                raise
            raise in_parts from error
        except KeyboardInterrupt as error:
            if isinstance(body, bytes):
                raise
            raise ctrl_c_in(body) from error

    async def _attempts(
        self,
        topic: str,
        body: bytes | _AsyncSentLines,
        content_type: str,
        params: Mapping[str, str],
        key: str | None,
        what: str,
    ) -> PublishResult:
        key = idempotency_key_of(key)
        attempts = Attempts(self.retry, f"{what} to {topic}", key)
        while True:
            key = key if isinstance(body, bytes) else body.key  # (a stream gone on: its own)
            headers = _headers_for(await async_token_now(self._token), content_type, key)
            content = body if isinstance(body, bytes) else body.replay_then_rest()
            request = self._client.build_request(
                "POST", topic_path(topic), content=content, params=params, headers=headers
            )
            try:
                response = await self._client.send(_sent_as(body, request))
            except _Interrupted as stopped:  # (the caller's iterator: never retried)
                raise stopped.public(UNREAD) from stopped.error  # (a transport not httpcore's)
            except httpx.TransportError as error:
                if (interrupted := _interrupted(body)) is not None:
                    raise unanswered(interrupted, error) from interrupted.error
                await asyncio.sleep(attempts.failed(repr(error), lines=_taken(body)))
                continue
            if not isinstance(body, bytes) and body.interrupted:  # (answered before it raised)
                raise answered(response, body, body.interrupted) from body.interrupted.error
            if not isinstance(body, bytes) and (kept := kept_lines(response)) is not None:
                await asyncio.sleep(go_on_alone(body, kept, response, attempts))
                continue
            if not isinstance(body, bytes):
                start_over_if_log_lost(body, response, attempts)
            if response.status_code in RETRY_STATUSES:
                hinted = retry_after(response)
                await asyncio.sleep(
                    attempts.failed(f"{response.status_code}", hinted, _taken(body), answered=True)
                )
                continue
            if response.status_code == 401 and attempts.refused(
                refreshes(self._token), _taken(body)
            ):
                continue
            return stream_result(response, key, body)

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _headers_for(token: str | None, content_type: str, key: str) -> dict[str, str]:
    return base_headers(token) | {"Content-Type": content_type, "Idempotency-Key": key}


def _sent_as(body: bytes | _Lines, request: httpx.Request) -> httpx.Request:
    return request if isinstance(body, bytes) else body.sent_as(request)


def _interrupted(body: bytes | _Lines) -> _Interrupted | None:
    """What the caller's iterator raised, if it did (the stream ends: never retried)."""
    return None if isinstance(body, bytes) else body.interrupted


def _taken(body: bytes | _SentLines | _AsyncSentLines) -> int | None:
    """A stream's lines taken from its iterator so far (None: not a stream)."""
    return None if isinstance(body, bytes) else body.count()


def _optional(**members: Any) -> dict[str, Any]:
    return {name: value for name, value in members.items() if value is not None}
