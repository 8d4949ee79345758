"""The authorization decision as pure logic: patterns, token sources, key algorithms."""

from __future__ import annotations

import time
from typing import Any

import pytest

from api import own_origin
from api.auth import (
    OPEN,
    Authorizer,
    Grant,
    TopicPatterns,
    redact_tokens,
    token_of,
)
from api.keys import FixedKey, algorithms_for, hmac_algorithms, keys_of
from api.own_origin import (
    LONGEST_ORIGIN_KEPT,
    ORIGIN_VERDICTS_KEPT,
    is_own_origin,
    own_origin_verdict,
)
from api.problems import Forbidden, Unauthorized
from tests.support.tokens import SECRET, KeyPair, claims, hs_token


def scope(headers: dict[str, str] | None = None, query: str = "") -> dict[str, Any]:
    pairs = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"headers": pairs, "query_string": query.encode()}


@pytest.mark.parametrize(
    ("patterns", "topic", "allowed"),
    [
        (["orders"], "orders", True),
        (["orders"], "orders2", False),
        (["orders.*"], "orders.42", True),
        (["orders.*"], "orders.", True),
        (["orders.*"], "orders", False),
        (["*"], "anything", True),
        (["user:*:feed"], "user:7:feed", True),
        (["user:*:feed"], "user:7:feed:x", False),
        (["a.b"], "aXb", False),  # "." is a character, not a regex
        (["x-*", "y"], "y", True),
        ([], "t", False),
    ],
)
def test_topic_patterns(patterns: list[str], topic: str, allowed: bool) -> None:
    assert TopicPatterns(patterns).allows(topic) is allowed


def test_token_sources_in_order() -> None:
    both = {"Authorization": "Bearer from-header", "Cookie": "a=1; broker_token=from-cookie"}
    assert token_of(scope(both, "access_token=from-query")) == "from-header"
    cookie = {"Authorization": "Basic dXNlcjpwYXNz", "Cookie": "broker_token=from-cookie"}
    assert token_of(scope(cookie, "access_token=from-query")) == "from-cookie"
    assert token_of(scope({}, "x=1&access_token=from-query")) == "from-query"
    assert token_of(scope({"Authorization": "bearer lower"})) == "lower"
    assert token_of(scope({})) is None


def test_redact_tokens() -> None:
    assert redact_tokens("/t/events?a=1&access_token=abc.def&b=2") == (
        "/t/events?a=1&access_token=[redacted]&b=2"
    )
    assert redact_tokens("/t/events?access_token%3Dabc.def&b=2") == "/t/events?[redacted]&b=2"
    assert redact_tokens("/t/events?b=access_token&c=1") == "/t/events?b=access_token&c=1"
    assert redact_tokens("/healthz") == "/healthz"


def test_hmac_algorithms_follow_the_secret_length() -> None:
    assert hmac_algorithms(b"x" * 32) == ["HS256"]
    assert hmac_algorithms(b"x" * 48) == ["HS256", "HS384"]
    assert hmac_algorithms(b"x" * 64) == ["HS256", "HS384", "HS512"]


def test_public_key_algorithms_follow_the_key_type() -> None:
    assert algorithms_for(KeyPair.ec().private.public_key()) == ["ES256"]
    assert "HS256" not in algorithms_for(KeyPair.rsa().private.public_key())


def test_a_jwks_never_yields_a_symmetric_key() -> None:
    rsa_key = KeyPair.rsa("r")
    document = {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}, rsa_key.jwk()]}
    assert set(keys_of(document)) == {"r"}


def test_a_jwk_alg_narrows_its_algorithms() -> None:
    jwk = KeyPair.rsa("r").jwk() | {"alg": "PS256"}
    assert keys_of({"keys": [jwk]})["r"][1] == ["PS256"]


def _authorizer(public: list[str] | None = None) -> Authorizer:
    return Authorizer(FixedKey.secret(SECRET), public_topics=TopicPatterns(public or []))


def _bearer(payload: dict[str, Any]) -> dict[str, Any]:
    return scope({"Authorization": f"Bearer {hs_token(payload)}"})


def test_the_decision() -> None:
    authorizer = _authorizer(["pub-*"])
    exp = int(time.time()) + 60
    token = _bearer({"exp": exp, "broker": {"publish": ["a"], "subscribe": ["a", "b-*"]}})
    assert authorizer.check(token, "subscribe", ["a", "b-1"]).expires_at == exp
    assert authorizer.check(token, "subscribe", ["pub-x", "a"]).expires_at == exp
    assert authorizer.check(scope(), "subscribe", ["pub-x"]) is OPEN
    with pytest.raises(Forbidden):
        authorizer.check(token, "subscribe", ["a", "c"])
    with pytest.raises(Forbidden):
        authorizer.check(token, "publish", ["b-1"])
    with pytest.raises(Unauthorized):
        authorizer.check(scope(), "publish", ["pub-x"])


