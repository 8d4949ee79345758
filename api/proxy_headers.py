"""A request served lean, as uvicorn would see it behind a proxy: its client and scheme.

``api.connections`` serves some requests itself, not through uvicorn's protocol and
its ``ProxyHeadersMiddleware``; so that the app, the cookie forgery check and the
access log see them as uvicorn would have shown them, this reads the ``X-Forwarded-*``
headers the way that middleware does (its trusted peers: ``proxy_headers``,
``forwarded_allow_ips``), and writes uvicorn's access log line naming that client.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from starlette.types import Scope
from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import _TrustedHosts

access_log = logging.getLogger("uvicorn.access")


def log_access(transport: asyncio.Transport, config: Config, scope: Scope, status: int) -> None:
    """uvicorn's access log line, for a request ``api.connections`` served itself."""
    if not access_log.hasHandlers():
        return
    client = _client_of(transport, config, scope)
    target = scope["raw_path"].decode("latin-1")
    if scope["query_string"]:
        target += "?" + scope["query_string"].decode("latin-1")
    access_log.info('%s - "%s %s HTTP/%s" %d', client, scope["method"], target, "1.1", status)


def _client_of(transport: asyncio.Transport, config: Config, scope: Scope) -> str:
    """The client as uvicorn's access log names it: behind a trusted proxy (uvicorn's
    ``proxy_headers``, ``forwarded_allow_ips``), the address X-Forwarded-For gives,
    as ``ProxyHeadersMiddleware`` reads it; else the socket's peer."""
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple):
        return "-"
    host, port = peer[0], peer[1]
    if config.proxy_headers:
        trusted = _trusted_hosts_of(config)
        forwarded = [value for name, value in scope["headers"] if name == b"x-forwarded-for"]
        if forwarded and host in trusted:
            named, named_port = trusted.get_trusted_client_address(
                b", ".join(forwarded).decode("latin-1")
            )
            if named:
                host, port = named, named_port
    return f"{host}:{port}"


def trusts_proxy(transport: asyncio.Transport, config: Config) -> bool:
    """Whether uvicorn believes the ``X-Forwarded-*`` headers of this connection's peer
    (``ProxyHeadersMiddleware``: its address in ``forwarded_allow_ips``)."""
    if not config.proxy_headers:
        return False
    peer = transport.get_extra_info("peername")
    return (peer[0] if isinstance(peer, tuple) else None) in _trusted_hosts_of(config)


FORWARDED_SCHEMES = frozenset({"http", "https", "ws", "wss"})
"""What ``ProxyHeadersMiddleware`` takes from ``X-Forwarded-Proto`` (else the socket's)."""


def forwarded_scheme(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The scheme a proxy's ``X-Forwarded-Proto`` names, read as uvicorn reads it: its
    last such header, if that is a scheme it takes."""
    named = None
    for name, value in headers:
        if name == b"x-forwarded-proto":
            named = value
    scheme = named.decode("latin-1").strip() if named is not None else None
    return scheme if scheme in FORWARDED_SCHEMES else None


def _trusted_hosts_of(config: Config) -> _TrustedHosts:
    allowed = config.forwarded_allow_ips
    return _trusted_hosts(tuple(allowed) if isinstance(allowed, list) else allowed)


@functools.lru_cache(maxsize=4)
def _trusted_hosts(allowed: str | tuple[str, ...]) -> _TrustedHosts:
    return _TrustedHosts(allowed if isinstance(allowed, str) else list(allowed))
