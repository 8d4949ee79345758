"""Configuration enters here, once: ``BROKER_*`` environment variables (and CLI flags).

Everything below the edge takes plain arguments built from this object.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from api.keys import (
    JWKS_MAX_STALE_SECONDS,
    JWKS_MIN_REFETCH_SECONDS,
    JWKS_SHORTEST_MAX_STALE_SECONDS,
    ConfigError,
    hmac_algorithms,
    load_public_key,
)
from broker import constants as c
from broker.ids import MAX_CURSOR_ENTRY
from broker.redis_open import check_redis_url

ENV_PREFIX = "BROKER_"
CLIENT_VARIABLES = frozenset({"BROKER_URL", "BROKER_TOKEN", "BROKER_TOKEN_FILE"})
"""The command-line client's settings: known to ``broker serve``, and ignored by it."""
KEY_SETTINGS = ("jwt_secret", "jwt_public_key", "jwt_jwks_url")
# Upper bounds: a huge value (1e308) was a traceback at start, or a broker that ran and
# failed every request (a deadline past the event loop's clock; a TTL Redis refuses).
MAX_KEEP_SECONDS = 100 * 365 * 86400  # retention, TTL, idempotency: a century
MAX_WAIT_SECONDS = 86400  # heartbeats, retries, timeouts, the drain's grace: a day
MAX_BYTES = 2**31
MAX_COUNT = 10**9
MAX_WORKERS = 512
HEAD_BESIDE_TOPICS = 1024  # a reconnect's request line and other headers, its topics aside


def resume_head_bytes(topics: int) -> int:
    """The longest head of a reconnect to a stream of ``topics`` topics of 200
    characters: each in the URL (``topic=...&``) and in the cursor, and the rest. (A
    browser's reconnect of a stream opened by ``?last_event_id=`` sends its newer id in
    ``Last-Event-ID`` too: /client.js outlasts that 431 by opening it again.)"""
    return topics * (len("topic=&") + 200 + MAX_CURSOR_ENTRY) + HEAD_BESIDE_TOPICS


HOST_NAME = re.compile(  # (underscores too: some Compose service names have them)
    r"(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?"
)


