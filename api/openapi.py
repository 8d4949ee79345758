"""The OpenAPI document, generated from the routes, their docstrings and the schemas."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from starlette.routing import BaseRoute, Route

from api import schemas

PROBLEMS = {"400": "Invalid request", "413": "Too large", "415": "Unsupported media type",
            "503": "Store unavailable (Retry-After)"}  # fmt: skip

# What each route takes and answers, by route name: (request model, {status: (desc, model)}).
CONTRACTS: dict[str, tuple[Any, dict[str, tuple[str, Any]]]] = {
    "publish": (
        schemas.EventIn | list[schemas.EventIn],
        {
            "201": ("Stored", schemas.Published | schemas.PublishedBatch),
            "200": ("Idempotent repeat (Idempotent-Replayed: true)", schemas.Published),
        },
    ),
    "subscribe": (
        None,
        {
            "200": (
                "text/event-stream, or with Accept: application/json a history page",
                schemas.HistoryPage,
            ),
        },
    ),
    "subscribe_many": (None, {"200": ("text/event-stream over several topics", None)}),
    "topic_info": (
        None,
        {"200": ("The topic", schemas.TopicInfo), "404": ("Never had an event", None)},
    ),
    "healthz": (None, {"200": ("The process is up", None)}),
    "readyz": (
        None,
        {"200": ("It takes new connections", None), "503": ("It drains (Retry-After)", None)},
    ),
    "readyz_store": (
        None,
        {"200": ("The store answers", None), "503": ("It does not (Retry-After)", None)},
    ),
    "metrics": (None, {"200": ("Prometheus text format", None)}),
    "stats": (None, {"200": ("Events/s (all instances) and subscribers (this instance)", None)}),
}


# Nested models land here while a document is generated, then in components/schemas.
_components: dict[str, Any] = {}


def _schema(model: Any) -> dict[str, Any]:
    if model is None:
        return {}
    if isinstance(model, type) and issubclass(model, BaseModel):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        _components.update(schema.pop("$defs", {}))
        return schema
    members = getattr(model, "__args__", ())
    return {"oneOf": [_schema(member) for member in members]}


def _operation(route: Route, method: str) -> dict[str, Any]:
    request_model, answers = CONTRACTS.get(route.name, (None, {}))
    doc = (route.endpoint.__doc__ or type(route.endpoint).__doc__ or route.name).strip()
    operation: dict[str, Any] = {"operationId": route.name, "summary": doc.splitlines()[0]}
    params = [p for p in route.param_convertors]
    if params:
        operation["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in params
        ]
    if request_model is not None:
        operation["requestBody"] = {
            "content": {
                "application/json": {"schema": _schema(request_model)},
                "text/plain": {"schema": {"type": "string"}},
            }
        }
    responses: dict[str, Any] = {}
    for status, (description, model) in answers.items():
        responses[status] = {"description": description}
        if model is not None:
            responses[status]["content"] = {"application/json": {"schema": _schema(model)}}
    problem = {"application/problem+json": {"schema": _schema(schemas.Problem)}}
    for status, description in PROBLEMS.items():
        responses.setdefault(status, {"description": description, "content": problem})
    operation["responses"] = responses
    return operation


def openapi_document(routes: Sequence[BaseRoute]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route) or not route.include_in_schema:
            continue
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            paths.setdefault(route.path, {})[method.lower()] = _operation(route, method)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Resumable event broker", "version": "0.1.0"},
        "paths": paths,
        "components": {"schemas": dict(_components)},
    }
