"""The keys that verify tokens, and the algorithms each key may verify.

The algorithms follow from the key, never from the token: a token's ``alg``
header only picks among the algorithms its key allows. That shuts out
``alg: none`` and algorithm confusion (an RS256 public key taken as an HS256
secret, which anyone holding the public key could sign with).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt import PyJWK, PyJWTError

log = logging.getLogger(__name__)

MIN_SECRET_BYTES = 32
"""RFC 7518 3.2: an HS256 key at least as long as its hash (HS384: 48, HS512: 64)."""
HMAC_ALGORITHMS = (("HS256", 32), ("HS384", 48), ("HS512", 64))
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
RSA_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
JWKS_MIN_REFETCH_SECONDS = 5.0
"""At most one JWKS fetch this often: tokens with made-up ``kid`` cannot hammer it."""
JWKS_MAX_AGE_SECONDS = 300.0
"""A fetched key set is fetched again after this long (keys removed from it stop working)."""
JWKS_MAX_STALE_SECONDS = 900.0
"""How long a key set is trusted after its last successful fetch, fetches failing since
(``BROKER_JWT_JWKS_MAX_STALE_SECONDS``). Kept for ever, whoever could block the key server
kept a key removed from the set (leaked, revoked) working for ever. 15 min: peers bound it
too (Envoy's jwt_authn and panva/jose drop a set 10 min after its last fetch); refetched
every 5 min, a set rides out a key server down for 10 min (a fetch tried each 5 s)."""
JWKS_FAILING_REMINDER_SECONDS = 60.0
"""While fetches of the key set keep failing, the log says so again this often at most
(a failed fetch is tried again every JWKS_MIN_REFETCH_SECONDS while requests come: a
warning for each filled the log with a line every 5 s for as long as its server was down)."""
JWKS_SHORTEST_MAX_STALE_SECONDS = 2 * JWKS_MIN_REFETCH_SECONDS
"""A set is fetched again at half its max stale (at most): below twice the rate bound, a
key server answering could not be asked again before the set lapsed."""
JWKS_TIMEOUT_SECONDS = 5.0
"""A fetch of the key set, whole (a server sending a byte now and then included), and a
request's wait for it, end within this (each read within it too)."""
JWKS_MAX_BYTES = 1024 * 1024


class UnknownKey(Exception):
    """A token's key cannot be found or used (the token is then refused with 401)."""


class ConfigError(ValueError):
    """A key setting that cannot be used: the broker refuses to start."""


class InsecureRedirect(Exception):
    """The key set's https URL redirected to a plain http one: the fetch fails there."""


class VerifyingKey(Protocol):
    """Where a token's verifying key comes from: a fixed key, or a fetched key set."""

    def key_for(self, header: dict[str, Any]) -> tuple[Any, list[str]]:
        """The key for a token with this header, and the algorithms it may verify."""

    async def ensure(self, header: dict[str, Any]) -> None:
        """Make ``key_for`` ready for a token with this header (a JWKS may fetch)."""

    def refresh_if_stale(self) -> None:
        """Start fetching the keys again if they are due (a JWKS), without waiting:
        every check calls it, the synchronous ones of the lean stream path too."""

    @property
    def generation(self) -> int:
        """Moves on whenever a key was removed or replaced: tokens verified before may no
        longer be valid."""

    def unavailable(self) -> str | None:
        """Why no token can be judged now (a JWKS never fetched, or not fetched again for
        longer than its max stale), or None: there are keys to judge it by."""

    def trust_of(self, header: dict[str, Any]) -> Callable[[], bool] | None:
        """For a token of this header just verified: a check, to be made again while its
        stream or ingest lasts, that its key is still trusted (None: it always is)."""


def algorithms_for(key: Any) -> list[str]:
    """The asymmetric algorithms a public key verifies, from its type alone."""
    if isinstance(key, rsa.RSAPublicKey):
        return list(RSA_ALGORITHMS)
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = EC_ALGORITHMS.get(key.curve.name)
        if algorithm is None:
            raise ConfigError(f"unsupported elliptic curve {key.curve.name}")
        return [algorithm]
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ["EdDSA"]
    raise ConfigError(f"unsupported public key type {type(key).__name__}")


def hmac_algorithms(secret: bytes) -> list[str]:
    """HS256/384/512 as far as the secret is long enough for each (RFC 7518 3.2)."""
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"the secret must be at least {MIN_SECRET_BYTES} bytes")
    return [name for name, length in HMAC_ALGORITHMS if len(secret) >= length]


