"""Who may do what: the one decision every route of a topic asks for.

``Authorizer.check(scope, action, topics)`` reads the token (``Authorization:
Bearer``, else the ``broker_token`` cookie, else ``?access_token=``), verifies it
with PyJWT, and answers with a ``Grant`` or raises ``Unauthorized`` (401) or
``Forbidden`` (403). It is synchronous, because the lean stream path decides in
a protocol callback; ``prepare`` (async) first fetches a JWKS that lacks the
token's key, and every async caller awaits it before ``check``.

A token is never logged: errors name what is wrong with it, not what it is.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import parse_qs, unquote_plus

import jwt
from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import Scope

from api.keys import FixedKey, JwksKeys, UnknownKey, VerifyingKey
from api.own_origin import own_origin_verdict
from api.problems import Forbidden, KeysUnavailable, Unauthorized
from api.settings import Settings, split_list
from broker.policy import TopicPattern

Action = Literal["publish", "close", "delete", "subscribe"]
"""What a request does to its topics: closing and deleting take the right to publish."""
COOKIE_NAME = "broker_token"
QUERY_PARAMETER = "access_token"
QUERY_PARAMETER_BYTES = QUERY_PARAMETER.encode()
TOKEN_CACHE_SIZE = 4096
"""Verified tokens kept by their raw text: a subscriber reconnecting, or a publisher
sending many events, is verified once, not per request (measured: an HS256 verify
is ~43 us, a cached check ~2 us, against ~300 us of server CPU per publish)."""
KEYS_RETRY_AFTER_SECONDS = 5  # (JWKS_MIN_REFETCH_SECONDS: no fetch is tried sooner)
MAX_TOKEN_BYTES = 8192
QUERY_PART = re.compile(r"([?&;])([^&;\s]*)")
"""A part of a logged request target's query: ``name=value``, or whatever it is."""
NO_ORIGIN = (
    "a {action} by cookie without an Origin header: browsers name the page's origin on "
    "every POST and DELETE, so this is no browser's request, or one whose Origin was "
    "removed on its way (send the token in the Authorization header instead)"
)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a request was allowed: until when (unix seconds; None: no token, no end),
    and while what holds (``trusted``: its key still in the key set; None: always).
    ``keys_unavailable``: why its key set can judge no token now (a JWKS past its max
    stale), or None (``VerifyingKey.unavailable``; None: a fixed key, always can)."""

    expires_at: float | None
    trusted: Callable[[], bool] | None = None
    keys_unavailable: Callable[[], str | None] | None = None

    def lapsed(self) -> str | None:
        """Why a publish or an ingest under it must stop now (401), if it must. Raises
        ``KeysUnavailable`` (503) when it is its key set that can no longer judge the
        token's key: what a new request gets then, and its producer comes back once the
        set is fetched again (a 401 stopped its retries for good, its token still valid).
        An expired token is 401 whatever the set's state: its expiry was read from the
        token verified when the request began, no verdict of the set (a 503 had its
        producer come back with it, and get 503 again while the set stayed stale)."""
        if self.expires_at is not None and time.time() >= self.expires_at:
            return "the token expired"
        if self.trusted is None or self.trusted():
            return None
        if self.keys_unavailable is not None:
            unavailable = self.keys_unavailable()
            if unavailable is not None:
                raise KeysUnavailable(unavailable, retry_after=KEYS_RETRY_AFTER_SECONDS)
        return KEY_NOT_TRUSTED


OPEN = Grant(None)
KEY_NOT_TRUSTED = "the token's key was removed from the key set"
"""(A set not fetched again within BROKER_JWT_JWKS_MAX_STALE_SECONDS is no verdict on
the token: ``Grant.lapsed`` raises ``KeysUnavailable`` then.)"""


class TopicPatterns:
    """Topic patterns where ``*`` matches any run of characters, each matched in linear
    time (``broker.policy.TopicPattern``: a regular expression backtracked for seconds
    over a name a client chose)."""

    __slots__ = ("_exact", "_wild", "patterns")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        self._exact = frozenset(p for p in self.patterns if "*" not in p)
        self._wild = tuple(TopicPattern(p) for p in dict.fromkeys(self.patterns) if "*" in p)

    def allows(self, topic: str) -> bool:
        if topic in self._exact:
            return True
        for pattern in self._wild:  # (a loop, not ``any()`` of a generator: 0.4 µs less)
            if pattern.fullmatch(topic):
                return True
        return False

    @classmethod
    def parse(cls, comma_list: str) -> TopicPatterns:
        return cls(p.strip() for p in comma_list.split(",") if p.strip())


NOTHING = TopicPatterns(())


@dataclass(frozen=True, slots=True)
class Rights:
    """A verified token's claims, as the checks need them."""

    publish: TopicPatterns
    subscribe: TopicPatterns
    expires_at: float
    trusted: Callable[[], bool] | None = None  # (see VerifyingKey.trust_of)
    keys_unavailable: Callable[[], str | None] | None = None  # (VerifyingKey.unavailable)
    grant: Grant = field(init=False, repr=False, compare=False)
    """What a request these rights allow is granted: made once (a Grant is frozen), not
    for every request of the token."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "grant", Grant(self.expires_at, self.trusted, self.keys_unavailable)
        )


class Authorizer:
    """Decides, for every route of a topic, whether a request may go on."""

    def __init__(
        self,
        key: VerifyingKey | None,
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        public_topics: TopicPatterns = NOTHING,
        cors_origins: Sequence[str] = (),
    ) -> None:
        """``leeway``: seconds of clock skew allowed to ``exp`` and ``nbf`` (a stream ends
        that long after its token's ``exp``)."""
        self._key = key
        self._leeway = leeway
        self._origins = frozenset(cors_origins)
        self._fetches = isinstance(key, JwksKeys)  # a fixed key has nothing to prepare
        self._audience = audience
        self._issuer = issuer
        self._public = public_topics
        self._verified: OrderedDict[str, Rights] = OrderedDict()
        self._key_generation = key.generation if key is not None else 0
        required = ["exp", *(["aud"] if audience else []), *(["iss"] if issuer else [])]
        # ``iat`` is not checked: it only says when the token was made (RFC 7519), and
        # PyJWT refuses one in the future: an issuer a second ahead of this host made
        # tokens refused (401) until this host's clock caught up.
        self._options: Any = {
            "require": required,
            "verify_aud": audience is not None,
            "verify_iat": False,
        }

    @classmethod
    def from_settings(cls, settings: Settings) -> Authorizer:
        key: VerifyingKey | None = None
        if settings.jwt_secret is not None:
            key = FixedKey.secret(settings.jwt_secret.get_secret_value())
        elif settings.jwt_public_key is not None:
            key = FixedKey.public(settings.jwt_public_key)
        elif settings.jwt_jwks_url is not None:
            key = JwksKeys(
                settings.jwt_jwks_url, max_stale_seconds=settings.jwt_jwks_max_stale_seconds
            )
        return cls(
            key,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway=settings.jwt_leeway_seconds,
            public_topics=TopicPatterns.parse(settings.public_topics),
            cors_origins=split_list(settings.cors_origins),
        )

    @property
    def enabled(self) -> bool:
        return self._key is not None

    @property
    def prepares(self) -> bool:
        """Whether ``prepare`` may have anything to do (a JWKS): else ``check`` alone."""
        return self._fetches

    async def prepare(self, scope: Scope) -> None:
        """Fetch the key set if it lacks this request's token's key (JWKS only)."""
        if not self._fetches or self._key is None:
            return
        token = token_of(scope)
        if token is None or (token in self._verified and self._key.unavailable() is None):
            return  # (a set lapsed: a fetch is waited for, as for a token not verified)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return  # check() refuses it
        await self._key.ensure(header)

    def check(self, scope: Scope, action: Action, topics: Sequence[str]) -> Grant:
        """The grant of this request for ``action`` on every topic of ``topics``."""
        if self._key is None:
            return OPEN
        token, from_cookie = _token_and_source(scope)
        if token is None:
            if action == "subscribe" and all(self._public.allows(t) for t in topics):
                return OPEN
            raise Unauthorized(f"{action} on this topic needs a token", token_given=False)
        # A token given is judged wherever it goes, public topics too: served there
        # anyway, an expired or forged one looked valid to its client, which was never
        # told (401) to get a fresh one until it asked for a private topic.
        if from_cookie and action != "subscribe":
            self._refuse_forgery(scope, action)
        rights = self._rights(token)
        allowed = rights.subscribe if action == "subscribe" else rights.publish
        public = self._public if action == "subscribe" else NOTHING
        for topic in topics:  # (a loop: a list built for every request cost 0.5 µs)
            if not (allowed.allows(topic) or public.allows(topic)):
                refused = [t for t in topics if not (allowed.allows(t) or public.allows(t))]
                raise Forbidden(_not_allowed(action, refused))
        return rights.grant

    def check_given_token(self, scope: Scope) -> None:
        """For a request that needs no token (a listing: it shows what the caller may
        see): one given must still be valid, or its client is never told to get a new
        one (401), and sees only the public topics."""
        if self._key is None:
            return
        token = token_of(scope)
        if token is not None:
            self._rights(token)

    def subscribe_patterns(self, scope: Scope) -> tuple[str, ...] | None:
        """The patterns of every topic ``check`` lets this request subscribe to (None:
        any topic), for a listing to look only where those can be. Call it after
        ``check_given_token``, which refuses a token that is not valid."""
        if self._key is None:
            return None
        token = token_of(scope)
        own = self._rights(token).subscribe.patterns if token is not None else ()
        return (*own, *self._public.patterns)

    def _refuse_forgery(self, scope: Scope, action: Action) -> None:
        """A browser sends the cookie with any site's form or plain ``fetch`` (text/plain
        needs no preflight): a change by cookie must come from a page of a listed origin
        or of the broker itself. Browsers name the page's origin on every POST; without
        one, only a browser's own word that the page is the broker's is taken
        (``Sec-Fetch-Site``, which no page can set), else anything that strips the
        header (a proxy, an extension) would let any site's page through."""
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is None:
            if headers.get("sec-fetch-site") == "same-origin":
                return
            raise Forbidden(NO_ORIGIN.format(action=action))
        host, scheme = headers.get("host", ""), str(scope.get("scheme", "http"))
        if origin in self._origins or own_origin_verdict(origin, host, scheme):
            return
        own = f"{scheme}://{host}"
        raise Forbidden(
            f"a {action} by cookie from a page of {origin[:100]}, an origin neither the "
            f"broker's own ({own[:120]}) nor listed in BROKER_CORS_ORIGINS (send the "
            "token in the Authorization header instead)"
        )

    def _rights(self, token: str) -> Rights:
        assert self._key is not None
        self._key.refresh_if_stale()  # (a revoked key's verified tokens too)
        if self._key.generation != self._key_generation:  # a key was revoked: verify anew
            self._verified.clear()
            self._key_generation = self._key.generation
        rights = self._verified.get(token)
        if rights is None:
            rights = self._verify(token)
            self._verified[token] = rights
            if len(self._verified) > TOKEN_CACHE_SIZE:
                self._verified.popitem(last=False)
        else:
            if rights.expires_at <= time.time():
                # (its signature checked, its expiry known: 401 whatever the set's state
                # now, as an ingest under it is told; a 503 had its client come back
                # with the same token, and get 503 again while the set stayed stale)
                raise Unauthorized("the token has expired", token_given=True)
            self._refuse_if_keys_unavailable()  # (verified by a set that has lapsed since)
            self._verified.move_to_end(token)
        if rights.expires_at <= time.time():
            raise Unauthorized("the token has expired", token_given=True)
        return rights

    def _verify(self, token: str) -> Rights:
        assert self._key is not None
        try:
            header = jwt.get_unverified_header(token)
            self._refuse_if_keys_unavailable()  # (after the header: garbage is still a 401)
            key, algorithms = self._key.key_for(header)
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self._audience,
                issuer=self._issuer,
                options=self._options,
                leeway=self._leeway,
            )
        except jwt.ExpiredSignatureError as error:
            raise Unauthorized("the token has expired", token_given=True) from error
        except (UnknownKey, jwt.PyJWTError) as error:
            raise Unauthorized(f"invalid token: {error}", token_given=True) from error
        rights = rights_of(claims)
        return replace(
            rights,
            expires_at=rights.expires_at + self._leeway,  # (every later check of it too)
            trusted=self._key.trust_of(header),
            keys_unavailable=self._key.unavailable if self._fetches else None,
        )

    def _refuse_if_keys_unavailable(self) -> None:
        """No verdict on a token while there are no keys to trust (a JWKS never fetched,
        or not fetched again within its max stale): 503, not a 401 that would stop an
        EventSource for good, and a producer's retries."""
        assert self._key is not None
        why = self._key.unavailable()
        if why is not None:
            raise KeysUnavailable(why, retry_after=KEYS_RETRY_AFTER_SECONDS)


