"""Asymmetric keys through a real ``broker serve``: a public key from a PEM file, and
a JWKS served by a local HTTP server (fetched, cached, fetched again for an
unknown ``kid``, never more often than its rate bound)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from api.keys import JWKS_MIN_REFETCH_SECONDS, JWKS_SHORTEST_MAX_STALE_SECONDS
from tests.http.helpers import raw_request
from tests.http.test_auth import (
    ROUTES,
    Answer,
    assert_allowed,
    assert_unauthorized,
    bearer,
    call,
    publish,
    stream_lean,
)
from tests.support.broker_process import BrokerProcess
from tests.support.redis_server import RedisServer, free_port
from tests.support.tls import TlsFiles
from tests.support.tokens import (
    JwksServer,
    KeyPair,
    claims,
    confused_token,
    hs_token,
    serve_jwks,
    unsigned_token,
)

RSA_KEY = KeyPair.rsa("rsa-1")
EC_KEY = KeyPair.ec("ec-1")


@pytest.fixture(scope="module")
def pem_broker(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    """A broker whose public key is a PEM file (the path is the setting)."""
    key_file = tmp_path_factory.mktemp("keys") / "public.pem"
    key_file.write_bytes(RSA_KEY.public_pem)
    env = {"BROKER_JWT_PUBLIC_KEY": str(key_file), "BROKER_HEARTBEAT_SECONDS": "1"}
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    with serve_jwks([RSA_KEY, EC_KEY]) as server:
        yield server


@pytest.fixture(scope="module")
def jwks_broker(redis_server: RedisServer, jwks: JwksServer) -> Iterator[BrokerProcess]:
    env = {
        "BROKER_JWT_JWKS_URL": jwks.url,
        "BROKER_HEARTBEAT_SECONDS": "1",
        "BROKER_PUBLIC_TOPICS": "pub-*",
    }
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


@pytest.fixture(scope="module")
def unfetched_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    """A broker whose key set cannot be fetched: nothing listens at its URL."""
    url = f"http://127.0.0.1:{free_port()}/.well-known/jwks.json"
    env = {"BROKER_JWT_JWKS_URL": url, "BROKER_HEARTBEAT_SECONDS": "1"}
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    yield process
    process.close()


def _rights(topic: str) -> dict[str, object]:
    return claims(publish=[topic], subscribe=[topic])


# -- a public key from a PEM file ------------------------------------------------------------


@pytest.mark.parametrize("route", ["publish", "stream-lean", "stream-by-app"])
async def test_a_token_signed_with_the_private_key(pem_broker: BrokerProcess, route: str) -> None:
    topic = f"pem-{time.time_ns()}"
    token = RSA_KEY.token(_rights(topic), kid=None)
    assert_allowed(route, await call(route, pem_broker.url, topic, bearer(token)))


def _hostile_tokens(topic: str) -> dict[str, str]:
    rights = _rights(topic)
    return {
        # The public key is public: signing HS256 with it must not pass.
        "algorithm-confusion": confused_token(rights, RSA_KEY.public_pem),
        "alg-none": unsigned_token(rights, {"alg": "none"}),
        "another-rsa-key": KeyPair.rsa().token(rights, kid=None),
        "an-ec-key": EC_KEY.token(rights, kid=None),
        "hs256-with-some-secret": hs_token(rights),
    }


@pytest.mark.parametrize("attack", list(_hostile_tokens("t")))
@pytest.mark.parametrize("route", ["publish", "stream-lean"])
async def test_tokens_not_signed_by_the_key_are_refused(
    pem_broker: BrokerProcess, attack: str, route: str
) -> None:
    topic = f"pem-{time.time_ns()}"
    token = _hostile_tokens(topic)[attack]
    assert_unauthorized(await call(route, pem_broker.url, topic, bearer(token)), token)


# -- a JWKS --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [RSA_KEY, EC_KEY], ids=["RS256", "ES256"])
@pytest.mark.parametrize("route", ["publish", "stream-lean", "stream-by-app"])
async def test_tokens_of_each_key_in_the_set(
    jwks_broker: BrokerProcess, key: KeyPair, route: str
) -> None:
    topic = f"jwks-{time.time_ns()}"
    answer = await call(route, jwks_broker.url, topic, bearer(key.token(_rights(topic))))
    assert_allowed(route, answer)


async def test_a_kid_naming_another_key_is_refused(jwks_broker: BrokerProcess) -> None:
    topic = f"jwks-{time.time_ns()}"
    token = RSA_KEY.token(_rights(topic), kid=EC_KEY.kid)  # RSA signature, EC key's kid
    assert_unauthorized(await publish(jwks_broker.url, topic, bearer(token)), token)


@pytest.mark.parametrize("route", ["stream-lean", "stream-by-app", "history"])
async def test_a_public_topic_refuses_a_token_of_an_unknown_kid(
    jwks_broker: BrokerProcess, route: str
) -> None:
    """No key in the set verifies it: 401, though the topic needs no token at all."""
    topic = f"pub-{time.time_ns()}"
    token = KeyPair.rsa("made-up-for-a-public-topic").token(_rights(topic))
    assert_unauthorized(await call(route, jwks_broker.url, topic, bearer(token)), token)
    assert_allowed(route, await call(route, jwks_broker.url, topic, {}))


async def test_unknown_kids_cannot_hammer_the_key_set(
    jwks_broker: BrokerProcess, jwks: JwksServer
) -> None:
    """Many tokens with made-up kids, on every path: 401 each, and at most one fetch
    per rate-bound interval (the whole burst takes far less than one)."""
    topic = f"jwks-{time.time_ns()}"
    assert_allowed(
        "publish", await publish(jwks_broker.url, topic, bearer(RSA_KEY.token(_rights(topic))))
    )
    before = jwks.fetch_count()
    started = time.monotonic()
    for n in range(30):
        token = KeyPair.rsa(f"made-up-{n}").token(_rights(topic))
        assert_unauthorized(await publish(jwks_broker.url, topic, bearer(token)), token)
        answer = await stream_lean(jwks_broker.url, f"/topics/{topic}/events", bearer(token))
        assert_unauthorized(answer, token)
    intervals = (time.monotonic() - started) / JWKS_MIN_REFETCH_SECONDS
    assert jwks.fetch_count() - before <= int(intervals) + 1, (jwks.fetch_count(), before)


async def test_a_new_key_is_fetched_for_its_unknown_kid(
    jwks_broker: BrokerProcess, jwks: JwksServer
) -> None:
    """Key rotation: a token of a key added to the set since the last fetch passes once
    the set is fetched again (at once, or after the rate bound if a fetch just ran)."""
    rotated = KeyPair.ec("ec-rotated")
    topic = f"jwks-{time.time_ns()}"
    token = rotated.token(_rights(topic))
    jwks.set_keys([RSA_KEY, EC_KEY, rotated])
    try:
        deadline = time.monotonic() + JWKS_MIN_REFETCH_SECONDS + 5
        while True:
            answer = await stream_lean(jwks_broker.url, f"/topics/{topic}/events", bearer(token))
            if answer.status == 200:
                break
            assert_unauthorized(answer, token)
            assert time.monotonic() < deadline, "the rotated key was never fetched"
            await asyncio.sleep(0.25)
    finally:
        jwks.set_keys([RSA_KEY, EC_KEY])


@pytest.mark.parametrize("route", ROUTES)
async def test_a_key_set_never_fetched_is_no_verdict_on_the_token(
    unfetched_broker: BrokerProcess, route: str
) -> None:
    """The key set could not be fetched yet (its server down as the broker started):
    every token was a 401 ("kid not in the key set"), which stops an EventSource for
    good, and a publisher's retries. A stream is told to come back, as when the store
    is down; anything else is a 503 with Retry-After."""
    topic = f"jwks-{time.time_ns()}"
    answer = await call(route, unfetched_broker.url, topic, bearer(RSA_KEY.token(_rights(topic))))
    if "stream" in route:
        assert answer.status == 200, (answer.status, answer.body)
        assert answer.headers["content-type"].startswith("text/event-stream")
        assert b"retry:" in answer.body and b"could not be fetched" in answer.body
    else:
        assert answer.status == 503, (answer.status, answer.body)
        assert answer.problem["title"] == "Key set unavailable"
        assert int(answer.headers["retry-after"]) >= 1


MAX_STALE_SECONDS = JWKS_SHORTEST_MAX_STALE_SECONDS
LAPSED_LOG = "requests with a token get 503 until a fetch succeeds"


@contextmanager
def _broker_of_lapsing_key_set(
    redis_server: RedisServer, server: JwksServer
) -> Iterator[BrokerProcess]:
    """A broker whose key set is trusted MAX_STALE_SECONDS after its last good fetch."""
    env = {
        "BROKER_JWT_JWKS_URL": server.url,
        "BROKER_JWT_JWKS_MAX_STALE_SECONDS": str(MAX_STALE_SECONDS),
        "BROKER_PUBLIC_TOPICS": "pub-*",
        "BROKER_HEARTBEAT_SECONDS": "1",
    }
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    try:
        yield process
    finally:
        process.close()


def _assert_keys_unavailable(answer: Answer) -> None:
    assert answer.status == 503, (answer.status, answer.body)
    assert answer.problem["title"] == "Key set unavailable", answer.problem
    assert "could not be fetched again" in str(answer.problem["detail"]), answer.problem
    assert int(answer.headers["retry-after"]) >= 1


@pytest.fixture(scope="module")
def lapsing_key_sets(redis_server: RedisServer) -> dict[str, BaseException | None]:
    """The two scenarios below each wait out a key set's lapse (MAX_STALE_SECONDS, then
    a refetch's rate bound: some 15 s): they run side by side, each on a broker and key
    server of its own, once for the module; each test is told its own scenario's outcome
    (what it raised, with its traceback)."""

    async def both() -> list[BaseException | None]:
        return await asyncio.gather(
            _a_key_set_its_server_stops_serving(redis_server),
            _a_key_set_failing_to_fetch(redis_server),
            return_exceptions=True,
        )

    stops_serving, failing_to_fetch = asyncio.run(both())
    return {"stops serving": stops_serving, "failing to fetch": failing_to_fetch}


def test_a_key_set_its_server_stops_serving_is_trusted_only_so_long(
    lapsing_key_sets: dict[str, BaseException | None],
) -> None:
    """Fetches failing (the key server down, or blocked by whoever wants a key removed
    from the set to keep working), the set fetched last was kept for ever. It is kept
    BROKER_JWT_JWKS_MAX_STALE_SECONDS after its last good fetch: tokens pass within it
    (a failed refetch changes nothing), and past it get what they get before any fetch
    (503 Key set unavailable, a stream the come-back), said once in the log, and a
    stream open with a token ends; anonymous requests to public topics are served all
    along. The server back, tokens pass."""
    if (failure := lapsing_key_sets["stops serving"]) is not None:
        raise failure


def test_a_key_set_failing_to_fetch_is_tried_at_the_rate_bound_only(
    lapsing_key_sets: dict[str, BaseException | None],
) -> None:
    """Its server failing, every request with a token (a known kid, an unknown one) is a
    reason to fetch the set: a fetch is tried once per rate-bound interval at most, not
    per request, before the set lapses and after."""
    if (failure := lapsing_key_sets["failing to fetch"]) is not None:
        raise failure


async def _a_key_set_its_server_stops_serving(redis_server: RedisServer) -> None:
    """(test_a_key_set_its_server_stops_serving_is_trusted_only_so_long)"""
    with (
        serve_jwks([RSA_KEY]) as server,
        _broker_of_lapsing_key_set(redis_server, server) as broker,
    ):
        topic, public = f"jwks-{time.time_ns()}", f"pub-{time.time_ns()}"
        token = RSA_KEY.token(_rights(topic))
        assert_allowed("publish", await publish(broker.url, topic, bearer(token)))
        held = await raw_request(f"{broker.url}/topics/{topic}/events", headers=bearer(token))
        server.failing = True
        assert server.last_served_at is not None
        lapses_at = server.last_served_at + MAX_STALE_SECONDS
        # Within the bound: still taken, a refetch failing meanwhile (due at half of it).
        while time.monotonic() < lapses_at - 1:
            assert_allowed("publish", await publish(broker.url, topic, bearer(token)))
            await asyncio.sleep(0.25)
        assert server.failure_count() >= 1, "no refetch was tried within the bound"
        # Past it: no token is judged, a token verified before or not.
        answer = await publish(broker.url, topic, bearer(token))
        while answer.status == 201:
            assert time.monotonic() < lapses_at + 5, "the key set was trusted past its bound"
            await asyncio.sleep(0.25)
            answer = await publish(broker.url, topic, bearer(token))
        _assert_keys_unavailable(answer)
        try:
            await held.read_to_end(timeout=5)  # (ended by the heartbeat clock, each 1/3 s)
        finally:
            await held.close()
        assert held.status == 200 and held.complete and b"data:" in held.body, held.body
        fresh = RSA_KEY.token(_rights(topic) | {"jti": "never-verified"})
        _assert_keys_unavailable(await publish(broker.url, topic, bearer(fresh)))
        stream = await call("stream-lean", broker.url, topic, bearer(token))
        assert stream.status == 200 and b"retry:" in stream.body, stream.body
        assert b"could not be fetched again" in stream.body, stream.body
        for route in ("history", "stream-lean"):
            anonymous = await call(route, broker.url, public, {})
            assert anonymous.status == 200 and b"could not be" not in anonymous.body, anonymous
        assert broker.log().count(LAPSED_LOG) == 1, broker.log()
        server.failing = False
        # The server back: the next fetch (the rate bound allowing) trusts the set again.
        deadline = time.monotonic() + JWKS_MIN_REFETCH_SECONDS + 5
        answer = await publish(broker.url, topic, bearer(token))
        while answer.status != 201:
            _assert_keys_unavailable(answer)
            assert time.monotonic() < deadline, "the key set was never trusted again"
            await asyncio.sleep(0.25)
            answer = await publish(broker.url, topic, bearer(token))
        stream = await call("stream-by-app", broker.url, topic, bearer(token))
        assert stream.status == 200 and b"could not be fetched" not in stream.body, stream.body


async def _a_key_set_failing_to_fetch(redis_server: RedisServer) -> None:
    """(test_a_key_set_failing_to_fetch_is_tried_at_the_rate_bound_only)"""
    with (
        serve_jwks([RSA_KEY]) as server,
        _broker_of_lapsing_key_set(redis_server, server) as broker,
    ):
        topic = f"jwks-{time.time_ns()}"
        token = RSA_KEY.token(_rights(topic))
        assert_allowed("publish", await publish(broker.url, topic, bearer(token)))
        server.failing = True
        started = time.monotonic()
        for n in range(60):  # (~0.25 s apart: past the bound, lapsed)
            made_up = KeyPair.ec(f"made-up-{n}").token(_rights(topic))
            for given in (token, made_up):
                answer = await publish(broker.url, topic, bearer(given))
                assert answer.status in (201, 401, 503), (answer.status, answer.body)
            await asyncio.sleep(0.25)
        intervals = (time.monotonic() - started) / JWKS_MIN_REFETCH_SECONDS
        assert answer.status == 503, "the set never lapsed"
        assert 1 <= server.failure_count() <= int(intervals) + 1, server.failure_count()


def _said_at_start(broker: BrokerProcess) -> list[str]:
    """The broker's log up to its start's end, before it serves any request."""
    lines = broker.log().splitlines()
    started = next(n for n, line in enumerate(lines) if "Application startup complete" in line)
    return lines[:started]


@pytest.mark.parametrize(
    ("key_broker", "setting"),
    [("pem_broker", "BROKER_JWT_PUBLIC_KEY"), ("unfetched_broker", "BROKER_JWT_JWKS_URL")],
)
def test_an_identity_providers_key_without_an_audience_is_warned_of_at_start(
    key_broker: str, setting: str, request: pytest.FixtureRequest
) -> None:
    """A public key or a key set is an identity provider's, which signs the tokens of
    every service it serves: without BROKER_JWT_AUDIENCE, any of them was valid here
    (with rights, if it carried a broker claim), and nothing said so. A valid setup
    (one provider for the broker alone): warned of, not refused."""
    broker: BrokerProcess = request.getfixturevalue(key_broker)
    warnings = [line for line in _said_at_start(broker) if "BROKER_JWT_AUDIENCE" in line]
    assert len(warnings) == 1, broker.log()
    assert "WARNING api.app: authorization: on, but BROKER_JWT_AUDIENCE is not set" in warnings[0]
    assert setting in warnings[0] and "another service" in warnings[0]


def test_a_key_set_with_an_audience_is_not_warned_of(redis_server: RedisServer) -> None:
    url = f"http://127.0.0.1:{free_port()}/.well-known/jwks.json"  # (never fetched)
    env = {"BROKER_JWT_JWKS_URL": url, "BROKER_JWT_AUDIENCE": "broker-tests"}
    broker = BrokerProcess(redis_url=redis_server.url, env=env).start()
    try:
        assert "authorization: on (JWT)" in "\n".join(_said_at_start(broker))
        assert "BROKER_JWT_AUDIENCE" not in broker.log(), broker.log()
    finally:
        broker.close()


@contextmanager
def _broker_of_key_set(
    redis_server: RedisServer, url: str, tls: TlsFiles
) -> Iterator[BrokerProcess]:
    """A broker fetching its key set from ``url``, trusting ``tls``'s CA (as the host's)."""
    env = {"BROKER_JWT_JWKS_URL": url, "SSL_CERT_FILE": str(tls.ca)}
    process = BrokerProcess(redis_url=redis_server.url, env=env).start()
    try:
        yield process
    finally:
        process.close()


def _server_context(tls: TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.cert, tls.key)
    return context


async def test_a_key_set_redirected_from_https_to_http_is_not_fetched(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Its https URL redirected to plain http: the redirect was followed, so anyone on
    the network path who answered the plain request supplied the keys, and every token
    they signed was taken. The fetch is refused: a failed fetch, and with no key set
    ever fetched, a token is told to come back (503 Key set unavailable), not taken."""
    tls = TlsFiles.make(tmp_path)
    with (
        serve_jwks([RSA_KEY]) as plain,
        serve_jwks([], tls=_server_context(tls)) as secure,
        _broker_of_key_set(redis_server, secure.url, tls) as broker,
    ):
        secure.redirect_to = plain.url
        topic = f"jwks-{time.time_ns()}"
        answer = await publish(broker.url, topic, bearer(RSA_KEY.token(_rights(topic))))
        assert answer.status == 503, (answer.status, answer.body)
        assert answer.problem["title"] == "Key set unavailable"
        assert secure.redirect_count() >= 1 and plain.fetch_count() == 0
        assert "refused a redirect from https to http://" in broker.log()