def load_public_key(value: str) -> Any:
    """A public key from PEM text, or from the path of a PEM file."""
    text = value
    if not value.lstrip().startswith("-----BEGIN"):
        try:
            text = Path(value).read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read the key file {value!r}: {error}") from error
    try:
        key = load_pem_public_key(text.encode())
    except (ValueError, TypeError) as error:
        raise ConfigError(f"not a PEM public key: {error}") from error
    algorithms_for(key)  # refuses a key type no JWT algorithm uses
    return key


class FixedKey:
    """A secret (HS*) or a public key (RS*/PS*/ES*/EdDSA), set in the configuration."""

    generation = 0  # a fixed key never changes

    def __init__(self, key: Any, algorithms: list[str]) -> None:
        self._key = key
        self._algorithms = algorithms

    @classmethod
    def secret(cls, secret: str) -> FixedKey:
        raw = secret.encode()
        return cls(raw, hmac_algorithms(raw))

    @classmethod
    def public(cls, pem_or_path: str) -> FixedKey:
        key = load_public_key(pem_or_path)
        return cls(key, algorithms_for(key))

    def key_for(self, header: dict[str, Any]) -> tuple[Any, list[str]]:
        return self._key, self._algorithms

    async def ensure(self, header: dict[str, Any]) -> None:
        return None

    def refresh_if_stale(self) -> None:
        return None

    def unavailable(self) -> str | None:
        return None

    def trust_of(self, header: dict[str, Any]) -> Callable[[], bool] | None:
        """A fixed key is never removed: nothing to look at later."""
        return None


