"""A Python client for the resumable event broker.

- ``Publisher`` / ``AsyncPublisher``: publish over HTTP, retried under one
  Idempotency-Key; ``stream()`` for a streaming ingest (``application/x-ndjson``).
- ``Subscriber`` / ``AsyncSubscriber``: iterate a topic's events; they resume by
  themselves across drops and instance restarts, and stop at ``broker.end``.
- ``brokerclient.direct.DirectPublisher``: append straight to Redis through the
  broker core's atomic script (imports the core, ``broker``; imported on demand).

Nothing here imports the HTTP edge (``api``) or Starlette.
"""

from __future__ import annotations

from brokerclient.errors import (
    BrokerClientError,
    RequestFailed,
    StreamInterrupted,
    StreamPartFailed,
    StreamStopped,
    TopicClosed,
    TopicDeleted,
    Unreachable,
)
from brokerclient.http import DEFAULT_URL, PublishResult, RetryPolicy
from brokerclient.publisher import AsyncPublisher, Publisher, event
from brokerclient.sse import Event, SseDecoder
from brokerclient.subscriber import AsyncSubscriber, Subscriber

__all__ = [
    "DEFAULT_URL",
    "AsyncPublisher",
    "AsyncSubscriber",
    "BrokerClientError",
    "Event",
    "PublishResult",
    "Publisher",
    "RequestFailed",
    "RetryPolicy",
    "SseDecoder",
    "StreamInterrupted",
    "StreamPartFailed",
    "StreamStopped",
    "Subscriber",
    "TopicClosed",
    "TopicDeleted",
    "Unreachable",
    "event",
]
