"""The baseline: the SSE endpoint a user writes by hand from the FastAPI documentation.

`GET /topics/{topic}/events` is a FastAPI path operation with
`response_class=EventSourceResponse` (FastAPI's own SSE support, per its SSE tutorial)
whose generator runs one blocking `XREAD` loop per client on `redis.asyncio`, so each
subscriber holds its own Redis connection and each event is encoded once per
subscriber. `POST` does an `XADD` (a batch in one MULTI/EXEC pipeline). It speaks the
same routes as the broker so that the harness can run the same scenarios against it.

`BENCH_BASELINE_SSE=sse-starlette` serves the stream with sse-starlette's
`EventSourceResponse` instead, the older third-party pattern; the Redis side is the same.

Run it: `BENCH_REDIS_URL=redis://... uvicorn --factory bench.baseline_app:create_app`.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as redis
from fastapi import FastAPI, Header, Request
from fastapi.responses import PlainTextResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

BLOCK_MS = 15_000
# redis-py caps a pool at 100 connections and times reads out after 5 s; each subscriber
# here holds a connection in a 15 s blocking XREAD, so a user lifts both, as this does.
MAX_CONNECTIONS = 100_000


def _key(topic: str) -> str:
    return f"baseline:topic:{topic}"


def _fields(event: dict[str, Any]) -> dict[str, str]:
    fields = {"data": json.dumps(event["data"], separators=(",", ":"))}
    if event.get("event"):
        fields["event"] = str(event["event"])
    return fields


async def _entries(
    client: redis.Redis, topic: str, last_id: str
) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """Every entry after `last_id`, forever: one blocking XREAD per client, by hand."""
    while True:
        reply: Any = await client.xread({_key(topic): last_id}, block=BLOCK_MS)
        for _stream, entries in reply:
            for entry_id, fields in entries:
                last_id = entry_id
                yield entry_id, fields


def _add_publish(app: FastAPI) -> None:
    @app.post("/topics/{topic}/events", status_code=201)
    async def publish(topic: str, request: Request) -> dict[str, Any]:
        client: redis.Redis = request.app.state.redis
        body = await request.json()
        if not isinstance(body, list):
            return {"id": await client.xadd(_key(topic), _fields(body))}  # type: ignore[arg-type]
        async with client.pipeline(transaction=True) as pipe:
            for event in body:
                pipe.xadd(_key(topic), _fields(event))  # type: ignore[arg-type]
            return {"ids": await pipe.execute()}


def _add_fastapi_stream(app: FastAPI) -> None:
    @app.get("/topics/{topic}/events", response_class=EventSourceResponse)
    async def subscribe(
        topic: str, request: Request, last_event_id: str | None = Header(default=None)
    ) -> AsyncIterator[ServerSentEvent]:
        async for entry_id, fields in _entries(
            request.app.state.redis, topic, last_event_id or "$"
        ):
            yield ServerSentEvent(raw_data=fields["data"], id=entry_id, event=fields.get("event"))


def _add_sse_starlette_stream(app: FastAPI) -> None:
    from sse_starlette import EventSourceResponse as StarletteEventSourceResponse

    @app.get("/topics/{topic}/events")
    async def subscribe(
        topic: str, request: Request, last_event_id: str | None = Header(default=None)
    ) -> StarletteEventSourceResponse:
        async def events() -> AsyncIterator[dict[str, str]]:
            entries = _entries(request.app.state.redis, topic, last_event_id or "$")
            async for entry_id, fields in entries:
                yield {"id": entry_id, "data": fields["data"], **_event_type(fields)}

        return StarletteEventSourceResponse(events(), sep="\n")


def _event_type(fields: dict[str, str]) -> dict[str, str]:
    return {"event": fields["event"]} if "event" in fields else {}


def _add_operations(app: FastAPI) -> None:
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> dict[str, str]:
        await request.app.state.redis.ping()
        return {"status": "ready"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        return "# the baseline exports no metrics\n"


def create_app() -> FastAPI:
    url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = redis.from_url(
            url, decode_responses=True, max_connections=MAX_CONNECTIONS, socket_timeout=None
        )
        yield
        await app.state.redis.aclose()

    app = FastAPI(lifespan=lifespan)
    _add_publish(app)
    if os.environ.get("BENCH_BASELINE_SSE") == "sse-starlette":
        _add_sse_starlette_stream(app)
    else:
        _add_fastapi_stream(app)
    _add_operations(app)
    return app
