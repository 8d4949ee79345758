"""The broker's core: topic logs on Redis Streams, resumable subscriptions, fan-out.

Framework-free: nothing here imports a web framework or ``api``.

The names below are imported when first used (``from broker import Broker`` as ever):
``brokerclient`` reads event ids with ``broker.ids``, and importing that submodule runs
this file; an eager one loaded the core and the Redis store (redis-py, fakeredis) into
every ``broker tail``, a third of its start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.lazy_names import lazy_names

if TYPE_CHECKING:
    from broker.core import Broker, BrokerLimits, HistoryPage, TopicInfo
    from broker.errors import (
        BrokerError,
        InvalidEventId,
        InvalidInput,
        InvalidTopic,
        StoreUnavailable,
        StreamOver,
        TooLarge,
        TopicClosed,
        TopicNotFound,
    )
    from broker.ids import EventId, parse_last_event_id
    from broker.model import AppendResult, NewEvent
    from broker.redis_open import open_store
    from broker.subscription import SubscriberTooSlow, Subscription
    from broker.subscription_replay import ForeignCursor, StartFrom

_HOME = {  # each public name: the module that defines it
    "Broker": "broker.core",
    "BrokerLimits": "broker.core",
    "HistoryPage": "broker.core",
    "TopicInfo": "broker.core",
    "BrokerError": "broker.errors",
    "InvalidEventId": "broker.errors",
    "InvalidInput": "broker.errors",
    "InvalidTopic": "broker.errors",
    "StoreUnavailable": "broker.errors",
    "StreamOver": "broker.errors",
    "TooLarge": "broker.errors",
    "TopicClosed": "broker.errors",
    "TopicNotFound": "broker.errors",
    "EventId": "broker.ids",
    "parse_last_event_id": "broker.ids",
    "AppendResult": "broker.model",
    "NewEvent": "broker.model",
    "open_store": "broker.redis_open",
    "SubscriberTooSlow": "broker.subscription",
    "Subscription": "broker.subscription",
    "ForeignCursor": "broker.subscription_replay",
    "StartFrom": "broker.subscription_replay",
}


if not TYPE_CHECKING:  # (hidden from mypy, which then refuses a name not imported above)
    __getattr__, __dir__ = lazy_names(__name__, _HOME, globals())


__all__ = [
    "AppendResult",
    "Broker",
    "BrokerError",
    "BrokerLimits",
    "EventId",
    "ForeignCursor",
    "HistoryPage",
    "InvalidEventId",
    "InvalidInput",
    "InvalidTopic",
    "NewEvent",
    "StartFrom",
    "StoreUnavailable",
    "StreamOver",
    "SubscriberTooSlow",
    "Subscription",
    "TooLarge",
    "TopicClosed",
    "TopicInfo",
    "TopicNotFound",
    "open_store",
    "parse_last_event_id",
]
