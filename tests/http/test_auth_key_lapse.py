"""A JWKS past BROKER_JWT_JWKS_MAX_STALE_SECONDS while a streaming ingest goes on,
through a real ``broker serve`` and a local key server: the ingest is told to come
back (503), as new requests are, not that its token is bad (401).

The module's tests share one broker and one lapse of its key set (the fixture ``lapse``),
which is waited out once, not once a test (at least 10 s, its shortest max stale): each
scenario's state is set up before the key server stops (ingests open, tokens verified
that expire before the set lapses), each scenario's requests are answered past the
lapse, the server comes back, and each test asserts what its scenario was answered. A
step that raised is told to its scenario's test only."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Iterator

import httpx
import orjson
import pytest

from api.keys import JWKS_MIN_REFETCH_SECONDS
from tests.http.test_auth import (
    Answer,
    bearer,
    chunk,
    final_answer,
    history,
    publish,
    stored,
)
from tests.http.test_auth_keys import (
    MAX_STALE_SECONDS,
    RSA_KEY,
    _broker_of_lapsing_key_set,
    _rights,
)
from tests.support.broker_process import BrokerProcess
from tests.support.polling import await_until, wait_until
from tests.support.redis_server import RedisServer
from tests.support.tokens import JwksServer, claims, serve_jwks


async def _wait_for_history(broker: BrokerProcess, topic: str, token: str, status: int) -> None:
    """Until a read of the topic with ``token`` is answered ``status``."""

    async def answered() -> bool:
        return (await history(broker.url, topic, bearer(token))).status == status

    timeout = MAX_STALE_SECONDS + JWKS_MIN_REFETCH_SECONDS + 5
    await await_until(answered, timeout=timeout, what=f"a read answered {status}", interval=0.25)


async def _stored_lines(broker: BrokerProcess, topic: str, token: str) -> list[int]:
    return await asyncio.to_thread(stored, broker.url, topic, token)


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.lower().split(b"\r\n")[1:]:
        field, _, value = line.partition(b":")
        if field == name:
            return value.strip()
    return None


class _OpenIngest:
    """A keyed streaming ingest, its body left open after its first line."""

    def __init__(self, broker: BrokerProcess, path_kind: str, expires_in: float = 600) -> None:
        self.broker, self.path_kind = broker, path_kind
        self.topic = f"jwks-ingest-{path_kind}-{time.time_ns()}"
        self.key = f"k-{time.time_ns()}"
        self.claims = {**_rights(self.topic), "exp": int(time.time() + expires_in)}
        self.token = RSA_KEY.token(self.claims)

    async def begin(self) -> None:
        head = [
            f"POST /topics/{self.topic}/events HTTP/1.1",
            f"Host: 127.0.0.1:{self.broker.port}",
            f"Authorization: Bearer {self.token}",
            f"Idempotency-Key: {self.key}",
            "Content-Type: application/x-ndjson",
            "Transfer-Encoding: chunked",
            *(["Expect: 100-continue"] if self.path_kind == "by-app" else []),
        ]
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.broker.port)
        self.writer.write("\r\n".join(head).encode() + b"\r\n\r\n" + chunk(b'{"data": 1}\n'))
        await self.writer.drain()
        lines = functools.partial(_stored_lines, self.broker, self.topic, self.token)
        assert await await_until(lines, timeout=5, what="line 1 stored") == [1]

    async def answer_to_line_2(self) -> tuple[bytes, bytes]:
        self.writer.write(chunk(b'{"data": 2}\n'))  # (the body goes on: mid-body)
        await self.writer.drain()
        return await final_answer(self.reader)

    async def resend_whole(self) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.broker.url) as client:
            return await client.post(
                f"/topics/{self.topic}/events",
                content=b'{"data": 1}\n{"data": 2}\n',
                headers={
                    "Content-Type": "application/x-ndjson",
                    "Idempotency-Key": self.key,
                    **bearer(self.token),
                },
            )

    def close(self) -> None:
        if hasattr(self, "writer"):
            self.writer.close()


TOKEN_LIFE_S = 4
"""A token that lives through an ingest's first line, and dies well before its key set
lapses (MAX_STALE_SECONDS after its last fetch, a failed refetch at most
JWKS_MIN_REFETCH_SECONDS on)."""
INGEST_PATHS = ("lean", "by-app")

# The scenarios of the module's one lapse (each a test below), and the set's return,
# which two of them wait for.
COME_BACK, EXPIRED_INGEST, EXPIRED_TOKEN, SAID_ONCE, RETURN = (
    "an ingest told to come back",
    "an ingest whose token expired",
    "a token expired since it was verified",
    "the failing server said once",
    "the key set back",
)


class _Lapse:
    """The module's one broker and key server, and what each scenario was answered,
    the key set lapsed (its server failing past MAX_STALE_SECONDS), then back."""

    def __init__(self, broker: BrokerProcess, server: JwksServer) -> None:
        self.broker, self.server = broker, server
        self.failed: dict[str, BaseException] = {}
        self.lapsed_at = 0.0  # (time.time()) when a new request with a token got 503
        self.probe_topic = f"jwks-probe-{time.time_ns()}"
        self.probe = RSA_KEY.token(claims(subscribe=[self.probe_topic]))  # (a new request)
        # COME_BACK: ingests with valid tokens, their line 2's answers, resent whole.
        self.open_ingests = [_OpenIngest(broker, kind) for kind in INGEST_PATHS]
        self.open_answers: list[tuple[bytes, bytes]] = []
        self.resent: list[tuple[httpx.Response, list[int]]] = []
        # EXPIRED_INGEST: ingests whose tokens expire before the lapse (made when begun).
        self.expiring_ingests: list[_OpenIngest] = []
        self.expired_answers: list[tuple[bytes, bytes]] = []
        # EXPIRED_TOKEN: a publish with a token verified, and again past its expiry.
        self.expired_topic = f"jwks-expired-{time.time_ns()}"
        self.expires_at = 0
        self.published: Answer | None = None
        self.again: Answer | None = None
        self.read: Answer | None = None
        # SAID_ONCE: the key server's fetches failed, then served, until it came back.
        self.failures_before_return = 0
        self.fetches_before_return = 0

    async def step(self, scenario: str, action: Callable[[], Awaitable[object]]) -> None:
        """``action`` done for ``scenario``, unless a step of it failed before; what it
        raises kept for the scenario's test (the others' scenarios go on)."""
        if scenario in self.failed:
            return
        try:
            await action()
        except Exception as error:
            self.failed[scenario] = error

    def raise_failure(self, *scenarios: str) -> None:
        """What a step of these scenarios raised, raised again in their test."""
        for scenario in scenarios:
            if scenario in self.failed:
                raise AssertionError(f"{scenario}: a step failed") from self.failed[scenario]


async def _begin(ingests: list[_OpenIngest]) -> None:
    for ingest in ingests:
        await ingest.begin()


async def _lines_2(ingests: list[_OpenIngest], answers: list[tuple[bytes, bytes]]) -> None:
    for ingest in ingests:
        answers.append(await ingest.answer_to_line_2())


async def _set_up(lapse: _Lapse) -> None:
    """Each scenario's state, before the key server stops (each token verified)."""
    await lapse.step(COME_BACK, lambda: _begin(lapse.open_ingests))
    lapse.expiring_ingests = [
        _OpenIngest(lapse.broker, kind, expires_in=TOKEN_LIFE_S) for kind in INGEST_PATHS
    ]
    await lapse.step(EXPIRED_INGEST, lambda: _begin(lapse.expiring_ingests))
    await lapse.step(EXPIRED_TOKEN, lambda: _publish_expiring(lapse))


