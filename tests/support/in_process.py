"""``broker serve``'s edge run in the test's own event loop, so a test can step into it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn

from api.app import create_app
from api.settings import Settings
from tests.support.polling import await_until
from tests.support.redis_server import free_port


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[int]:
    """The app on a free port with the broker's own HTTP protocol; yields the port."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        http="api.connections:BrokerHttpProtocol",
        lifespan="on",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    await await_until(lambda: server.started, timeout=10, what="the broker started")
    try:
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
