"""Publishing straight to Redis, for producers that run beside it.

``DirectPublisher`` appends through the broker core's own store and its atomic
append script (``broker/lua/append.lua``): the same epoch, ids, retention,
idempotency records and validation as a publish through the HTTP edge, so
subscribers cannot tell the two apart. It skips one network hop and the HTTP
edge's work; it needs what the edge needs: the Redis URL, and the retention and
idempotency settings the deployment's brokers run with (pass the same values,
or retention differs by who published last).

Errors are the core's: ``broker.InvalidInput`` (and ``InvalidTopic``,
``TooLarge``) for what the edge would answer 400/413, and
``broker.StoreUnavailable`` when Redis does not answer (the append may have been
stored: retry it with the error's ``idempotency_key``, the caller's or the one made
up for it, and it is stored once). A closed topic raises ``brokerclient.TopicClosed``,
as the HTTP publishers do (its ``end_id`` the end's id); ``close_topic`` closes one
as ``POST /topics/{topic}/close`` does. Pass the deployment's retention, TTL and
topic policies too: the append script applies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal

from broker import constants as c
from broker import errors
from broker.errors import StoreUnavailable
from broker.model import NewEvent
from broker.policy import TopicPolicy
from broker.redis_open import open_store
from broker.store import Store
from broker.validation import (
    check_finite_numbers,
    check_idempotency_key,
    check_topic,
    event_from_json,
    event_from_text,
    events_from_json,
)
from brokerclient.errors import TopicClosed
from brokerclient.http import PublishResult, new_idempotency_key

DIRECT_POOL_SIZE = 2


class DirectPublisher:
    """Appends events to topics in Redis as the broker does (asyncio).

    ``redis_url`` takes every form ``BROKER_REDIS_URL`` does (one Redis,
    Sentinel, Cluster). Use as an async context manager, or ``aclose()``. Give it
    the broker's settings (retention, TTL, policies, ``durability`` as
    ``BROKER_PUBLISH_DURABILITY``): the append is the broker's, with them.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        retention_maxlen: int = c.DEFAULT_RETENTION_MAXLEN,
        retention_seconds: float | None = None,
        idempotency_seconds: int = c.DEFAULT_IDEMPOTENCY_SECONDS,
        topic_ttl_seconds: float | None = None,
        topic_policies: Sequence[TopicPolicy] = (),
        max_event_bytes: int = c.DEFAULT_MAX_EVENT_BYTES,
        max_batch: int = c.DEFAULT_MAX_BATCH,
        durability: Literal["leader", "replicated"] = "leader",
        store: Store | None = None,
    ) -> None:
        if not redis_url and store is None:
            raise ValueError("a direct publisher needs a Redis URL (the embedded store is private)")
        self._store = store or open_store(
            redis_url,
            retention_maxlen=retention_maxlen,
            retention_seconds=retention_seconds,
            idempotency_seconds=idempotency_seconds,
            topic_ttl_seconds=topic_ttl_seconds,
            topic_policies=list(topic_policies),
            pool_size=DIRECT_POOL_SIZE,
            durability=durability,  # as BROKER_PUBLISH_DURABILITY: "replicated" waits for a replica
        )
        self._max_event_bytes = max_event_bytes
        self._max_batch = max_batch

    async def publish(
        self,
        topic: str,
        data: Any,
        *,
        event: str | None = None,
        retry: int | None = None,
        idempotency_key: str | None = None,
        close: bool = False,
    ) -> PublishResult:
        """Append one event whose data is any JSON value; ``close`` closes the topic after it."""
        check_finite_numbers(data)
        item: dict[str, Any] = {"data": data}
        item |= {k: v for k, v in (("event", event), ("retry", retry)) if v is not None}
        new = event_from_json(item, self._max_event_bytes)
        return await self._append(topic, [new], idempotency_key, close)

    async def publish_text(
        self,
        topic: str,
        text: str,
        *,
        event: str | None = None,
        idempotency_key: str | None = None,
        close: bool = False,
    ) -> PublishResult:
        """Append one event whose data is text."""
        new = event_from_text(text, event, self._max_event_bytes)
        return await self._append(topic, [new], idempotency_key, close)

    async def publish_batch(
        self,
        topic: str,
        events: Sequence[dict[str, Any]],
        *,
        idempotency_key: str | None = None,
        close: bool = False,
    ) -> PublishResult:
        """Append several events atomically and in order (``{"data", "event"?, "retry"?}``)."""
        check_finite_numbers(list(events), field="events")
        items = events_from_json(
            list(events), max_event_bytes=self._max_event_bytes, max_batch=self._max_batch
        )
        return await self._append(topic, items, idempotency_key, close)

    async def close_topic(self, topic: str) -> str:
        """Close the topic: its log ends with ``broker.end``; the end's event id.

        The append script's close with no events, as ``POST /topics/{topic}/close``
        sends it: closing a closed topic answers the same id, so a retry is safe
        without an idempotency key.
        """
        check_topic(topic)
        result = await self._store.append(topic, [], close=True)
        return str(result.end_id)

    async def _append(
        self, topic: str, events: list[NewEvent], idempotency_key: str | None, close: bool = False
    ) -> PublishResult:
        check_topic(topic)
        key = check_idempotency_key(idempotency_key) or new_idempotency_key()
        try:
            result = await self._store.append(topic, events, idempotency_key=key, close=close)
        except StoreUnavailable as error:
            error.idempotency_key = key  # (made up here: the caller could not retry safely)
            raise
        except errors.TopicClosed as closed:
            raise DirectTopicClosed(closed) from None
        ids = [str(i) for i in result.ids]
        return PublishResult(
            ids=ids,
            replayed=result.replayed,
            count=len(ids),
            first_id=ids[0] if ids else None,
            last_id=ids[-1] if ids else None,
            idempotency_key=key,
            end_id=str(result.end_id) if result.end_id else None,  # (close=True: as HTTP's)
        )

    async def aclose(self) -> None:
        await self._store.close()

    async def __aenter__(self) -> DirectPublisher:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class DirectTopicClosed(TopicClosed, errors.TopicClosed):  # type: ignore[misc]  # (end_id)
    """``brokerclient.TopicClosed``, as the HTTP publishers raise it, and the core's
    ``broker.errors.TopicClosed`` too (what this publisher raised before): either
    ``except`` catches it. ``end_id`` and ``problem`` as an HTTP publisher's."""

    def __init__(self, closed: errors.TopicClosed) -> None:
        # (not the bases' __init__: each would hand the other its own arguments)
        Exception.__init__(self, f"topic {closed.topic!r}: 409 {closed}")
        self.status = 409
        self.problem = {
            "type": "/problems#topic-closed",
            "title": "Topic closed",
            "status": 409,
            "detail": str(closed),
            "end_id": closed.end_id,
        }
        self.topic = closed.topic