async def _publish_expiring(lapse: _Lapse) -> None:
    lapse.expires_at = int(time.time() + TOKEN_LIFE_S)
    token = _expiring_token(lapse)
    lapse.published = await publish(lapse.broker.url, lapse.expired_topic, bearer(token))


def _expiring_token(lapse: _Lapse) -> str:
    return RSA_KEY.token({**_rights(lapse.expired_topic), "exp": lapse.expires_at})


async def _answered_lapsed(lapse: _Lapse) -> None:
    """Each scenario's requests, the key set past its max stale."""
    await lapse.step(COME_BACK, lambda: _lines_2(lapse.open_ingests, lapse.open_answers))
    await lapse.step(
        EXPIRED_INGEST, lambda: _lines_2(lapse.expiring_ingests, lapse.expired_answers)
    )
    await lapse.step(EXPIRED_TOKEN, lambda: _publish_expired(lapse))
    await lapse.step(SAID_ONCE, lambda: _failed_twice(lapse))


async def _publish_expired(lapse: _Lapse) -> None:
    headers = bearer(_expiring_token(lapse))
    lapse.again = await publish(lapse.broker.url, lapse.expired_topic, headers)
    lapse.read = await history(lapse.broker.url, lapse.expired_topic, headers)


async def _failed_twice(lapse: _Lapse) -> None:
    """Until the set was fetched again and failed at least twice, requests coming (which
    make it fetch): the fetches said failing once though failing more."""

    async def failed_twice() -> bool:
        await history(lapse.broker.url, lapse.probe_topic, bearer(lapse.probe))
        return lapse.server.failure_count() >= 2

    timeout = 2 * JWKS_MIN_REFETCH_SECONDS + 2
    await await_until(failed_twice, timeout=timeout, what="two failed fetches", interval=0.25)


