"""Configuration enters here, once: ``BROKER_*`` environment variables (and CLI flags).

Everything below the edge takes plain arguments built from this object.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker import constants as c


class TopicPolicySetting(BaseModel):
    """One entry of ``BROKER_TOPIC_POLICIES`` (a JSON list); the first match wins."""

    model_config = ConfigDict(extra="forbid")

    pattern: str = Field(pattern=r"^[A-Za-z0-9_.:\-*]{1,200}$")
    maxlen: int | None = Field(None, ge=1)
    max_age_seconds: float | None = Field(None, gt=0)
    ttl_seconds: float | None = Field(None, gt=0)


class Settings(BaseSettings):
    """Every setting of the service; each field is read from ``BROKER_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="BROKER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    redis_url: str | None = None
    retention_maxlen: int = Field(c.DEFAULT_RETENTION_MAXLEN, ge=1)
    retention_seconds: float | None = Field(None, gt=0)
    topic_ttl_seconds: float | None = Field(None, gt=0)
    topic_policies: list[TopicPolicySetting] = Field(default_factory=list)
    idempotency_seconds: int = Field(c.DEFAULT_IDEMPOTENCY_SECONDS, ge=1)
    max_event_bytes: int = Field(c.DEFAULT_MAX_EVENT_BYTES, ge=1)
    max_body_bytes: int = Field(c.DEFAULT_MAX_BODY_BYTES, ge=1)
    max_batch: int = Field(c.DEFAULT_MAX_BATCH, ge=1)
    max_topics_per_subscription: int = Field(c.DEFAULT_MAX_TOPICS_PER_SUBSCRIPTION, ge=1)
    subscriber_buffer_bytes: int = Field(c.DEFAULT_SUBSCRIBER_BUFFER_BYTES, ge=1024)
    heartbeat_seconds: float = Field(c.DEFAULT_HEARTBEAT_SECONDS, gt=0)
    retry_ms: int = Field(c.DEFAULT_RETRY_MS, ge=0)
    publish_timeout_seconds: float = Field(5.0, gt=0)
    body_timeout_seconds: float = Field(30.0, gt=0)
    publish_durability: Literal["leader", "replicated"] = "leader"
    shutdown_grace_seconds: float = Field(5.0, gt=0)
    head_timeout_seconds: float = Field(c.DEFAULT_HEAD_TIMEOUT_SECONDS, gt=0)
    max_head_bytes: int = Field(c.DEFAULT_MAX_HEAD_BYTES, ge=1024)
    body_timeout_seconds: float = Field(c.DEFAULT_BODY_TIMEOUT_SECONDS, gt=0)
    max_connections: int = Field(c.DEFAULT_MAX_CONNECTIONS, ge=1)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = False

    @field_validator("redis_url", "retention_seconds", "topic_ttl_seconds", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value
