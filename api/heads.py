"""A request head read with httptools: what ``api.connections`` decides on.

The head alone is fed to a parser of its own (one per request), so that a
request can be handed over, from its first byte, to uvicorn's protocol.
"""

from __future__ import annotations

from typing import Any

import httptools

HEAD_END = b"\r\n\r\n"


class RequestHead:
    """httptools' callbacks for one request head."""

    __slots__ = ("complete", "headers", "headers_done", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_message_complete(self) -> None:
        self.complete = True


def parse_head(data: bytes) -> tuple[RequestHead, httptools.HttpRequestParser] | None:
    """The head at the start of ``data`` (and its parser); None if it is not HTTP or
    not whole."""
    end = data.find(HEAD_END)
    head = RequestHead()
    parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(data[: end + len(HEAD_END)] if end >= 0 else data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    return (head, parser) if head.headers_done else None


def scope_of(
    method: str,
    path: str,
    url: Any,
    headers: list[tuple[bytes, bytes]],
    scheme: str,
    http_version: str = "1.1",
) -> dict[str, Any]:
    """The ASGI scope of a request served on the connection (no root path): what the
    app's functions read, as uvicorn would have built it. ``url`` is
    ``httptools.parse_url``'s answer; ``path`` its path, percent-decoded; ``scheme``
    the connection's, or a trusted proxy's (``BrokerHttpProtocol.scheme_of``)."""
    return {
        "type": "http",
        "http_version": http_version,
        "method": method,
        "scheme": scheme,
        "path": path,
        "raw_path": url.path,
        "query_string": url.query or b"",
        "root_path": "",
        "headers": headers,
    }
