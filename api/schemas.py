"""Pydantic models of the JSON bodies, for the OpenAPI document.

Requests are checked by ``broker.validation`` (faster, and with the contract's
exact errors); these models describe the same shapes for readers and tools.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class EventIn(BaseModel):
    """One event to publish."""

    data: Any = Field(description="Any JSON value; subscribers get its compact JSON text")
    event: str | None = Field(None, description="Event type; must not start with 'broker.'")
    retry: int | None = Field(None, ge=0, description="Reconnection delay hint in ms")


END_ID = Field(None, description="With ?close=true: the id of the topic's broker.end")


class Published(BaseModel):
    id: str
    end_id: str | None = END_ID


class PublishedBatch(BaseModel):
    ids: list[str]
    end_id: str | None = END_ID


class IngestSummary(BaseModel):
    """A streaming ingest's answer past ``BROKER_MAX_BATCH`` lines."""

    count: int
    first_id: str
    last_id: str
    end_id: str | None = END_ID


class HistoryEvent(BaseModel):
    id: str
    event: str | None
    data: Any


class GapNotice(BaseModel):
    """The data of a ``broker.gap`` event (and of ``gap`` in a history page): events
    trimmed by retention, a cursor this log never issued, or a topic deleted."""

    reason: Literal["trimmed", "unknown", "deleted"]
    requested: str
    resumed_after: str | None
    topic: str | None = None


class HistoryPage(BaseModel):
    events: list[HistoryEvent]
    next: str | None
    gap: GapNotice | None = None


class TopicInfo(BaseModel):
    topic: str
    length: int
    first_id: str | None
    last_id: str | None
    closed: bool


class TopicSummary(BaseModel):
    topic: str
    length: int
    last_id: str | None
    closed: bool


class TopicList(BaseModel):
    topics: list[TopicSummary]
    next: str | None = Field(description="The cursor of the next page; null at the end")


class Problem(BaseModel):
    """RFC 9457 problem details; some problems carry extension members of their own."""

    type: str
    title: str
    status: int
    detail: str
    resend: Literal["whole", "after_line", "unknown"] | None = Field(
        None,
        description=(
            "A streaming ingest ended by ingest-lines-lost, ingest-log-lost or "
            "ingest-records-lapsed: what to send again. whole: the whole stream, with its "
            "Idempotency-Key (a 503 with Retry-After); after_line: only the lines after "
            "last_line_kept, as a stream of their own (the whole stream again would store "
            "the lines kept twice: a 409 without Retry-After); unknown: the lines kept "
            "cannot be told exactly (last_line_kept_at_most; a 409 too)"
        ),
    )
    last_line_kept: int | None = Field(
        None, description="With resend after_line: the last line of the stream kept (0: none)"
    )
    last_line_kept_at_most: int | None = Field(
        None, description="With resend unknown: the lines kept are at most lines 1 to this one"
    )
    first_id: str | None = Field(
        None, description="With resend after_line: the id of the stream's first line kept"
    )
    last_id: str | None = Field(
        None, description="With resend after_line: the id of the stream's last line kept"
    )