class TopicPolicySetting(BaseModel):
    """One entry of ``BROKER_TOPIC_POLICIES`` (a JSON list); the first match wins."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    pattern: str = Field(pattern=r"^[A-Za-z0-9_.:\-*]{1,200}$")
    maxlen: int | None = Field(None, ge=1, le=MAX_COUNT)
    max_age_seconds: float | None = Field(None, gt=0, le=MAX_KEEP_SECONDS)
    ttl_seconds: float | None = Field(None, gt=0, le=MAX_KEEP_SECONDS)


class Settings(BaseSettings):
    """Every setting of the service; each field is read from ``BROKER_<NAME>``."""

    # (hide_input_in_errors: pydantic's message showed the settings it was given, the
    # JWT secret and the Redis URL's password among them, to whoever reads the log;
    # allow_inf_nan: a time of "inf" turned off what it bounds: heartbeats, the end of
    # a stream at its token's expiry, the slow-client deadlines)
    model_config = SettingsConfigDict(
        env_prefix="BROKER_", extra="ignore", hide_input_in_errors=True, allow_inf_nan=False
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=MAX_WORKERS)
    redis_url: str | None = None
    retention_maxlen: int = Field(c.DEFAULT_RETENTION_MAXLEN, ge=1, le=MAX_COUNT)
    retention_seconds: float | None = Field(None, gt=0, le=MAX_KEEP_SECONDS)
    topic_ttl_seconds: float | None = Field(None, gt=0, le=MAX_KEEP_SECONDS)
    topic_policies: list[TopicPolicySetting] = Field(default_factory=list)
    idempotency_seconds: int = Field(c.DEFAULT_IDEMPOTENCY_SECONDS, ge=1, le=MAX_KEEP_SECONDS)
    max_event_bytes: int = Field(c.DEFAULT_MAX_EVENT_BYTES, ge=1, le=MAX_BYTES)
    max_body_bytes: int = Field(c.DEFAULT_MAX_BODY_BYTES, ge=1, le=MAX_BYTES)
    max_batch: int = Field(c.DEFAULT_MAX_BATCH, ge=1, le=MAX_COUNT)
    max_topics_per_subscription: int = Field(
        c.DEFAULT_MAX_TOPICS_PER_SUBSCRIPTION, ge=1, le=c.MOST_TOPICS_PER_SUBSCRIPTION
    )
    subscriber_buffer_bytes: int = Field(c.DEFAULT_SUBSCRIBER_BUFFER_BYTES, ge=1024, le=MAX_BYTES)
    heartbeat_seconds: float = Field(c.DEFAULT_HEARTBEAT_SECONDS, gt=0, le=MAX_WAIT_SECONDS)
    retry_ms: int = Field(c.DEFAULT_RETRY_MS, ge=0, le=MAX_WAIT_SECONDS * 1000)
    publish_timeout_seconds: float = Field(5.0, gt=0, le=MAX_WAIT_SECONDS)
    publish_durability: Literal["leader", "replicated"] = "leader"
    # A Redis that may evict keys (a maxmemory-policy other than noeviction) loses or
    # repeats events in silence: refused unless allowed (broker/redis_checks.py).
    redis_eviction: Literal["refuse", "allow"] = "refuse"
    shutdown_grace_seconds: float = Field(5.0, gt=0, le=MAX_WAIT_SECONDS)
    head_timeout_seconds: float = Field(c.DEFAULT_HEAD_TIMEOUT_SECONDS, gt=0, le=MAX_WAIT_SECONDS)
    max_head_bytes: int = Field(c.DEFAULT_MAX_HEAD_BYTES, ge=1024, le=MAX_BYTES)
    body_timeout_seconds: float = Field(c.DEFAULT_BODY_TIMEOUT_SECONDS, gt=0, le=MAX_WAIT_SECONDS)
    max_connections: int = Field(c.DEFAULT_MAX_CONNECTIONS, ge=1, le=MAX_COUNT)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = False
    # Tune Python's garbage collector for many connections (api/gc_tuning.py); off gives
    # CPython's defaults, for comparison.
    gc_tuning: bool = True
    # Authorization: on when one of the three key settings is set.
    jwt_secret: SecretStr | None = None
    jwt_public_key: str | None = None
    jwt_jwks_url: str | None = None
    # How long a fetched key set is trusted while fetches fail (api.keys.JwksKeys).
    jwt_jwks_max_stale_seconds: float = Field(JWKS_MAX_STALE_SECONDS, le=MAX_WAIT_SECONDS)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # Clock skew allowed to a token's exp and nbf (the issuer's clock and this host's).
    jwt_leeway_seconds: float = Field(0.0, ge=0, le=300, allow_inf_nan=False)
    public_topics: str = ""
    cors_origins: str = ""
    # Host names requests may be sent to besides localhost and addresses (api/hosts.py).
    allowed_hosts: str = ""

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_variables(cls, data: Any) -> Any:
        """A mistyped variable (``BROKER_JWT_SECRT``) must not leave the broker open."""
        unknown = unknown_variables(os.environ)
        if unknown:
            hint = "see the README's Configuration"
            if any(name.startswith("BROKER_SERVICE_") for name in unknown):
                hint = "Kubernetes service links of a Service named broker: set the pod's "
                hint += "enableServiceLinks: false, as deploy/kubernetes does"
            raise ValueError(f"unknown setting {', '.join(unknown)} ({hint})")
        return data

    @model_validator(mode="after")
    def _one_key(self) -> Settings:
        given = [f"{ENV_PREFIX}{n.upper()}" for n in KEY_SETTINGS if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"set only one of {', '.join(given)}")
        # A setting that only means something with authorization on, with no key: the
        # key's variable was lost on the way (a secret not mounted), and the broker
        # would run open, publishes to "private" topics and all.
        meant = [
            f"{ENV_PREFIX}{n.upper()}"
            for n in ("jwt_audience", "jwt_issuer", "jwt_leeway_seconds", "public_topics")
            if getattr(self, n)
        ]
        if meant and not given:
            keys = ", ".join(f"{ENV_PREFIX}{n.upper()}" for n in KEY_SETTINGS)
            raise ValueError(
                f"{', '.join(meant)} set with no key ({keys}): authorization would be off"
            )
        return self

    @model_validator(mode="after")
    def _max_stale_of_a_key_set(self) -> Settings:
        """Set without a key set, it bounds nothing: its URL was lost on the way (the
        broker would run open, or with another key), or the setting is a leftover."""
        if "jwt_jwks_max_stale_seconds" in self.model_fields_set and self.jwt_jwks_url is None:
            raise ValueError(
                "BROKER_JWT_JWKS_MAX_STALE_SECONDS set without BROKER_JWT_JWKS_URL: it bounds "
                "how long a fetched key set is trusted, and there is none"
            )
        return self

    @model_validator(mode="after")
    def _streams_can_resume(self) -> Settings:
        """A stream's reconnect must fit the head limit: refused (431), an EventSource
        stops for good. Its head holds every topic twice, in the URL and in the
        cursor (audit: 80 topics of 200 characters streamed, and never resumed)."""
        longest = resume_head_bytes(self.max_topics_per_subscription)
        if longest > self.max_head_bytes:
            raise ValueError(
                f"BROKER_MAX_TOPICS_PER_SUBSCRIPTION={self.max_topics_per_subscription} "
                f"makes a stream's reconnect up to {longest} bytes of head (its topics in "
                f"the URL and in Last-Event-ID), over BROKER_MAX_HEAD_BYTES="
                f"{self.max_head_bytes}: raise BROKER_MAX_HEAD_BYTES to {longest} at least"
            )
        return self

    @model_validator(mode="after")
    def _ingests_pause_within_the_window(self) -> Settings:
        """An ingest's line records answer for the idempotency window after its last
        line. It may stay open longer (its body's timeout runs from each read: blank
        lines, a line in slow pieces), so its watch keeps them answering, once a quarter
        of the window has passed since its last write (``api.ingest_records``); the
        watch looks every eighth of the body timeout at most. Twice the body timeout at
        least: a look comes at most a sixteenth of the window late, and most of the
        window is left for a store slow to answer, or a try that failed, to be tried
        again (one that lapsed began a new ingest at its next line, and a resend stored
        its first lines twice)."""
        shortest = 2 * self.body_timeout_seconds
        if self.idempotency_seconds < shortest:
            raise ValueError(
                f"BROKER_IDEMPOTENCY_SECONDS={self.idempotency_seconds} is shorter than twice "
                f"BROKER_BODY_TIMEOUT_SECONDS={self.body_timeout_seconds:g}: an open "
                "streaming ingest's line records are kept answering by a watch that looks "
                "every eighth of the body timeout, and might lapse between two looks (its "
                "next line would begin anew, and its resend store its first lines twice); "
                f"raise BROKER_IDEMPOTENCY_SECONDS to {math.ceil(shortest)} at least, or "
                "lower BROKER_BODY_TIMEOUT_SECONDS"
            )
        return self

    @model_validator(mode="after")
    def _replicas_need_redis(self) -> Settings:
        if self.publish_durability == "replicated" and not self.redis_url:
            raise ValueError(
                "BROKER_PUBLISH_DURABILITY=replicated needs BROKER_REDIS_URL: the embedded "
                "store has no replica (its publishes would be answered as replicated)"
            )
        return self

    @field_validator(
        "jwt_secret", "jwt_public_key", "jwt_jwks_url", "jwt_audience", "jwt_issuer", mode="before"
    )
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        # An empty value must not read as "unset": that would turn authorization off.
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty (unset the variable to turn this off)")
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _usable_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            if value.get_secret_value().lstrip().startswith("-----BEGIN"):
                raise ValueError("is a PEM key, not a secret (a public key: BROKER_JWT_PUBLIC_KEY)")
            _config_check(hmac_algorithms, value.get_secret_value().encode())
        return value

    @field_validator("jwt_public_key")
    @classmethod
    def _usable_public_key(cls, value: str | None) -> str | None:
        if value is not None:
            _config_check(load_public_key, value)
        return value

    @field_validator("jwt_jwks_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must be an http:// or https:// URL")
            if any(ch.isspace() or not ch.isprintable() for ch in value):
                raise ValueError("has a space or a control character")
            try:
                parts.port  # noqa: B018 (it raises for a port that is not a number)
            except ValueError as error:
                raise ValueError(f"has a bad port: {error}") from None
        return value

    @field_validator("jwt_jwks_max_stale_seconds")
    @classmethod
    def _long_enough_to_refetch(cls, value: float) -> float:
        if value < JWKS_SHORTEST_MAX_STALE_SECONDS:
            raise ValueError(
                f"must be at least {JWKS_SHORTEST_MAX_STALE_SECONDS:g} (seconds): the set is "
                f"fetched at most every {JWKS_MIN_REFETCH_SECONDS:g} s, and fetched again at "
                "half this, so that a key server that answers keeps it trusted"
            )
        return value

    @field_validator("cors_origins")
    @classmethod
    def _exact_origins(cls, value: str) -> str:
        for origin in split_list(value):
            parts = urlsplit(origin)
            exact = f"{parts.scheme}://{parts.netloc}" == origin and parts.hostname
            if origin == "*" or parts.scheme not in ("http", "https") or not exact:
                raise ValueError(
                    f"{origin!r} is not an exact origin such as https://app.example.com "
                    "(never *: credentials are allowed)"
                )
        return value

    @field_validator("host")
    @classmethod
    def _a_host(cls, value: str) -> str:
        # An empty value (a template that rendered nothing) listened on every interface.
        if not value.strip():
            raise ValueError("is empty (127.0.0.1: this host only; 0.0.0.0: every interface)")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: str) -> str:
        for name in split_list(value):
            if not HOST_NAME.fullmatch(name):
                raise ValueError(
                    f"{name!r} is not a host name such as events.example.com or "
                    "*.example.com (no scheme, no port)"
                )
        return value

    @field_validator("redis_url")
    @classmethod
    def _usable_redis_url(cls, value: str | None) -> str | None:
        # Empty is not unset: a secret that rendered nothing gave every instance its own
        # embedded store, each one's subscribers blind to the others' publishes.
        if value is not None and not value.strip():
            raise ValueError("is empty (unset it for the embedded store, or give a redis:// URL)")
        if value:
            check_redis_url(value)  # (a ValueError: pydantic names the variable)
        return value

    @field_validator("retention_seconds", "topic_ttl_seconds", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value


class SettingsRefused(SystemExit):
    """Settings the broker will not start with: the process exits non-zero, saying in
    one line which variable is wrong and why (no traceback: the operator needs the
    variable, and pydantic's internals named none by its ``BROKER_`` name)."""


def settings_from_environment() -> Settings:
    """The settings the ``BROKER_*`` variables give, or ``SettingsRefused``. Both ways
    to start read them here: ``broker serve``, and ``uvicorn --factory
    api.app:create_app``, which printed pydantic's traceback. Only a settings error is
    turned into a refusal: any other exception is a bug, and keeps its traceback."""
    try:
        return Settings()
    except ValidationError as error:  # a mistyped or unusable setting: never start open
        raise SettingsRefused(f"broker: {describe(error)}") from error
    except SettingsError as error:  # a setting that is not even readable (bad JSON)
        raise SettingsRefused(f"broker: {unreadable_setting(error)}") from error


def unreadable_setting(error: SettingsError) -> str:
    """pydantic-settings names the field (``error parsing value for field
    "topic_policies" from source "EnvSettingsSource"``): the message names the
    variable the operator set, as every other refusal does."""
    cause = f": {error.__cause__}" if error.__cause__ else ""
    field = re.search(r'field "(\w+)"', str(error))
    if field is None:
        return f"{error}{cause}"
    return f"{ENV_PREFIX}{field.group(1).upper()} is not readable{cause}"


def split_list(value: str) -> list[str]:
    """A comma-separated setting's items."""
    return [item.strip() for item in value.split(",") if item.strip()]


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``BROKER_*`` variables that are no setting: the known names come from the fields."""
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    known |= CLIENT_VARIABLES
    return sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


def _config_check(check: Any, value: Any) -> None:
    try:
        check(value)
    except ConfigError as error:
        raise ValueError(str(error)) from error


def describe(error: ValidationError) -> str:
    """A settings error as one line per variable, named as the user set it."""
    lines = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{_where(problem['loc'])}: {message}" if problem["loc"] else message)
    return "invalid settings: " + "; ".join(lines)


def _where(loc: tuple[int | str, ...]) -> str:
    """The variable, and inside a JSON one which item and member: a policy's bad
    ``maxlen`` was only "BROKER_TOPIC_POLICIES: Input should be greater than or equal to 1"."""
    variable, *inside = loc
    where = f"{ENV_PREFIX}{str(variable).upper()}"
    for part in inside:
        where += f"[{part}]" if isinstance(part, int) else f".{part}"
    return where
