"""Answers written straight to a connection's transport, not through the app.

What the app does not answer (a lean stream's opening, a refusal past the
connection limit, a 408 or 431 for a request the app never had, the 400 for
bytes httptools cannot parse) is written here as uvicorn writes its own
answers: its headers (date, server) first, its 400's text. Shared by
``api.connections``, its lean paths and ``api.guard``.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import TYPE_CHECKING

from starlette.responses import Response
from uvicorn.server import ServerState

from api.lingering import close_lingering
from api.metrics import RouteClass, count_response

if TYPE_CHECKING:  # (api.guard imports this module: at run time, a cycle)
    from api.guard import Guard

INVALID_REQUEST = "Invalid HTTP request received."
"""uvicorn's answer to bytes httptools cannot parse (``send_400_response``)."""


def response_head(
    status: int, headers: list[tuple[bytes, bytes]], server_state: ServerState
) -> bytes:
    """A response's head, with uvicorn's own headers (date, server) first."""
    lines = [b"HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase.encode())]
    lines += [name + b": " + value for name, value in server_state.default_headers]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join([*lines, b"", b""])


def invalid_request(
    server_state: ServerState, cors: list[tuple[bytes, bytes]], message: str = INVALID_REQUEST
) -> bytes:
    """uvicorn's ``send_400_response`` answer, with the CORS headers of the request the
    bad bytes broke (uvicorn's has none: a page saw its 400 as a network error)."""
    body = message.encode("ascii")
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
        *cors,
    ]
    return response_head(400, headers, server_state) + body


def answer_and_close(
    transport: asyncio.Transport,
    response: Response,
    route: RouteClass,
    server_state: ServerState,
    guard: Guard,
) -> None:
    """Write a whole response (the app's own object) and close the connection, lingering."""
    count_response(route, response.status_code)
    headers = response.raw_headers
    if not any(name == b"connection" for name, _ in headers):
        headers = [*headers, (b"connection", b"close")]
    transport.write(response_head(response.status_code, headers, server_state) + response.body)
    close_lingering(transport, server_state, guard.deadlines)