class FetchFailures:
    """What the log says of a key set's fetches failing: one warning when they begin to
    fail (with the reason), a reminder at most every ``reminder_seconds`` while they go
    on failing (since when), and one info line once a fetch succeeds again."""

    def __init__(
        self,
        url: str,
        *,
        reminder_seconds: float = JWKS_FAILING_REMINDER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._reminder = reminder_seconds
        self._clock = clock
        self._since: float | None = None  # (clock) the first failure of this run; None: none
        self._since_utc = ""  # (the same, for the reader of the log)
        self._told_at = 0.0
        self._count = 0

    def failed(self, reason: BaseException) -> None:
        now = self._clock()
        self._count += 1
        if self._since is None:
            self._since, self._told_at = now, now
            self._since_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            log.warning(
                "JWKS fetch from %s failed: %s (tried again at most every %g s; said again "
                "at most every %g s while it keeps failing)",
                self._url,
                reason,
                JWKS_MIN_REFETCH_SECONDS,
                self._reminder,
            )
        elif now - self._told_at >= self._reminder:
            self._told_at = now
            log.warning(
                "JWKS fetch from %s still failing, since %s (%.0f s, %d attempts): %s",
                self._url,
                self._since_utc,
                now - self._since,
                self._count,
                reason,
            )

    def succeeded(self) -> None:
        if self._since is None:
            return
        log.info(
            "JWKS fetch from %s succeeded again, after failing since %s (%.0f s, %d attempts)",
            self._url,
            self._since_utc,
            self._clock() - self._since,
            self._count,
        )
        self._since, self._count = None, 0


class JwksKeys:
    """A JSON Web Key Set fetched from a URL, cached, and fetched again for an unknown
    ``kid`` (key rotation) or once stale, never more often than the rate bound; trusted
    for ``max_stale_seconds`` after its last successful fetch, no longer."""

    def __init__(
        self,
        url: str,
        *,
        min_refetch_seconds: float = JWKS_MIN_REFETCH_SECONDS,
        max_age_seconds: float = JWKS_MAX_AGE_SECONDS,
        max_stale_seconds: float = JWKS_MAX_STALE_SECONDS,
    ) -> None:
        self._url = url
        self._min_refetch = min_refetch_seconds
        # (fetched again by half its max stale at most: the rest is left for retries)
        self._max_age = min(max_age_seconds, max_stale_seconds / 2)
        self._max_stale = max_stale_seconds
        self._keys: dict[str | None, tuple[Any, list[str]]] = {}
        self._fetched_at: float | None = None  # monotonic; None: never fetched
        self._tried_at = -float("inf")
        self._fetching: asyncio.Task[None] | None = None
        self._lapse_told = False  # (the log says once that the set lapsed, not per request)
        self._failures = FetchFailures(url)
        self.generation = 0

    def key_for(self, header: dict[str, Any]) -> tuple[Any, list[str]]:
        kid = header.get("kid")
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))  # a set of one key: no kid needed
        found = self._keys.get(kid) if isinstance(kid, str) else None
        if found is None:
            raise UnknownKey("the token's key (kid) is not in the key set")
        return found

    async def ensure(self, header: dict[str, Any]) -> None:
        """Fetch the set if it lacks this token's key, and wait for it; refresh a stale
        set in the background. Requests that come while a fetch runs wait for that one."""
        known = self._knows(header) and self.unavailable() is None
        if known and not self._stale():
            return
        fetching = self._start_fetch()
        if fetching is not None and not known:
            # (a slow key server must not hold requests: they wait this long at most)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(fetching), JWKS_TIMEOUT_SECONDS)

    @property
    def loaded(self) -> bool:
        """Whether a key set was ever fetched (``unavailable`` says whether it may be used)."""
        return self._fetched_at is not None

    def unavailable(self) -> str | None:
        """Why no token can be judged: the set never fetched, or fetched last longer ago
        than its max stale (its keys no longer trusted: one removed from the set since,
        its server blocked, would work on). ``api.auth`` answers 503, not 401."""
        if self._fetched_at is None:
            return "the key set (BROKER_JWT_JWKS_URL) could not be fetched yet"
        age = time.monotonic() - self._fetched_at
        if age <= self._max_stale:
            return None
        why = (
            f"the key set (BROKER_JWT_JWKS_URL) could not be fetched again for {age:.0f} s, "
            f"over BROKER_JWT_JWKS_MAX_STALE_SECONDS={self._max_stale:g}: its keys are no "
            "longer trusted"
        )
        if not self._lapse_told:
            self._lapse_told = True
            log.warning("JWKS: %s; requests with a token get 503 until a fetch succeeds", why)
        return why

    def refresh_if_stale(self) -> None:
        """A stale set is fetched again in the background. Without this, a process that
        only served lean streams (whose check is synchronous: no ``ensure``), or only
        tokens it had verified already, never fetched again: a key removed from the
        set went on working for good."""
        if self._fetched_at is not None and self._stale():
            self._start_fetch()

    def trust_of(self, header: dict[str, Any]) -> Callable[[], bool] | None:
        """Whether the key that verified a token of this ``header`` is still in the set,
        asked again later (the set refetched once stale): a stream or an ingest opened
        with a key since removed from the set (compromised, retired) ends then,
        not at its token's expiry."""
        verified = self.key_for(header)[0]

        def trusted() -> bool:
            # The key itself, wherever it is in the set: a token without a kid is
            # resolved by the set's size, and a key added beside its own ended it. A set
            # past its max stale trusts no key: its streams end, their reconnects told
            # to come back (503), as new requests are.
            self.refresh_if_stale()
            if self.unavailable() is not None:
                return False
            return any(key == verified for key, _ in self._keys.values())

        return trusted

    def _knows(self, header: dict[str, Any]) -> bool:
        kid = header.get("kid")
        return kid in self._keys or (kid is None and len(self._keys) == 1)

    def _stale(self) -> bool:
        return self._fetched_at is None or time.monotonic() - self._fetched_at > self._max_age

    def _start_fetch(self) -> asyncio.Task[None] | None:
        """The fetch under way, or a new one; None while the rate bound holds."""
        if self._fetching is None and time.monotonic() - self._tried_at >= self._min_refetch:
            self._tried_at = time.monotonic()
            self._fetching = asyncio.get_running_loop().create_task(self._fetch())
            self._fetching.add_done_callback(self._fetched)
        return self._fetching

    def _fetched(self, task: asyncio.Task[None]) -> None:
        self._fetching = None
        failure = None if task.cancelled() else task.exception()
        if failure is not None:
            self._failures.failed(failure)

    async def _fetch(self) -> None:
        document = await _get_json(self._url)
        keys = keys_of(document)
        if any(keys.get(kid) != key for kid, key in self._keys.items()):
            self.generation += 1  # a key revoked or replaced: tokens it signed go too
        self._keys = keys
        self._fetched_at = time.monotonic()
        self._failures.succeeded()
        log.info("JWKS: %d key(s) from %s", len(self._keys), self._url)
        if self._lapse_told:
            self._lapse_told = False
            log.warning("JWKS: fetched again: tokens are judged by its keys again")


