"""A JWKS past BROKER_JWT_JWKS_MAX_STALE_SECONDS while a streaming ingest goes on,
through a real ``broker serve`` and a local key server: the ingest is told to come
back (503), as new requests are, not that its token is bad (401)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator

import httpx
import orjson

from api.keys import JWKS_MIN_REFETCH_SECONDS
from tests.http.test_auth import bearer, chunk, final_answer, history, stored
from tests.http.test_auth_keys import (
    MAX_STALE_SECONDS,
    RSA_KEY,
    _broker_of_lapsing_key_set,
    _rights,
)
from tests.support.broker_process import BrokerProcess
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer
from tests.support.tokens import claims, serve_jwks


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


@contextlib.asynccontextmanager
async def _begun(ingests: list[_OpenIngest]) -> AsyncIterator[None]:
    """The ingests begun (each its first line stored), their connections closed after."""
    try:
        for ingest in ingests:
            await ingest.begin()
        yield
    finally:
        for ingest in ingests:
            if hasattr(ingest, "writer"):
                ingest.writer.close()


async def test_a_streaming_ingest_whose_key_set_lapses_is_told_to_come_back(
    redis_server: RedisServer,
) -> None:
    """A key set past its max stale gets new requests a 503 (key set unavailable: come
    back). An ingest open meanwhile got 401 at its next line, as if its token were bad:
    a producer stops for good on a 401, its token still valid. It gets the 503 too,
    told as a store failure mid-body is (Retry-After, the lines stored so far, the
    connection closed); the set back, the whole stream resent under its key stores
    each line once. On both ingest paths (lean, and the app's after Expect), which
    share one broker and so one wait past the max stale."""
    with (
        serve_jwks([RSA_KEY]) as server,
        _broker_of_lapsing_key_set(redis_server, server) as broker,
    ):
        ingests = [_OpenIngest(broker, kind) for kind in INGEST_PATHS]
        async with _begun(ingests):
            server.failing = True
            await _wait_for_history(broker, ingests[0].topic, ingests[0].token, 503)
            answers = [await ingest.answer_to_line_2() for ingest in ingests]
        for ingest, (answer_head, body) in zip(ingests, answers, strict=True):
            said = (ingest.path_kind, answer_head, body)
            assert answer_head.startswith(b"HTTP/1.1 503 "), said
            assert _header(answer_head, b"retry-after") is not None, said
            assert _header(answer_head, b"connection") == b"close", said
            problem = orjson.loads(body)
            assert problem["title"] == "Key set unavailable", said
            assert "could not be fetched again" in problem["detail"], said
            assert "1 line(s) stored, the last " in problem["detail"], said
        server.failing = False
        await _wait_for_history(broker, ingests[0].topic, ingests[0].token, 200)
        for ingest in ingests:
            resent = await ingest.resend_whole()
            assert resent.status_code == 201, (ingest.path_kind, resent.text)
            assert await _stored_lines(broker, ingest.topic, ingest.token) == [1, 2]


async def test_an_ingest_whose_token_expired_is_told_so_though_its_key_set_lapsed(
    redis_server: RedisServer,
) -> None:
    """A token that expired mid-ingest is a bad token whatever the key set's state: its
    expiry was read from the token verified when the ingest began, and no key set
    judges it again. So the ingest is answered 401 (the contract's expired token), not
    the 503 of a key set past its max stale, which told its producer to come back
    later with the same token (503 again while the set stays stale, its retries spent on
    a token that could never pass). On both ingest paths, sharing one broker."""
    with (
        serve_jwks([RSA_KEY]) as server,
        _broker_of_lapsing_key_set(redis_server, server) as broker,
    ):
        ingests = [_OpenIngest(broker, kind, expires_in=TOKEN_LIFE_S) for kind in INGEST_PATHS]
        probe = RSA_KEY.token(claims(subscribe=[ingests[0].topic]))
        async with _begun(ingests):
            server.failing = True
            await _wait_for_history(broker, ingests[0].topic, probe, 503)
            assert all(time.time() > ingest.claims["exp"] for ingest in ingests)
            answers = [await ingest.answer_to_line_2() for ingest in ingests]
        for ingest, (answer_head, body) in zip(ingests, answers, strict=True):
            said = (ingest.path_kind, answer_head, body)
            assert answer_head.startswith(b"HTTP/1.1 401 "), said
            assert _header(answer_head, b"connection") == b"close", said
            assert "the token expired during the ingest" in orjson.loads(body)["detail"], said


TOKEN_LIFE_S = 4
"""A token that lives through an ingest's first line, and dies well before its key set
lapses (MAX_STALE_SECONDS after its last fetch, a failed refetch at most
JWKS_MIN_REFETCH_SECONDS on)."""
INGEST_PATHS = ("lean", "by-app")


async def test_a_failing_key_server_is_said_once_and_its_return_once(
    redis_server: RedisServer,
) -> None:
    """Its server failing, the set is fetched again each JWKS_MIN_REFETCH_SECONDS while
    requests come, and each failure was a warning in the broker's log, the same line
    every 5 s for as long as the server was down. Now: one warning when fetches begin
    to fail, with the reason (a reminder at most once a minute: none within this test),
    and one line when a fetch succeeds again."""
    with (
        serve_jwks([RSA_KEY]) as server,
        _broker_of_lapsing_key_set(redis_server, server) as broker,
    ):
        topic = f"jwks-log-{time.time_ns()}"
        token = RSA_KEY.token(_rights(topic))
        await _wait_for_history(broker, topic, token, 200)
        server.failing = True

        async def failed_twice() -> bool:
            await history(broker.url, topic, bearer(token))  # (requests make it fetch)
            return server.failure_count() >= 2

        timeout = MAX_STALE_SECONDS + 2 * JWKS_MIN_REFETCH_SECONDS
        await await_until(failed_twice, timeout=timeout, what="two failed fetches", interval=0.25)
        served = server.fetch_count()
        server.failing = False

        async def fetched_again() -> bool:
            await history(broker.url, topic, bearer(token))
            return server.fetch_count() > served and "succeeded again" in broker.log()

        timeout = JWKS_MIN_REFETCH_SECONDS + 5
        await await_until(fetched_again, timeout=timeout, what="a fetch again", interval=0.25)
        said = [line for line in broker.log().splitlines() if "JWKS fetch from" in line]
        assert len(said) == 2, said
        assert "WARNING" in said[0] and f"JWKS fetch from {server.url} failed: " in said[0]
        assert "503" in said[0], said  # (the reason: the server's answer)
        assert "INFO" in said[1] and "succeeded again, after failing since " in said[1]


async def test_a_token_expired_since_it_was_verified_is_401_though_its_key_set_lapsed(
    redis_server: RedisServer,
) -> None:
    """A token verified while its key set could judge it, and expired since, is a bad
    token whatever the set's state now: its signature was checked, its expiry is known.
    A new request with it is answered 401 (the contract's expired token: get a fresh
    one), as an ingest open with it is, not the 503 of a set past its max stale, which
    had its client come back with the same token, and get 503 again while the set
    stayed stale. A publish (lean route) and a read (the app's)."""
    with (
        serve_jwks([RSA_KEY]) as server,
        _broker_of_lapsing_key_set(redis_server, server) as broker,
    ):
        topic = f"jwks-expired-{time.time_ns()}"
        expires_at = int(time.time() + TOKEN_LIFE_S)
        token = RSA_KEY.token({**_rights(topic), "exp": expires_at})
        async with httpx.AsyncClient(base_url=broker.url) as client:
            published = await client.post(
                f"/topics/{topic}/events", json={"data": 1}, headers=bearer(token)
            )
            assert published.status_code == 201, published.text  # (verified, remembered)
            server.failing = True
            probe = RSA_KEY.token(claims(subscribe=[topic]))
            await _wait_for_history(broker, topic, probe, 503)
            assert time.time() > expires_at
            again = await client.post(
                f"/topics/{topic}/events", json={"data": 2}, headers=bearer(token)
            )
        read = await history(broker.url, topic, bearer(token))
        assert again.status_code == 401, again.text
        assert "expired" in again.json()["detail"], again.text
        assert read.status == 401, read