async def _resend(lapse: _Lapse) -> None:
    for ingest in lapse.open_ingests:
        resent = await ingest.resend_whole()
        lapse.resent.append((resent, await _stored_lines(lapse.broker, ingest.topic, ingest.token)))


async def _lapse_and_return(lapse: _Lapse) -> None:
    """The scenarios' state set up, the key set lapsed (waited out once), each scenario
    answered, and the set back."""
    try:
        await _set_up(lapse)
        lapse.server.failing = True
        await _wait_for_history(lapse.broker, lapse.probe_topic, lapse.probe, 503)
        lapse.lapsed_at = time.time()
        await _answered_lapsed(lapse)
    finally:
        for ingest in [*lapse.open_ingests, *lapse.expiring_ingests]:
            ingest.close()
    lapse.failures_before_return = lapse.server.failure_count()
    lapse.fetches_before_return = lapse.server.fetch_count()
    lapse.server.failing = False
    back = functools.partial(_wait_for_history, lapse.broker, lapse.probe_topic, lapse.probe, 200)
    await lapse.step(RETURN, back)
    await lapse.step(COME_BACK, lambda: _resend(lapse))


@pytest.fixture(scope="module")
def lapse(redis_server: RedisServer) -> Iterator[_Lapse]:
    """The module's one lapse of a key set, and its return, each scenario answered."""
    with (
        serve_jwks([RSA_KEY]) as server,
        _broker_of_lapsing_key_set(redis_server, server) as broker,
    ):
        lapsed = _Lapse(broker, server)
        asyncio.run(_lapse_and_return(lapsed))
        yield lapsed