async def test_a_redirect_from_https_to_http_keeps_the_key_set_fetched_before(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A key set fetched over https, then redirected to plain http (the fetch for an
    unknown kid): the keys served there replaced the set, so the other party's tokens
    were taken and the real ones refused. The refused fetch keeps the set as it was."""
    tls = TlsFiles.make(tmp_path)
    other = KeyPair.rsa("other-party")
    with (
        serve_jwks([other]) as plain,
        serve_jwks([RSA_KEY], tls=_server_context(tls)) as secure,
        _broker_of_key_set(redis_server, secure.url, tls) as broker,
    ):
        topic = f"jwks-{time.time_ns()}"
        real, forged = RSA_KEY.token(_rights(topic)), other.token(_rights(topic))
        assert_allowed("publish", await publish(broker.url, topic, bearer(real)))
        secure.redirect_to = plain.url
        # Its kid unknown, the forged token starts a fetch (once the rate bound allows)
        # and its request waits for it: each is refused, that one too.
        deadline = time.monotonic() + JWKS_MIN_REFETCH_SECONDS + 5
        while secure.redirect_count() == 0:
            assert_unauthorized(await publish(broker.url, topic, bearer(forged)), forged)
            assert time.monotonic() < deadline, "no fetch of the key set for the unknown kid"
            await asyncio.sleep(0.25)
        assert_unauthorized(await publish(broker.url, topic, bearer(forged)), forged)
        assert_allowed("publish", await publish(broker.url, topic, bearer(real)))
        assert plain.fetch_count() == 0


async def test_a_key_set_redirected_from_http_to_https_is_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a redirect that leaves https is refused: one to https (an http URL's upgrade,
    the usual redirect of a server) is no weaker than the URL configured."""
    from api import keys

    tls = TlsFiles.make(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca))
    keys._system_tls.cache_clear()
    try:
        with (
            serve_jwks([RSA_KEY], tls=_server_context(tls)) as secure,
            serve_jwks([]) as plain,
        ):
            plain.redirect_to = secure.url
            document = await keys._get_json(plain.url)
    finally:
        keys._system_tls.cache_clear()
    assert [key["kid"] for key in document["keys"]] == [RSA_KEY.kid]
    assert plain.redirect_count() == 1 and secure.fetch_count() == 1


