"""The answers ``broker_http_responses_total`` counts: each request's route class,
and the app's ``send`` that counts the answer it starts.

The route class is a label of a fixed few (``api.metrics.RouteClass``), never the
topic or the path, so the series stay bounded whatever clients send. The lean
paths of ``api.connections`` know theirs and count where they write; a request
the app answers is classed here from its method, path and the one header that
tells two routes of a path apart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from starlette.types import Message, Send

from api.metrics import RouteClass, count_response
from api.negotiation import media_type_of, prefers_json

READS = ("GET", "HEAD")
NDJSON = "application/x-ndjson"
TOPIC_PATH = re.compile(r"/topics/[^/]+(/events|/close)?")
FIXED_PATHS: dict[str, RouteClass] = {
    "/topics": "topics",
    "/events": "stream",
    "/healthz": "probes",
    "/readyz": "probes",
    "/readyz/store": "probes",
    "/metrics": "metrics",
    "/": "face",
    "/docs": "face",
    "/openapi.json": "face",
    "/client.js": "face",
    "/stats": "face",
}
"""Paths read with GET (or HEAD); ``/static/...`` is the face's too."""


def route_class(scope: Mapping[str, Any]) -> RouteClass:
    """The route a request is for; "other" for an unknown path, a method the path
    does not have, a CORS preflight, a topic path holding "/"."""
    method, path = scope["method"], scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root + "/"):  # (mounted under a path)
        path = path[len(root) :]
    match = TOPIC_PATH.fullmatch(path) if path.startswith("/topics/") else None
    if match is not None:
        return _topic_route(method, match.group(1), scope)
    if method not in READS:
        return "other"
    return FIXED_PATHS.get(path) or ("face" if path.startswith("/static/") else "other")


def _topic_route(method: str, tail: str | None, scope: Mapping[str, Any]) -> RouteClass:
    if tail == "/events":
        if method == "POST":
            ingest = media_type_of(_header(scope, b"content-type"))[0] == NDJSON
            return "ingest" if ingest else "publish"
        if method in READS:
            return "history" if prefers_json(_header(scope, b"accept")) else "stream"
    elif tail == "/close":
        return "close" if method == "POST" else "other"
    elif method == "DELETE":
        return "delete"
    elif method in READS:
        return "topic"
    return "other"


def _header(scope: Mapping[str, Any], name: bytes) -> str:
    value = next((v for k, v in scope["headers"] if k == name), b"")
    return value.decode("latin-1")


def counting(route: RouteClass, send: Send) -> Send:
    """``send``, counting the answer it starts. Not one uvicorn drops (its client is
    gone, or the guard answered the request itself, 408 say, and counted that)."""
    cycle = getattr(send, "__self__", None)  # uvicorn's request cycle, under uvicorn

    async def send_counted(message: Message) -> None:
        if message["type"] == "http.response.start" and not getattr(cycle, "disconnected", False):
            count_response(route, message["status"])
        await send(message)

    return send_counted
