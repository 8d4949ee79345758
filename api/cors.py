"""CORS: which origins' pages may call the broker with credentials (cookies).

Decided here, once, for every response: the lean stream path and the raw
publish route never pass through Starlette's middleware, so each response
builder asks ``cors_headers(scope)`` (streams) or the app wraps ``send`` (the
rest). Origins are listed exactly; ``*`` is never sent, since browsers refuse
it with credentials, and a broker that echoed any origin would let every site
read its users' streams.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.responses import Response
from starlette.types import Message, Scope, Send

from api.problems import Forbidden

ALLOWED_METHODS = b"GET, POST, DELETE"
ALLOWED_HEADERS = b"Authorization, Content-Type, Idempotency-Key, Last-Event-ID"
EXPOSED_HEADERS = b"Broker-Heartbeat, Idempotent-Replayed, Retry-After"
PREFLIGHT_MAX_AGE = b"600"
VARY = (b"vary", b"Origin")


class CorsPolicy:
    """The origins listed in ``BROKER_CORS_ORIGINS``; none: CORS off, no headers at all."""

    def __init__(self, origins: Iterable[str]) -> None:
        self._origins = frozenset(origin.encode("latin-1") for origin in origins)

    @property
    def enabled(self) -> bool:
        return bool(self._origins)

    def headers_for(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """The headers of any response to this request."""
        return self.headers_for_origin(_header(scope["headers"], b"origin"))

    def headers_for_origin(self, origin: bytes | None) -> list[tuple[bytes, bytes]]:
        """The headers of any response to a request with this ``Origin`` (None: none)."""
        if not self._origins:
            return []
        if origin not in self._origins:
            return [VARY]  # caches must not serve this answer to a listed origin
        assert origin is not None
        return [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-credentials", b"true"),
            (b"access-control-expose-headers", EXPOSED_HEADERS),
            VARY,
        ]

    def is_preflight(self, scope: Scope) -> bool:
        return (
            self.enabled
            and scope["method"] == "OPTIONS"
            and _header(scope["headers"], b"access-control-request-method") is not None
        )

    def preflight(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """A preflight's own headers (besides ``headers_for``); Forbidden for an origin
        not listed."""
        if _header(scope["headers"], b"origin") not in self._origins:
            raise Forbidden("this origin is not allowed (BROKER_CORS_ORIGINS)")
        return [
            (b"access-control-allow-methods", ALLOWED_METHODS),
            (b"access-control-allow-headers", ALLOWED_HEADERS),
            (b"access-control-max-age", PREFLIGHT_MAX_AGE),
        ]


def cors_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The CORS headers for a response to this request (of the app in ``scope``)."""
    policy: CorsPolicy | None = getattr(scope["app"].state, "cors", None)
    return policy.headers_for(scope) if policy is not None else []


def with_cors(response: Response, scope: Scope) -> Response:
    """``response`` (an answer written on the connection, not through the app) with the
    CORS headers the app adds to every answer."""
    response.raw_headers.extend(cors_headers(scope))
    return response


def cors_headers_of_head(app: Any, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The CORS headers for an answer written on the connection before a request has a
    scope (a 431, a 408, a 400): for the ``Origin`` among ``headers``, those of its
    head parsed so far. A head cut short still has its ``Origin`` if it came whole:
    httptools passes a header on only once the next one begins, so a cut-off value is
    never seen, let alone echoed. ``app`` None (not started): no policy yet, none."""
    policy: CorsPolicy | None = getattr(app.state, "cors", None) if app is not None else None
    return policy.headers_for_origin(_header(headers, b"origin")) if policy is not None else []


def with_cors_of_head(response: Response, app: Any, headers: list[tuple[bytes, bytes]]) -> Response:
    """``response``, with ``cors_headers_of_head(app, headers)``."""
    response.raw_headers.extend(cors_headers_of_head(app, headers))
    return response


def adding_headers(headers: list[tuple[bytes, bytes]], send: Send) -> Send:
    """``send``, with ``headers`` added to the response's head, but those it already
    has (a browser refuses a response with two ``Access-Control-Allow-Origin``)."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            own = message.get("headers", [])
            names = {name.lower() for name, _ in own}
            added = [(name, value) for name, value in headers if name not in names]
            message = {**message, "headers": [*own, *added]}
        await send(message)

    return send_with_headers


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return bytes(value)
    return None