def test_a_streaming_ingest_whose_key_set_lapses_is_told_to_come_back(lapse: _Lapse) -> None:
    """A key set past its max stale gets new requests a 503 (key set unavailable: come
    back). An ingest open meanwhile got 401 at its next line, as if its token were bad:
    a producer stops for good on a 401, its token still valid. It gets the 503 too,
    told as a store failure mid-body is (Retry-After, the lines stored so far, the
    connection closed); the set back, the whole stream resent under its key stores
    each line once. On both ingest paths (lean, and the app's after Expect)."""
    lapse.raise_failure(COME_BACK, RETURN)
    for ingest, (answer_head, body) in zip(lapse.open_ingests, lapse.open_answers, strict=True):
        said = (ingest.path_kind, answer_head, body)
        assert answer_head.startswith(b"HTTP/1.1 503 "), said
        assert _header(answer_head, b"retry-after") is not None, said
        assert _header(answer_head, b"connection") == b"close", said
        problem = orjson.loads(body)
        assert problem["title"] == "Key set unavailable", said
        assert "could not be fetched again" in problem["detail"], said
        assert "1 line(s) stored, the last " in problem["detail"], said
    for ingest, (resent, lines) in zip(lapse.open_ingests, lapse.resent, strict=True):
        assert resent.status_code == 201, (ingest.path_kind, resent.text)
        assert lines == [1, 2], ingest.path_kind


def test_an_ingest_whose_token_expired_is_told_so_though_its_key_set_lapsed(
    lapse: _Lapse,
) -> None:
    """A token that expired mid-ingest is a bad token whatever the key set's state: its
    expiry was read from the token verified when the ingest began, and no key set
    judges it again. So the ingest is answered 401 (the contract's expired token), not
    the 503 of a key set past its max stale, which told its producer to come back
    later with the same token (503 again while the set stays stale, its retries spent on
    a token that could never pass). On both ingest paths."""
    lapse.raise_failure(EXPIRED_INGEST)
    assert all(lapse.lapsed_at > ingest.claims["exp"] for ingest in lapse.expiring_ingests)
    answers = lapse.expired_answers
    for ingest, (answer_head, body) in zip(lapse.expiring_ingests, answers, strict=True):
        said = (ingest.path_kind, answer_head, body)
        assert answer_head.startswith(b"HTTP/1.1 401 "), said
        assert _header(answer_head, b"connection") == b"close", said
        assert "the token expired during the ingest" in orjson.loads(body)["detail"], said


def test_a_failing_key_server_is_said_once_and_its_return_once(lapse: _Lapse) -> None:
    """Its server failing, the set is fetched again each JWKS_MIN_REFETCH_SECONDS while
    requests come, and each failure was a warning in the broker's log, the same line
    every 5 s for as long as the server was down. Now: one warning when fetches begin
    to fail, with the reason (a reminder at most once a minute: none within this
    module's lapse), and one line when a fetch succeeds again."""
    lapse.raise_failure(SAID_ONCE, RETURN)
    assert lapse.failures_before_return >= 2, "fewer than two failed fetches"
    assert lapse.server.fetch_count() > lapse.fetches_before_return, "no fetch again"
    broker, server = lapse.broker, lapse.server
    wait_until(lambda: "succeeded again" in broker.log(), timeout=5, what="its return said")
    said = [line for line in broker.log().splitlines() if "JWKS fetch from" in line]
    assert len(said) == 2, said
    assert "WARNING" in said[0] and f"JWKS fetch from {server.url} failed: " in said[0]
    assert "503" in said[0], said  # (the reason: the server's answer)
    assert "INFO" in said[1] and "succeeded again, after failing since " in said[1]


def test_a_token_expired_since_it_was_verified_is_401_though_its_key_set_lapsed(
    lapse: _Lapse,
) -> None:
    """A token verified while its key set could judge it, and expired since, is a bad
    token whatever the set's state now: its signature was checked, its expiry is known.
    A new request with it is answered 401 (the contract's expired token: get a fresh
    one), as an ingest open with it is, not the 503 of a set past its max stale, which
    had its client come back with the same token, and get 503 again while the set
    stayed stale. A publish (lean route) and a read (the app's)."""
    lapse.raise_failure(EXPIRED_TOKEN)
    published, again, read = lapse.published, lapse.again, lapse.read
    assert published is not None and again is not None and read is not None
    assert published.status == 201, published.body  # (verified, remembered)
    assert lapse.lapsed_at > lapse.expires_at
    assert again.status == 401, again.body
    assert "expired" in str(again.problem["detail"]), again.body
    assert read.status == 401, read
