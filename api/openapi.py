"""The OpenAPI document, generated from the routes, their docstrings and a table per route.

``ROUTE_DOCS`` says, by route name, what each route takes (parameters, body, token)
and every status it answers (README "API" and "Errors"); the JSON bodies' schemas
are ``api.schemas``' models. A route of the app with no entry fails generation (and
the tests): a new route cannot go undocumented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.routing import BaseRoute, Route

from api import schemas
from broker import constants as c

MODELS: list[type[BaseModel]] = [
    schemas.EventIn,
    schemas.Published,
    schemas.PublishedBatch,
    schemas.IngestSummary,
    schemas.HistoryPage,
    schemas.TopicInfo,
    schemas.TopicList,
    schemas.Problem,
]


def ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}


def _parameter(
    name: str, description: str, *, where: str = "query", **schema: Any
) -> dict[str, Any]:
    return {"name": name, "in": where, "description": description, "schema": schema}


ANY_OBJECT = {"type": "object"}
TOPIC_NAME = {"type": "string", "pattern": f"^{c.TOPIC_PATTERN.pattern}$"}
RETRY_AFTER = {"Retry-After": _header("Seconds to wait before retrying")}
BROKER_HEARTBEAT = (
    "On a stream (not on a come-back-later retry: hint): BROKER_HEARTBEAT_SECONDS, a "
    "plain decimal; a ':' comment (with ?heartbeat=event, a broker.beat event) comes at "
    "least this often, so a stream silent for two of these is dead"
)

# -- parameters, by the name the table uses -----------------------------------------

PARAMETERS: dict[str, dict[str, Any]] = {
    "event": _parameter("event", "Event type of a text/plain publish", type="string"),
    "close": _parameter(
        "close",
        "Close the topic after this publish's events",
        type="string",
        enum=["true", "false"],
    ),
    "Idempotency-Key": _parameter(
        "Idempotency-Key",
        "A repeat within BROKER_IDEMPOTENCY_SECONDS stores nothing new (200); "
        "a streaming ingest stores line n under K:n, and refuses (400) a resent "
        "line n that is not the one stored",
        type="string",
        where="header",
        pattern=f"^{c.IDEMPOTENCY_KEY_PATTERN.pattern}$",
    ),
    "Last-Event-ID": _parameter(
        "Last-Event-ID",
        "Resume after this id (beats ?last_event_id and ?from)",
        where="header",
        type="string",
    ),
    "last_event_id": _parameter("last_event_id", "Resume after this id", type="string"),
    "from": _parameter(
        "from",
        "Without a cursor: the whole retained history, or only new events",
        type="string",
        enum=["now", "earliest"],
        default="now",
    ),
    "positions": _parameter(
        "positions",
        "Where the stream stands with no event to deliver (its start, a later origin of "
        "a topic with no log) as broker.position events (data {}) a script can see, not "
        "id: lines with no data",
        type="string",
        enum=["false", "true"],
        default="false",
    ),
    "heartbeat": _parameter(
        "heartbeat",
        "How the heartbeats come: ':' comments, or (event) broker.beat events a script can "
        "see, one first, their data the interval in seconds and no id (Last-Event-ID is "
        "unchanged), so a page tells a stream that died in silence (/client.js asks)",
        type="string",
        enum=["comment", "event"],
        default="comment",
    ),
    "after": _parameter(
        "after", "History (Accept: application/json): events after this id", type="string"
    ),
    "limit": _parameter("limit", "Page size", type="integer", minimum=1, maximum=1000, default=100),
    "topics": {
        **_parameter(
            "topic",
            "The topics (repeat it: ?topic=a&topic=b), at most BROKER_MAX_TOPICS_PER_SUBSCRIPTION",
            type="array",
            items=TOPIC_NAME,
        ),
        "required": True,
        "style": "form",
        "explode": True,
    },
    "stats_topics": {
        **_parameter(
            "topic",
            "Topics to report beside those this instance streams",
            type="array",
            items=TOPIC_NAME,
        ),
        "style": "form",
        "explode": True,
    },
    "prefix": _parameter("prefix", "Only topics whose name begins with it", type="string"),
    "cursor": _parameter("cursor", "The `next` of the page before", type="string"),
}

# -- problem answers (application/problem+json), shared by the routes, by status ----------

PROBLEMS: dict[str, tuple[str, str]] = {
    "400": ("InvalidRequest", "Invalid input (body, topic name, id, parameter or header)"),
    "401": ("Unauthorized", "Authorization on: no, expired or invalid token"),
    "403": ("Forbidden", "Authorization on: the token does not grant this topic"),
    "404": ("TopicNotFound", "The topic never had an event"),
    "408": ("RequestTimeout", "The body did not arrive within BROKER_BODY_TIMEOUT_SECONDS"),
    "409": (
        "TopicClosed",
        "The topic is closed (has end_id); or, to a streaming ingest, it was deleted "
        "while the ingest wrote to it (topic-deleted: not to be resent), or its line "
        "records lapsed (ingest-records-lapsed), or its newest lines were lost with the "
        "lines kept not recorded under its key, or without one (ingest-lines-lost with "
        "resend after_line or unknown): no Retry-After, not to be resent whole (that "
        "stores the lines kept twice); the rest sent as a stream of its own",
    ),
    "413": ("ContentTooLarge", "An event, the body or the batch is over its limit"),
    "415": ("UnsupportedMediaType", "A body neither JSON, NDJSON nor UTF-8 text"),
    "421": ("HostNotServed", "The Host names no name this broker serves"),
    "431": ("HeadTooLarge", "The request head is over BROKER_MAX_HEAD_BYTES"),
    "501": ("NotImplemented", "A Transfer-Encoding other than chunked"),
    "503": (
        "Unavailable",
        "The store is unreachable or too slow, the key set is not fetched yet, or the "
        "instance holds too many connections: retry after Retry-After; to a streaming "
        "ingest, its log or its newest lines were lost (ingest-log-lost, "
        "ingest-lines-lost: resend whole, the whole stream sent again with its key)",
    ),
}
EVERY_ROUTE = ["431"]  # (the connection guard answers it, before any route)


def _problem_response(status: str, description: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/problem+json": {"schema": ref(schemas.Problem)}},
    }
    if status == "503":
        response["headers"] = RETRY_AFTER
    if status == "401":
        response["headers"] = {"WWW-Authenticate": _header("Bearer")}
    return response


# -- what each route takes and answers ---------------------------------------------


@dataclass(frozen=True)
class Doc:
    parameters: list[str] = field(default_factory=list)  # PARAMETERS' names
    body: dict[str, Any] | None = None  # the requestBody's content
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)  # status: response
    problems: list[str] = field(default_factory=list)  # PROBLEMS' statuses
    secured: bool = False  # takes a token (when authorization is on)


def answer(
    description: str, content: dict[str, Any] | None = None, **headers: str
) -> dict[str, Any]:
    """A response; ``headers`` by name with "_" for "-"."""
    response: dict[str, Any] = {"description": description}
    if content:
        response["content"] = content
    if headers:
        response["headers"] = {k.replace("_", "-"): _header(v) for k, v in headers.items()}
    return response


PUBLISHED = _json(
    {"oneOf": [ref(m) for m in (schemas.Published, schemas.PublishedBatch, schemas.IngestSummary)]}
)
EVENT_STREAM = {"text/event-stream": {"schema": {"type": "string"}}}
PROBE = _json(ANY_OBJECT)
TOPIC_ROUTE = ["400", "401", "403", "421", "503"]

ROUTE_DOCS: dict[str, Doc] = {
    "publish": Doc(
        parameters=["event", "close", "Idempotency-Key"],
        body={
            "application/json": {
                "schema": {
                    "oneOf": [
                        ref(schemas.EventIn),
                        {
                            "type": "array",
                            "items": ref(schemas.EventIn),
                            "minItems": 1,
                            "description": "A batch (at most BROKER_MAX_BATCH), stored atomically",
                        },
                    ]
                }
            },
            "application/x-ndjson": {
                "schema": {
                    "type": "string",
                    "description": "Streaming ingest: one EventIn JSON object per line, "
                    "each stored as it arrives",
                }
            },
            "text/plain": {"schema": {"type": "string", "description": "The data (UTF-8)"}},
        },
        answers={
            "201": answer(
                "Stored: {id}, a batch or ingest {ids} (or, past "
                "BROKER_MAX_BATCH lines, {count, first_id, last_id})",
                PUBLISHED,
            ),
            "200": answer(
                "An Idempotency-Key repeat: nothing stored, the first answer's ids",
                PUBLISHED,
                Idempotent_Replayed="true",
            ),
        },
        problems=[*TOPIC_ROUTE, "408", "409", "413", "415", "501"],
        secured=True,
    ),
    "subscribe": Doc(
        parameters=[
            "Last-Event-ID",
            "last_event_id",
            "from",
            "positions",
            "heartbeat",
            "after",
            "limit",
        ],
        answers={
            "200": answer(
                "The stream (text/event-stream; while the store is down or the instance "
                "drains, only a retry: hint, then its end); with Accept: application/json a "
                "history page (?after, ?limit)",
                {**EVENT_STREAM, **_json(ref(schemas.HistoryPage))},
                Broker_Heartbeat=BROKER_HEARTBEAT,
            ),
            "204": answer("The topic is closed and the cursor at or past its end (or none)"),
        },
        problems=TOPIC_ROUTE,
        secured=True,
    ),
    "subscribe_many": Doc(
        parameters=["topics", "Last-Event-ID", "last_event_id", "from", "positions", "heartbeat"],
        answers={
            "200": answer(
                "One stream over several topics", EVENT_STREAM, Broker_Heartbeat=BROKER_HEARTBEAT
            ),
            "204": answer("Every topic is closed and the cursor at or past its end (or none)"),
        },
        problems=["400", "401", "403", "421"],
        secured=True,
    ),
    "list_topics": Doc(
        parameters=["prefix", "limit", "cursor"],
        answers={
            "200": answer(
                "A page of the topics the caller may subscribe to", _json(ref(schemas.TopicList))
            )
        },
        problems=["400", "401", "421", "503"],
        secured=True,
    ),
    "topic_info": Doc(
        answers={"200": answer("The topic", _json(ref(schemas.TopicInfo)))},
        problems=[*TOPIC_ROUTE, "404"],
        secured=True,
    ),
    "delete_topic": Doc(answers={"204": answer("Deleted")}, problems=TOPIC_ROUTE, secured=True),
    "close_topic": Doc(
        answers={
            "201": answer("Closed: the id of its broker.end", _json(ref(schemas.Published))),
            "200": answer("It was closed already: the same id", _json(ref(schemas.Published))),
        },
        problems=TOPIC_ROUTE,
        secured=True,
    ),
    "healthz": Doc(answers={"200": answer("The process is up", PROBE)}),
    "readyz": Doc(
        answers={
            "200": answer("It takes new connections", PROBE),
            "503": answer("It drains", PROBE, Retry_After="Seconds"),
        }
    ),
    "readyz_store": Doc(
        answers={
            "200": answer("The store answers", PROBE),
            "503": answer("It does not", PROBE, Retry_After="Seconds"),
        }
    ),
    "metrics": Doc(
        answers={
            "200": answer("Prometheus text format", {"text/plain": {"schema": {"type": "string"}}})
        }
    ),
    "stats": Doc(
        parameters=["stats_topics"],
        answers={
            "200": answer(
                "Events/s (all instances) and subscribers (this instance)", _json(ANY_OBJECT)
            )
        },
        problems=["400", "401", "421", "503"],
        secured=True,
    ),
}

# A token (when authorization is on): the header, else the cookie, else the query.
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
    "cookie": {"type": "apiKey", "in": "cookie", "name": "broker_token"},
    "access_token": {"type": "apiKey", "in": "query", "name": "access_token"},
}
# Any one of them, or none ({}): authorization is off unless configured.
OPTIONAL_TOKEN: list[dict[str, list[str]]] = [
    {},
    {"bearer": []},
    {"cookie": []},
    {"access_token": []},
]


def _operation(route: Route) -> dict[str, Any]:
    doc = ROUTE_DOCS[route.name]
    text = (route.endpoint.__doc__ or type(route.endpoint).__doc__ or route.name).strip()
    operation: dict[str, Any] = {"operationId": route.name, "summary": text.splitlines()[0]}
    path_parameters = [
        {"name": name, "in": "path", "required": True, "schema": TOPIC_NAME}
        for name in route.param_convertors
    ]
    if parameters := path_parameters + [PARAMETERS[name] for name in doc.parameters]:
        operation["parameters"] = parameters
    if doc.body is not None:
        operation["requestBody"] = {"required": True, "content": doc.body}
    responses = dict(doc.answers)
    for status in sorted({*doc.problems, *EVERY_ROUTE}):
        responses[status] = {"$ref": f"#/components/responses/{PROBLEMS[status][0]}"}
    operation["responses"] = dict(sorted(responses.items()))
    if doc.secured:
        operation["security"] = OPTIONAL_TOKEN
    return operation


def documented_routes(routes: Sequence[BaseRoute]) -> list[Route]:
    return [r for r in routes if isinstance(r, Route) and r.include_in_schema]


def openapi_document(routes: Sequence[BaseRoute]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in documented_routes(routes):
        for method in sorted(route.methods or ()):
            if method != "HEAD":  # (Starlette's, beside each GET)
                paths.setdefault(route.path, {})[method.lower()] = _operation(route)
    _, definitions = models_json_schema(
        [(model, "validation") for model in MODELS], ref_template="#/components/schemas/{model}"
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "Resumable event broker", "version": "0.1.0"},
        "paths": paths,
        "components": {
            "schemas": definitions["$defs"],
            "responses": {
                name: _problem_response(status, description)
                for status, (name, description) in PROBLEMS.items()
            },
            "securitySchemes": SECURITY_SCHEMES,
        },
    }