def _not_allowed(action: Action, refused: Sequence[str]) -> str:
    """Why a token is refused: the action, and the right it lacks when that is another's."""
    topics = ", ".join(refused[:5])
    if action in ("close", "delete"):
        return f"the token does not allow {action} (the right to publish) on {topics}"
    return f"the token does not allow {action} on {topics}"


async def authorize(scope: Scope, action: Action, topics: Sequence[str]) -> Grant:
    """The grant of a request to an async route (its app's ``Authorizer``); raises
    ``Unauthorized`` or ``Forbidden``. Streams call ``check`` in ``stream_starts``."""
    authorizer: Authorizer = scope["app"].state.authorizer
    if authorizer.prepares:  # (a coroutine awaited for nothing costs every request)
        await authorizer.prepare(scope)
    return authorizer.check(scope, action, topics)


def rights_of(claims: dict[str, Any]) -> Rights:
    """The ``broker`` claim, ``{"publish": [patterns], "subscribe": [patterns]}``."""
    claim = claims.get("broker", {})
    if not isinstance(claim, dict):
        raise Unauthorized("invalid token: the broker claim is not an object", token_given=True)
    return Rights(
        publish=_patterns(claim, "publish"),
        subscribe=_patterns(claim, "subscribe"),
        expires_at=_expiry_of(claims),
    )