def test_pem_text_works_as_well_as_a_path(tmp_path: Path) -> None:
    """The setting takes PEM text too; checked in process (the broker tests use a path)."""
    from api.keys import FixedKey

    key = FixedKey.public(EC_KEY.public_pem.decode())
    assert key.key_for({})[1] == ["ES256"]


async def test_requests_during_a_fetch_wait_for_it() -> None:
    """Subscribers arriving together (a deploy, a reconnect storm) before the set is
    fetched: one fetch, and every one of them gets the key, none a 401."""
    from api.keys import JwksKeys

    with serve_jwks([RSA_KEY]) as server:
        keys = JwksKeys(server.url)
        header = {"kid": RSA_KEY.kid, "alg": "RS256"}
        await asyncio.gather(*(keys.ensure(header) for _ in range(20)))
        assert server.fetch_count() == 1
        assert keys.key_for(header)[1][0] == "RS256"


async def test_a_key_server_sending_slowly_is_given_up_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """urllib's timeout is per read: a server sending a byte of its answer every 0.3 s
    kept a fetch going for hours (and no other could start). The fetch, head and body,
    has a deadline; and once it is over, the next fetch can start."""
    from api import keys

    monkeypatch.setattr(keys, "JWKS_TIMEOUT_SECONDS", 1.0)
    with serve_jwks([RSA_KEY]) as server:
        server.drip_seconds = 0.3
        with pytest.raises(TimeoutError):
            await keys._get_json(server.url)
        key_set = keys.JwksKeys(server.url, min_refetch_seconds=0)
        await key_set.ensure({"kid": RSA_KEY.kid})  # (waits as long as the fetch may take)
        assert not key_set.loaded
        for _ in range(100):  # the fetch given up on is over (it went on, for hours)
            if key_set._fetching is None:
                break
            await asyncio.sleep(0.05)
        assert key_set._fetching is None
        server.drip_seconds = 0
        await key_set.ensure({"kid": RSA_KEY.kid})
        assert key_set.loaded


