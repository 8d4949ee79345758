"""What a ``BROKER_REDIS_URL`` says, checked before any client is built from it.

redis-py's ``from_url`` reads one host; a ``redis+sentinel://`` or ``redis+cluster://``
URL lists several, so it is split here (with urllib) into the arguments of the
clients. And whatever a URL holds that would not be used is refused, with a
ValueError naming it (never the password): a TLS option or a database silently
dropped gives a connection other than the one asked for (audit: ``rediss+cluster``
options ignored or crashing, ``redis://h/abc`` on db 0, a username dropped).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

SENTINEL_PORT = 26379
REDIS_PORT = 6379
_CERT_REQS = ("none", "optional", "required")
_FLAGS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _cert_reqs(value: str) -> str:
    if value.lower() not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs is one of {', '.join(_CERT_REQS)}, not {value!r}")
    return value.lower()


def _flag(value: str) -> bool:
    # Stricter than redis-py's to_bool, where any word but a few "no"s reads as true.
    try:
        return _FLAGS[value.lower()]
    except KeyError:
        raise ValueError(f"ssl_check_hostname is true or false, not {value!r}") from None


TLS_OPTIONS: dict[str, Callable[[str], Any]] = {
    "ssl_ca_certs": str,  # a CA file to trust (a private CA)
    "ssl_cert_reqs": _cert_reqs,  # "none" skips verifying the server
    "ssl_check_hostname": _flag,
    "ssl_certfile": str,  # the client's certificate and key (tls-auth-clients)
    "ssl_keyfile": str,
}
"""The query options of ``rediss+cluster://`` URLs: those of redis-py's ``rediss://``
that a deployment needs, named as redis-py names them (and passed on as they are)."""


@dataclass(frozen=True)
class ServersUrl:
    """``scheme://[user[:password]@]host[:port][,host[:port]...][/path][?query]``, split."""

    scheme: str
    hosts: list[tuple[str, int]]
    username: str | None
    password: str | None
    path: str  # unquoted, without its leading "/"
    query: dict[str, str]

    def credentials(self) -> dict[str, str | None]:
        """As redis-py's clients take them: a username (ACL user) and its password."""
        return {"username": self.username, "password": self.password}


def split_servers_url(url: str, default_port: int) -> ServersUrl:
    """The parts of a Sentinel or Cluster URL; a ValueError for one that is malformed."""
    parts = _split(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    return ServersUrl(
        scheme=parts.scheme,
        hosts=[_host_and_port(each, default_port) for each in hosts.split(",")],
        username=unquote(username) or None,
        password=unquote(password) or None,
        path=unquote(parts.path).removeprefix("/"),
        query=_query(parts.query),
    )


def _split(url: str) -> SplitResult:
    parts = urlsplit(url)
    _check_encoded(parts)
    return parts


def _check_encoded(parts: SplitResult) -> None:
    # An "@" past the host is a password holding a "/", "?" or "#" that was not
    # percent-encoded: the rest of the URL would hold part of it, so none is shown.
    if "@" in parts.path + parts.query + parts.fragment:
        raise ValueError(
            "the Redis URL has an '@' after its host: percent-encode '/', '?', '#' and '@' "
            "in its username and password (%2F, %3F, %23, %40)"
        )


def _host_and_port(entry: str, default_port: int) -> tuple[str, int]:
    host, colon, port = entry.rpartition(":")
    if not colon:
        host, port = entry, str(default_port)
    if not host or not re.fullmatch(r"[0-9]+", port):
        raise ValueError(f"the Redis URL's host {entry!r} is not host[:port]")
    return host, int(port)


def _query(query: str) -> dict[str, str]:
    pairs = parse_qsl(query, keep_blank_values=True)
    options = dict(pairs)
    if len(options) != len(pairs):
        raise ValueError("the Redis URL gives an option twice")
    return options


def cluster_options(url: ServersUrl) -> dict[str, Any]:
    """The connection options of every client of a Cluster (the cluster client, its
    per-node clients, the live reader's): credentials, and TLS with its options."""
    _check_scheme(url, "redis+cluster", "rediss+cluster")
    if url.path not in ("", "0"):
        # A Cluster has only database 0: any other path was ignored.
        raise ValueError(f"a Cluster URL's path is empty or /0, not /{url.path}")
    tls = url.scheme == "rediss+cluster"
    options: dict[str, Any] = url.credentials() | {"ssl": tls}
    for name, value in url.query.items():
        if name not in TLS_OPTIONS:
            raise ValueError(f"unknown option {name!r} in the Cluster URL ({_known_options()})")
        if not tls:
            raise ValueError(f"{name} is a TLS option: the URL's scheme is then rediss+cluster://")
        options[name] = TLS_OPTIONS[name](value)
    return options


def _check_scheme(url: ServersUrl, *known: str) -> None:
    if url.scheme not in known:
        raise ValueError(f"unknown Redis URL scheme {url.scheme}:// ({' or '.join(known)})")


def _known_options() -> str:
    return "known: " + ", ".join(TLS_OPTIONS) + ", with rediss+cluster://"


def sentinel_service(url: ServersUrl) -> tuple[str, int]:
    """The service (the primary's name) and the database of a Sentinel URL."""
    if url.scheme == "rediss+sentinel":
        # redis-py's Sentinel pools could take TLS, but neither the project's pools
        # nor a test do: refused, rather than plain text under a name that says TLS.
        raise ValueError(
            "rediss+sentinel:// is refused: TLS with Sentinel is not supported "
            "(redis+sentinel:// connects in plain text: a trusted network only)"
        )
    _check_scheme(url, "redis+sentinel")
    if url.query:
        raise ValueError(f"a Sentinel URL takes no option (got {', '.join(url.query)})")
    service, _, db = url.path.partition("/")
    if not service:
        raise ValueError("a Sentinel URL names its service: redis+sentinel://h:26379/mymaster")
    if not re.fullmatch(r"[0-9]*", db):
        raise ValueError(f"a Sentinel URL's database is a number: /{service}/<db>, not {db!r}")
    return service, int(db or 0)


def check_database_path(url: str) -> None:
    """A ``redis://`` or ``rediss://`` URL's path is empty or ``/<db>``: redis-py reads
    a number there and ignores anything else (``redis://h:6379/abc`` was database 0)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return  # unix://: the path is the socket's
    _check_encoded(parts)
    if not re.fullmatch(r"/?[0-9]*", unquote(parts.path)):
        raise ValueError(
            f"the Redis URL's path is its database number (/0, /1...), not {parts.path!r}"
        )