def _expiry_of(claims: dict[str, Any]) -> float:
    """``exp`` as a time: PyJWT checked it as an integer, which may be past any float
    (``10**400``: every request carrying it was a 500). A NumericDate is a JSON number
    (RFC 7519): PyJWT takes ``"exp": "1795904000"`` by ``int()``, a string, refused here."""
    exp = claims["exp"]
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise Unauthorized("invalid token: exp is not a number", token_given=True)
    try:
        return float(exp)
    except (OverflowError, TypeError, ValueError):
        raise Unauthorized("invalid token: exp is out of range", token_given=True) from None


def _patterns(claim: dict[str, Any], action: str) -> TopicPatterns:
    patterns = claim.get(action, [])
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise Unauthorized(f"invalid token: broker.{action} is not a list", token_given=True)
    return TopicPatterns(patterns)


def token_of(scope: Scope) -> str | None:
    """The request's token: ``Authorization: Bearer``, else the cookie, else the query."""
    return _token_and_source(scope)[0]


def _token_and_source(scope: Scope) -> tuple[str | None, bool]:
    """The request's token, and whether it came from the cookie."""
    cookie = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return _bounded(credentials.strip()), False
        elif name == b"cookie":
            cookie = cookie_parser(value.decode("latin-1")).get(COOKIE_NAME) or cookie
    if cookie:
        return _bounded(cookie), True
    query = scope.get("query_string", b"")
    # (access%5Ftoken is the same name. ``find``, not ``in``: on bytes, ``in`` first
    # tries its operand as an int and builds a TypeError it throws away, ~0.35 µs.)
    if query.find(QUERY_PARAMETER_BYTES) >= 0 or query.find(b"%") >= 0:
        found = parse_qs(query.decode("latin-1")).get(QUERY_PARAMETER)
        if found and found[-1]:
            return _bounded(found[-1]), False
    return None, False


def _bounded(token: str) -> str:
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthorized("invalid token: too long", token_given=True)
    return token


def redact_tokens(text: str) -> str:
    """``text`` (a logged request target) with any ``access_token`` value hidden: the
    parameter's name is compared decoded (``access%5Ftoken`` is the same parameter to
    the query parser that finds the token)."""
    if "access_token" not in text.lower() and "%" not in text:
        return text
    return QUERY_PART.sub(_redacted_part, text)


def _redacted_part(part: re.Match[str]) -> str:
    # Any part holding the name, decoded, not only the exact pair: ``access_token+=``
    # (a name with a space) or ``access_token%3D<token>`` (no ``=`` at all: one name)
    # is no token to the parser, so it was refused, and was logged whole (audit).
    name, equals, _ = part.group(2).partition("=")
    if QUERY_PARAMETER not in unquote_plus(name).lower():
        return part.group(0)
    if not equals:
        return f"{part.group(1)}[redacted]"
    return f"{part.group(1)}{name}=[redacted]"