def keys_of(document: Any) -> dict[str | None, tuple[Any, list[str]]]:
    """The usable public keys of a JWKS document, by ``kid``, with their algorithms.

    Symmetric (``oct``) keys are skipped: a key set served over HTTP is public, and a
    secret in it would let anyone sign. So are keys for another use than signatures.
    """
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError('not a JWKS document (no "keys" list)')
    keys: dict[str | None, tuple[Any, list[str]]] = {}
    for entry in entries:
        usable = _usable(entry) if isinstance(entry, dict) else None
        if usable is not None:
            keys[entry.get("kid")] = usable
    return keys


def _usable(entry: dict[str, Any]) -> tuple[Any, list[str]] | None:
    if entry.get("kty") == "oct" or entry.get("use", "sig") != "sig":
        return None
    try:
        key = PyJWK(entry).key
        algorithms = algorithms_for(key)
    except (PyJWTError, ConfigError):
        return None
    declared = entry.get("alg")  # a key may pin one algorithm: never widen it
    if declared is not None:
        algorithms = [name for name in algorithms if name == declared]
    return (key, algorithms) if algorithms else None


@functools.cache
def _system_tls() -> ssl.SSLContext:
    """The system's certificate store, as urllib used (httpx's own default is certifi's
    list alone: a key server under a private CA the host trusts was refused), built
    once (building it for each fetch took 17 ms of the event loop)."""
    return ssl.create_default_context()


def _proxy_for(url: str) -> str | None:
    """The proxy urllib would use for ``url`` (``*_proxy``, ``no_proxy``): httpx reads
    the environment by its own rules (``ALL_PROXY`` too, a SOCKS one failing)."""
    host = urlsplit(url).hostname or ""
    if urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(urlsplit(url).scheme)


def _refusing_downgrade_from(url: str) -> Callable[[httpx.Request], Awaitable[None]]:
    """A check of each request of a fetch from ``url``, redirects included (httpx calls
    a request hook before sending each): one of an https fetch that leaves https is
    refused before it is sent. Followed, anyone on the network path of the plain request
    (which nothing authenticates) could answer it with keys of their own, and sign any
    token the broker would take. Redirects that stay on https, or go from http to https,
    are followed: they are no weaker than the URL configured. (Not every redirect to
    another scheme is refused: an http URL's upgrade to https is the usual one.)"""
    secure = urlsplit(url).scheme == "https"

    async def refuse_downgrade(request: httpx.Request) -> None:
        if secure and request.url.scheme != "https":
            target = str(request.url)[:200]
            raise InsecureRedirect(f"refused a redirect from https to {target} (not https)")

    return refuse_downgrade


async def _get_json(url: str) -> Any:
    """The document at ``url``, all of it read within JWKS_TIMEOUT_SECONDS (urllib's
    timeout was per read: a server sending a byte of its head or body every 2 s
    held a fetch for hours, and no other could start), at most JWKS_MAX_BYTES of it.
    On the event loop, so that a fetch given up on is over, not a thread left
    blocked in a read."""
    body = bytearray()
    async with asyncio.timeout(JWKS_TIMEOUT_SECONDS):
        async with httpx.AsyncClient(
            follow_redirects=True,
            timeout=JWKS_TIMEOUT_SECONDS,
            verify=_system_tls(),
            trust_env=False,  # (a proxy as urllib picked one, not httpx's own rules)
            proxy=_proxy_for(url),
            event_hooks={"request": [_refusing_downgrade_from(url)]},
        ) as client:
            headers = {"Accept": "application/json"}
            async with client.stream("GET", url, headers=headers) as response:
                response.raise_for_status()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > JWKS_MAX_BYTES:
                        break
    return orjson.loads(bytes(body[:JWKS_MAX_BYTES]))