async def test_requests_wait_for_a_fetch_only_so_long(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request whose key the set lacks waits for the fetch under way, at most
    JWKS_TIMEOUT_SECONDS: it waited for as long as the fetch took."""
    from api import keys

    release = asyncio.Event()

    async def slow_fetch(url: str) -> dict[str, list[object]]:
        await release.wait()
        return {"keys": []}

    monkeypatch.setattr(keys, "_get_json", slow_fetch)
    monkeypatch.setattr(keys, "JWKS_TIMEOUT_SECONDS", 0.2)
    key_set = keys.JwksKeys("http://127.0.0.1:1/unused")
    try:
        await asyncio.wait_for(key_set.ensure({"kid": "k"}), 10)  # (the fetch: for ever)
        assert not key_set.loaded
    finally:
        release.set()


async def test_a_key_removed_from_the_set_stops_its_tokens_even_verified_ones() -> None:
    """Key revocation: once a fetch of the set lacks a key, tokens it signed are refused,
    also those verified (and remembered) before; tokens of the keys kept still pass."""
    from api.auth import Authorizer
    from api.keys import JwksKeys
    from api.problems import Unauthorized

    with serve_jwks([RSA_KEY, EC_KEY]) as server:
        keys = JwksKeys(server.url, min_refetch_seconds=0)
        authorizer = Authorizer(keys)
        revoked, kept = (k.token(_rights("t")) for k in (RSA_KEY, EC_KEY))

        def scope(token: str) -> dict[str, object]:
            return {"headers": [(b"authorization", f"Bearer {token}".encode())]}

        for token in (revoked, kept):
            await authorizer.prepare(scope(token))
            authorizer.check(scope(token), "subscribe", ["t"])  # verified, remembered
        server.set_keys([EC_KEY])
        await keys.ensure({"kid": "not-in-the-set"})  # a fetch (rotation, or stale)
        with pytest.raises(Unauthorized):
            authorizer.check(scope(revoked), "subscribe", ["t"])
        authorizer.check(scope(kept), "subscribe", ["t"])


async def test_a_stale_key_set_is_fetched_again_by_checks_alone() -> None:
    """The lean stream path checks synchronously (no ``prepare``), and a token verified
    before skips ``prepare``'s fetch: a process serving only those never fetched the
    set again, and a key removed from it went on working for good. A check of a stale
    set starts a fetch; once it is in, the removed key's tokens are refused."""
    from api.auth import Authorizer
    from api.keys import JwksKeys
    from api.problems import Unauthorized

    with serve_jwks([RSA_KEY, EC_KEY]) as server:
        keys = JwksKeys(server.url, min_refetch_seconds=0, max_age_seconds=0.2)
        authorizer = Authorizer(keys)
        revoked = RSA_KEY.token(_rights("t"))
        scope = {"headers": [(b"authorization", f"Bearer {revoked}".encode())]}
        await authorizer.prepare(scope)
        authorizer.check(scope, "subscribe", ["t"])  # verified, remembered
        server.set_keys([EC_KEY])
        await asyncio.sleep(0.3)  # the set's age passes its maximum
        fetched = server.fetch_count()
        authorizer.check(scope, "subscribe", ["t"])  # (this one is let through: stale by 0.1 s)
        for _ in range(100):
            if keys.generation:
                break
            await asyncio.sleep(0.05)
        assert server.fetch_count() == fetched + 1
        with pytest.raises(Unauthorized):
            authorizer.check(scope, "subscribe", ["t"])


async def test_a_grant_lapses_once_its_key_leaves_the_set() -> None:
    """A stream or an ingest holds its grant for as long as it lasts: the grant of a
    token whose key left the set lapses (it ran to the token's expiry), once the set,
    stale, is fetched again; one of a key kept does not."""
    from api.auth import KEY_NOT_TRUSTED, Authorizer
    from api.keys import JwksKeys

    with serve_jwks([RSA_KEY, EC_KEY]) as server:
        keys = JwksKeys(server.url, min_refetch_seconds=0, max_age_seconds=0.2)
        authorizer = Authorizer(keys)
        grants = []
        for key in (RSA_KEY, EC_KEY):
            scope = {"headers": [(b"authorization", f"Bearer {key.token(_rights('t'))}".encode())]}
            await authorizer.prepare(scope)
            grants.append(authorizer.check(scope, "subscribe", ["t"]))
        removed, kept = grants
        assert removed.lapsed() is None and kept.lapsed() is None
        server.set_keys([EC_KEY])
        for _ in range(100):  # each look starts the fetch of a stale set
            if removed.lapsed() is not None:
                break
            await asyncio.sleep(0.05)
        assert removed.lapsed() == KEY_NOT_TRUSTED
        assert kept.lapsed() is None


async def test_a_grant_without_a_kid_outlives_a_key_added_beside_its_own() -> None:
    """A token without a kid is verified by a set of one key; a second key added to the
    set (a rotation begins) leaves it trusted (it ended every such stream; review)."""
    from api.auth import Authorizer
    from api.keys import JwksKeys

    with serve_jwks([RSA_KEY]) as server:
        keys = JwksKeys(server.url, min_refetch_seconds=0, max_age_seconds=0.2)
        authorizer = Authorizer(keys)
        token = RSA_KEY.token(_rights("t"), kid=None)
        scope = {"headers": [(b"authorization", f"Bearer {token}".encode())]}
        await authorizer.prepare(scope)
        grant = authorizer.check(scope, "subscribe", ["t"])
        fetched = server.fetch_count()
        server.set_keys([RSA_KEY, EC_KEY])
        for _ in range(100):  # each look starts the fetch of a stale set
            assert grant.lapsed() is None
            if server.fetch_count() > fetched and len(keys._keys) == 2:
                break
            await asyncio.sleep(0.05)
        assert len(keys._keys) == 2 and grant.lapsed() is None


def test_a_key_server_behind_a_proxy_is_reached_as_urllib_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The proxy of a fetch is urllib's choice (``*_proxy``, ``no_proxy``), as before the
    fetch moved to httpx, whose own rules took ``ALL_PROXY`` too (a SOCKS one failed
    every fetch: socksio is not installed)."""
    from api import keys

    for name in ("ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.test:3128")
    monkeypatch.setenv("NO_PROXY", "idp.inside")
    assert keys._proxy_for("https://idp.test/jwks") is None  # (no https proxy set)
    assert keys._proxy_for("http://idp.test/jwks") == "http://proxy.test:3128"
    assert keys._proxy_for("http://idp.inside/jwks") is None


async def test_a_key_server_under_a_ca_the_system_trusts_is_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx trusts certifi's list alone unless told otherwise: a key server whose CA the
    host trusts (here by SSL_CERT_FILE, which OpenSSL's system store reads) was refused
    (CERTIFICATE_VERIFY_FAILED), where urllib fetched it."""
    from api import keys

    ca_file, server_context = _tls_files(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    keys._system_tls.cache_clear()
    try:
        with serve_jwks([RSA_KEY], tls=server_context) as server:
            document = await keys._get_json(server.url)
    finally:
        keys._system_tls.cache_clear()
    assert [key["kid"] for key in document["keys"]] == [RSA_KEY.kid]


def _tls_files(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA (its certificate in a file) and a server context for 127.0.0.1 it signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec as ec_keys
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        subject: str, key: Any, issuer: x509.Name | None, signer: Any, ca: bool
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            address = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
            builder = builder.add_extension(x509.SubjectAlternativeName([address]), False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec_keys.generate_private_key(ec_keys.SECP256R1())
    ca = certificate("test CA", ca_key, None, ca_key, ca=True)
    server_key = ec_keys.generate_private_key(ec_keys.SECP256R1())
    server = certificate("127.0.0.1", server_key, ca.subject, ca_key, ca=False)
    ca_file, cert_file, key_file = (tmp_path / n for n in ("ca.pem", "cert.pem", "key.pem"))
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return ca_file, context
