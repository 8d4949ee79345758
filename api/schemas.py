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


class Published(BaseModel):
    id: str


class PublishedBatch(BaseModel):
    ids: list[str]


class HistoryEvent(BaseModel):
    id: str
    event: str | None
    data: Any


class GapNotice(BaseModel):
    """The data of a ``broker.gap`` event (and of ``gap`` in a history page)."""

    reason: Literal["trimmed", "unknown"]
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


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
