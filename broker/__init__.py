"""The broker's core: topic logs on Redis Streams, resumable subscriptions, fan-out.

Framework-free: nothing here imports a web framework or ``api``.
"""

from __future__ import annotations

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
