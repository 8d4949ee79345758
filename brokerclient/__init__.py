"""A Python client for the resumable event broker.

- ``Publisher`` / ``AsyncPublisher``: publish over HTTP, retried under one
  Idempotency-Key; ``stream()`` for a streaming ingest (``application/x-ndjson``).
- ``Subscriber`` / ``AsyncSubscriber``: iterate a topic's events; they resume by
  themselves across drops and instance restarts, and stop at ``broker.end``.
- ``brokerclient.direct.DirectPublisher``: append straight to Redis through the
  broker core's atomic script (imports the core, ``broker``; imported on demand).

Nothing here imports the HTTP edge (``api``) or Starlette. The names below are
imported when first used (``from brokerclient import Publisher`` as ever), so that
``broker publish`` loads no subscriber, ``broker tail`` no publisher, and ``broker
--help`` neither (``brokerclient.cli`` is in this package).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.lazy_names import lazy_names

if TYPE_CHECKING:
    from brokerclient.errors import (
        BrokerClientError,
        RequestFailed,
        StreamInterrupted,
        StreamKeyboardInterrupt,
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

_HOME = {  # each public name: the module that defines it
    "BrokerClientError": "brokerclient.errors",
    "RequestFailed": "brokerclient.errors",
    "StreamInterrupted": "brokerclient.errors",
    "StreamKeyboardInterrupt": "brokerclient.errors",
    "StreamPartFailed": "brokerclient.errors",
    "StreamStopped": "brokerclient.errors",
    "TopicClosed": "brokerclient.errors",
    "TopicDeleted": "brokerclient.errors",
    "Unreachable": "brokerclient.errors",
    "DEFAULT_URL": "brokerclient.http",
    "PublishResult": "brokerclient.http",
    "RetryPolicy": "brokerclient.http",
    "AsyncPublisher": "brokerclient.publisher",
    "Publisher": "brokerclient.publisher",
    "event": "brokerclient.publisher",
    "Event": "brokerclient.sse",
    "SseDecoder": "brokerclient.sse",
    "AsyncSubscriber": "brokerclient.subscriber",
    "Subscriber": "brokerclient.subscriber",
}


if not TYPE_CHECKING:  # (hidden from mypy, which then refuses a name not imported above)
    __getattr__, __dir__ = lazy_names(__name__, _HOME, globals())


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
    "StreamKeyboardInterrupt",
    "StreamPartFailed",
    "StreamStopped",
    "Subscriber",
    "TopicClosed",
    "TopicDeleted",
    "Unreachable",
    "event",
]
