"""A FastAPI app with the broker mounted under ``/broker``, publishing from its own endpoint.

For those who started from FastAPI's ``EventSourceResponse``: instead of a
generator per client (lost on every reconnect), mount the broker and publish
into a topic; browsers subscribe to ``/broker/topics/{topic}/events`` and resume
exactly after a drop (``Last-Event-ID``), on any instance.

    uvicorn examples.fastapi_app:app        # BROKER_* variables configure the broker

``BROKER_REDIS_URL`` unset runs the embedded store (one process, not durable).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from api.app import create_app
from broker import Broker, NewEvent

broker_app = create_app()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Starlette runs the lifespan of the outer app only: enter the broker's by hand.
    async with broker_app.router.lifespan_context(broker_app):
        yield


app = FastAPI(lifespan=lifespan)
app.mount("/broker", broker_app)


@app.post("/orders/{order_id}/status")
async def set_status(order_id: str, status: str) -> dict[str, Any]:
    """Your endpoint: do the work, then publish the event through the broker's core."""
    broker: Broker = broker_app.state.broker
    result = await broker.publish(
        f"orders.{order_id}", [NewEvent(data=json.dumps({"status": status}), event="status")]
    )
    return {"order": order_id, "event_id": str(result.ids[0])}