def test_a_refusal_names_every_topic_refused_and_a_grant_is_the_tokens() -> None:
    """The topics are checked in a loop that stops at the first refused, then listed:
    the list is every one refused, in order; a grant, made once per verified token,
    has its expiry and its key's trust."""
    authorizer = _authorizer()
    exp = int(time.time()) + 60
    token = _bearer({"exp": exp, "broker": {"publish": ["a", "b-*"]}})
    with pytest.raises(Forbidden, match=r"on c, d-1$"):
        authorizer.check(token, "publish", ["a", "c", "b-2", "d-1"])
    first = authorizer.check(token, "publish", ["a", "b-2"])
    assert first == Grant(float(exp), None)
    assert authorizer.check(token, "publish", ["b-3"]) is first


def test_a_cached_token_still_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    authorizer = _authorizer()
    exp = int(time.time()) + 60
    token = _bearer({"exp": exp, "broker": {"subscribe": ["a"]}})
    authorizer.check(token, "subscribe", ["a"])
    monkeypatch.setattr(time, "time", lambda: exp + 1.0)
    with pytest.raises(Unauthorized, match="expired"):
        authorizer.check(token, "subscribe", ["a"])


def test_an_expiry_past_any_time_is_an_invalid_token() -> None:
    token = _bearer({"exp": 10**400, "broker": {"subscribe": ["a"]}})
    with pytest.raises(Unauthorized, match="exp is out of range"):
        _authorizer().check(token, "subscribe", ["a"])


def test_an_expiry_that_is_no_json_number_is_an_invalid_token() -> None:
    """RFC 7519's NumericDate is a number: PyJWT took a string of digits by int()."""
    soon = str(int(time.time()) + 600)
    token = _bearer({"exp": soon, "broker": {"subscribe": ["a"]}})
    with pytest.raises(Unauthorized, match="exp is not a number"):
        _authorizer().check(token, "subscribe", ["a"])


def test_off_without_a_key() -> None:
    assert Authorizer(None).check(scope(), "publish", ["t"]) is OPEN


def test_a_token_made_by_an_issuer_whose_clock_is_ahead_is_accepted() -> None:
    """``iat`` only says when the token was made: PyJWT refused one in the future, so a
    token fresh from an issuer a second ahead of this host was a 401 (and an
    ``EventSource`` given it gave up for good)."""
    now = int(time.time())
    token = _bearer({"iat": now + 5, "exp": now + 60, "broker": {"subscribe": ["a"]}})
    assert _authorizer().check(token, "subscribe", ["a"]).expires_at == now + 60


def test_the_leeway_allows_skew_on_exp_and_nbf_and_ends_streams_that_much_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = int(time.time())
    early = _bearer({"nbf": now + 3, "exp": now + 60, "broker": {"subscribe": ["a"]}})
    late = _bearer({"exp": now - 3, "broker": {"subscribe": ["a"]}})
    strict = _authorizer()
    for token in (early, late):
        with pytest.raises(Unauthorized):
            strict.check(token, "subscribe", ["a"])
    lenient = Authorizer(FixedKey.secret(SECRET), leeway=5)
    assert lenient.check(early, "subscribe", ["a"]).expires_at == now + 65
    assert lenient.check(late, "subscribe", ["a"]).expires_at == now + 2
    monkeypatch.setattr(time, "time", lambda: now + 2.0)
    with pytest.raises(Unauthorized, match="expired"):
        lenient.check(late, "subscribe", ["a"])


# -- a publish by cookie: whose page it comes from --------------------------------------------


