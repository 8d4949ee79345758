"""DNS rebinding: which host names a request may be sent to.

Without a token check, "keep it on loopback" is the broker's only protection; a
page of any site defeats it by answering its own host name with 127.0.0.1 (DNS
rebinding): the browser then takes the broker for that site, same-origin, and
lets the page publish, read and delete topics. The one thing such a request
cannot hide is the name it was sent to, in its ``Host`` header (a page cannot
set it). So a connection accepted on a loopback address with authorization off
is served only requests naming the broker as ``localhost`` (or a
``*.localhost``, which browsers resolve themselves), by an IP address, or by a
name listed in ``BROKER_ALLOWED_HOSTS``; others get 421. Once that list is set,
every connection is held to it, whatever its address and the authorization
(a private network is rebound the same way). The health, readiness and metrics
routes answer whatever the name: probes send their own.

With authorization on and no list, every name is served, and the broker says so
loudly at start (``ANY_NAME_SERVED``) rather than refuse to start: no list is
the documented default of every deployment with tokens (the shipped compose and
Kubernetes configs set none; the contract requires no such setting), and a
token in the ``Authorization`` header gains a rebound page nothing. What such a
page can reach: a cookie (its browser sends a rebound name that name's cookies,
so the broker's when one is set for a parent domain, ``Domain=example.com``, and
the rebound name is under it), which the ``Origin`` check of a change by cookie
then takes, as the page's origin and the ``Host`` it sends agree; and the public
topics of a broker on a private network.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Iterable
from typing import Any

from starlette.responses import Response

from api.problems import problem
from broker.health import ThrottledLog

ANY_NAME_SERVED = (
    "BROKER_ALLOWED_HOSTS is empty: requests are served whatever host name they were "
    "sent to. A page of a site whose name points at this broker (DNS rebinding) passes "
    "for the broker's own origin: a publish, close or delete by a cookie its browser "
    "sends that name (one set for a parent domain) is taken, and BROKER_PUBLIC_TOPICS "
    "are read by any page a visitor on the broker's network opens. List the names the "
    "broker is reached by in BROKER_ALLOWED_HOSTS"
)
"""Said at start when authorization is on and no name is listed (see the module)."""
PROBES = frozenset({"/healthz", "/readyz", "/readyz/store", "/metrics"})
log = logging.getLogger(__name__)
REFUSALS = ThrottledLog(60.0, log)
"""Said, not only answered: behind a proxy on the same host that forwards its clients'
names, every request is refused while every probe passes."""


class HostPolicy:
    """Which connections are checked, and which ``Host`` names they may be sent to."""

    def __init__(self, allowed: Iterable[str], *, auth_enabled: bool) -> None:
        names = [name.strip().lower().removesuffix(".") for name in allowed]
        self._exact = frozenset(n for n in names if n and not n.startswith("*."))
        self._suffixes = tuple(n[1:] for n in names if n.startswith("*."))  # ".example.com"
        self._listed = bool(self._exact or self._suffixes)
        self._auth_enabled = auth_enabled
        self._named: dict[bytes, bool] = {}

    @property
    def serves_any_name(self) -> bool:
        """Whether no connection is ever checked: authorization on, no name listed."""
        return self._auth_enabled and not self._listed

    def checks(self, local_address: Any) -> bool:
        """Whether requests of a connection accepted on this local address (a socket's
        ``getsockname()``, or ASGI's ``server``) are checked."""
        if self._listed:
            return True
        if self._auth_enabled or not isinstance(local_address, tuple | list) or not local_address:
            return False
        return isinstance(local_address[0], str) and is_loopback(local_address[0])

    def names_this_host(self, host: bytes) -> bool:
        """Whether a ``Host`` header names the broker: localhost, an address, or a name
        of the list (remembered: a connection's every request asks)."""
        named = self._named.get(host)
        if named is None:
            name = hostname_of(host)
            named = is_local_name(name) or name in self._exact or name.endswith(self._suffixes)
            if len(self._named) < 1024:
                self._named[host] = named
        return named

    def refuses_host(self, host: bytes | None) -> bool:
        """Whether a request on a checked connection is refused for its ``Host`` (none at
        all: no browser's, an HTTP/1.0 client's)."""
        return host is not None and not self.names_this_host(host)

    def refuses(self, scope: Any) -> bool:
        """Whether the app refuses an ASGI request for the name it was sent to."""
        if not self.checks(scope.get("server")) or _route_of(scope) in PROBES:
            return False
        return self.refuses_host(host_of(scope["headers"]))


def _route_of(scope: Any) -> str:
    """The path without uvicorn's ``--root-path`` (a probe under one was refused)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


@functools.lru_cache(maxsize=64)
def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False  # (a Unix socket's path: only a proxy on this host reaches it)
    # 127.0.0.1 on a dual-stack socket (the workers' on --host ::) is ::ffff:127.0.0.1,
    # which Python does not call loopback: the check was skipped there.
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


def hostname_of(host: bytes) -> str:
    """A ``Host`` header's name, without its port, lower case, no final dot."""
    text = host.decode("latin-1").strip().lower()
    if is_address(text):  # (an IPv6 address sent bare)
        return text
    if text.startswith("["):
        name = text[1 : text.find("]")] if "]" in text else text
    else:
        name = text.rpartition(":")[0] if ":" in text else text
    return name.removesuffix(".")


def is_local_name(name: str) -> bool:
    return name == "localhost" or name.endswith(".localhost") or is_address(name)


def is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_of(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"host":
            return value
    return None


def host_refused(scope: Any) -> Response:
    host = (host_of(scope["headers"]) or b"").decode("latin-1")[:100]
    REFUSALS.say(
        "refused requests sent to host %r (421; BROKER_ALLOWED_HOSTS lists the names "
        "served besides localhost and addresses)",
        host,
    )
    return problem(
        421,
        "Host not served",
        f"this broker serves requests sent to localhost, an IP address or a name of "
        f"BROKER_ALLOWED_HOSTS, not to {host!r} (a page of any site can point its own "
        "name at a broker it cannot reach otherwise: DNS rebinding). Use one of those "
        "names, or list this one in BROKER_ALLOWED_HOSTS",
    )