def _scope_sent_to(
    host: str, scheme: str = "http", headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """A request's scope: its Host, the scheme uvicorn gave it, more headers."""
    return scope({"Host": host} | (headers or {})) | {"scheme": scheme}


@pytest.mark.parametrize(
    ("origin", "host", "scheme", "own"),
    [
        ("http://broker.test", "broker.test", "http", True),
        ("http://broker.test", "broker.test:80", "http", True),
        ("https://broker.test", "broker.test:443", "https", True),
        ("https://broker.test:8443", "broker.test:8443", "https", True),
        ("http://[::1]:8000", "[::1]:8000", "http", True),
        ("http://BROKER.test", "broker.TEST", "http", True),  # (host names have no case)
        ("http://broker.test", "broker.test", "https", False),  # a page in the clear
        ("http://broker.test", "broker.test:8000", "http", False),
        ("http://[::1]:8000", "[::1]:8001", "http", False),
        ("http://broker.test.evil", "broker.test", "http", False),
        # Only an origin as a browser writes it: no path, no user, a port that is a number.
        ("http://broker.test/", "broker.test", "http", False),
        ("http://user@broker.test", "broker.test", "http", False),
        ("http://broker.test:http", "broker.test", "http", False),
        ("ftp://broker.test", "broker.test", "http", False),
        ("null", "broker.test", "http", False),
        # A Host that names no place: never the page's (the host alone took "null" with no
        # Host as the broker's own: both ""); one with a user in it is not its host.
        ("null", "", "http", False),
        ("http://broker.test", "", "http", False),
        ("http://broker.test", "evil@broker.test", "http", False),
        ("http://broker.test", "broker.test/x", "http", False),
        ("https://broker.test", "broker.test", "wss", False),  # (no scheme of a page's)
    ],
)
def test_the_brokers_own_origin(origin: str, host: str, scheme: str, own: bool) -> None:
    assert is_own_origin(origin, host, scheme) is own


@pytest.mark.parametrize(
    ("origin", "host", "own"),
    [
        ("https://broker.test", "broker.test", True),  # (443: the page's scheme's port)
        ("https://broker.test:8443", "broker.test:8443", True),
        ("https://broker.test", "broker.test:80", False),
        ("https://broker.test:8443", "broker.test", False),
    ],
)
def test_a_page_on_https_is_the_brokers_own_when_the_broker_sees_http(
    origin: str, host: str, own: bool
) -> None:
    """Behind a proxy ending TLS that uvicorn does not trust (FORWARDED_ALLOW_IPS), the
    scope says http whatever the browser used: the broker's own https page is taken;
    the reverse, an http page for a broker seen on https, never is."""
    assert is_own_origin(origin, host, "http") is own


def test_remembered_verdicts_of_the_brokers_own_origin_are_bounded_and_the_same() -> None:
    """The forgery check remembers its verdicts (parsing the two origins was most of it),
    never more than a few: any page may send any Origin, one per request."""
    own_origin._remembered_own_origin.cache_clear()
    pairs = [("http://broker.test", "broker.test"), ("https://evil.test", "broker.test")]
    for origin, host in pairs * 2:  # (the second time, remembered)
        assert own_origin_verdict(origin, host, "http") is is_own_origin(origin, host, "http")
    assert own_origin._remembered_own_origin.cache_info().hits == len(pairs)
    assert own_origin_verdict("http://broker.test", "broker.test", "http") is True
    assert own_origin_verdict("https://evil.test", "broker.test", "http") is False
    for n in range(ORIGIN_VERDICTS_KEPT * 4):
        assert not own_origin_verdict(f"https://evil-{n}.test", "broker.test", "http")
    assert own_origin._remembered_own_origin.cache_info().currsize == ORIGIN_VERDICTS_KEPT
    long_origin = "https://" + "e" * LONGEST_ORIGIN_KEPT + ".test"
    before = own_origin._remembered_own_origin.cache_info()
    assert not own_origin_verdict(long_origin, "broker.test", "http")
    assert own_origin._remembered_own_origin.cache_info() == before, "a long pair is not kept"


def _cookie_publish(headers: dict[str, str], scheme: str = "http") -> dict[str, Any]:
    """A publish to ``t`` by cookie, sent to broker.test."""
    cookie = {"Cookie": f"broker_token={hs_token(claims(publish=['t']))}"}
    return _scope_sent_to("broker.test", scheme, cookie | headers)


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({"Origin": "http://broker.test"}, True),
        ({"Origin": "https://app.test"}, True),  # (listed)
        ({"Origin": "https://evil.test"}, False),
        ({}, False),
        ({"Sec-Fetch-Site": "same-origin"}, True),
        ({"Sec-Fetch-Site": "same-site"}, False),
        ({"Sec-Fetch-Site": "cross-site"}, False),
        ({"Sec-Fetch-Site": "none"}, False),
        ({"Origin": "https://evil.test", "Sec-Fetch-Site": "same-origin"}, False),
    ],
)
def test_a_publish_by_cookie_comes_from_a_page_of_the_broker_or_a_listed_origin(
    headers: dict[str, str], allowed: bool
) -> None:
    authorizer = Authorizer(FixedKey.secret(SECRET), cors_origins=["https://app.test"])
    sent = _cookie_publish(headers)
    if allowed:
        authorizer.check(sent, "publish", ["t"])
        return
    with pytest.raises(Forbidden, match="Authorization header"):
        authorizer.check(sent, "publish", ["t"])


@pytest.mark.parametrize("action", ["publish", "close", "delete"])
def test_a_refusal_names_the_action_refused(action: Any) -> None:
    """Closing and deleting take the right to publish; their refusals name them."""
    authorizer = Authorizer(FixedKey.secret(SECRET))
    reader = {"Authorization": f"Bearer {hs_token(claims(subscribe=['t']))}"}
    with pytest.raises(Forbidden, match=f"does not allow {action}"):
        authorizer.check(scope(reader), action, ["t"])
    with pytest.raises(Unauthorized, match=f"^{action} on this topic needs a token"):
        authorizer.check(scope(), action, ["t"])
    for sent in ({"Origin": "https://evil.test"}, {}):
        with pytest.raises(Forbidden, match=f"^a {action} by cookie "):
            authorizer.check(_cookie_publish(sent), action, ["t"])


def test_a_refusal_says_which_origin_the_broker_took_for_its_own() -> None:
    """Behind a proxy the broker does not trust, or one that rewrites Host, the answer
    tells an operator what the broker saw."""
    sent = _cookie_publish({"Origin": "http://broker.test"}, "https")
    with pytest.raises(Forbidden, match=r"broker's own \(https://broker\.test\)"):
        Authorizer(FixedKey.secret(SECRET)).check(sent, "publish", ["t"])
    with pytest.raises(Forbidden, match="without an Origin header"):
        Authorizer(FixedKey.secret(SECRET)).check(_cookie_publish({}), "publish", ["t"])
