"""/openapi.json against the app's routes: every route with its methods, a well-formed
OpenAPI 3.1 document (checked by structure: no validator in the dependencies), and
what the audit found missing or wrong (statuses, bodies, parameters, media types).

Real requests answering only documented statuses: tests/http/test_openapi.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from starlette.routing import Route

from api.app import ROUTES
from api.openapi import openapi_document

DOCUMENT = openapi_document(ROUTES)
PATHS: dict[str, dict[str, Any]] = DOCUMENT["paths"]
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def resolve(node: Any) -> Any:
    """``node``, or what its ``$ref`` names in the document."""
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        node = DOCUMENT
        for part in ref[2:].split("/"):
            node = node[part]
    return node


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in PATHS.items():
        for method, operation in item.items():
            yield path, method, operation


def statuses(method: str, path: str) -> set[str]:
    return set(PATHS[path][method]["responses"])


def parameters(method: str, path: str) -> dict[tuple[str, str], dict[str, Any]]:
    found = [resolve(p) for p in PATHS[path][method].get("parameters", [])]
    return {(p["in"], p["name"]): p for p in found}


# -- the routes ----------------------------------------------------------------------------


def test_every_route_of_the_app_is_documented_with_its_methods() -> None:
    routes = [r for r in ROUTES if isinstance(r, Route) and r.include_in_schema]
    assert set(PATHS) == {route.path for route in routes}
    for route in routes:
        for method in (route.methods or set()) - {"HEAD"}:
            operation = PATHS[route.path].get(method.lower())
            assert operation is not None, (method, route.path)
            assert operation["operationId"] == route.name


def test_each_summary_is_a_whole_sentence() -> None:
    """A summary is its docstring's first line: DELETE's was cut mid-sentence there
    ("...: 204. Deleting")."""
    for path, method, operation in operations():
        assert operation["summary"].endswith("."), (method, path, operation["summary"])


# -- OpenAPI 3.1, by structure ---------------------------------------------------------------


def test_the_document_has_the_structure_of_openapi_3_1() -> None:
    assert re.fullmatch(r"3\.1\.\d+", DOCUMENT["openapi"])
    assert DOCUMENT["info"]["title"] and DOCUMENT["info"]["version"]
    schemes = DOCUMENT["components"].get("securitySchemes", {})
    operation_ids = [operation["operationId"] for _, _, operation in operations()]
    assert len(operation_ids) == len(set(operation_ids))
    for path, method, operation in operations():
        where = f"{method.upper()} {path}"
        assert method in METHODS, where
        assert operation["summary"], where
        responses = operation["responses"]
        assert any(status.startswith("2") for status in responses), where
        for status, response in responses.items():
            assert re.fullmatch(r"[1-5][0-9][0-9]", status), (where, status)
            assert resolve(response)["description"], (where, status)
        given = [resolve(p) for p in operation.get("parameters", [])]
        assert len({(p["in"], p["name"]) for p in given}) == len(given), where
        for parameter in given:
            assert parameter["in"] in ("path", "query", "header", "cookie"), (where, parameter)
            assert "schema" in parameter, (where, parameter)
        in_path = {p["name"] for p in given if p["in"] == "path"}
        assert in_path == set(re.findall(r"\{(\w+)\}", path)), where
        assert all(p.get("required") for p in given if p["in"] == "path"), where
        if "requestBody" in operation:
            assert operation["requestBody"]["content"], where
        for requirement in operation.get("security", []):
            assert set(requirement) <= set(schemes), (where, requirement)


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_every_reference_resolves_and_every_schema_is_json_schema() -> None:
    refs = set(_refs(DOCUMENT))
    assert refs
    for ref in refs:
        assert isinstance(resolve({"$ref": ref}), dict), ref
    for schema in DOCUMENT["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)  # (OpenAPI 3.1's dialect)


# -- what each route answers -------------------------------------------------------------------

TOPIC_ROUTES = [
    ("post", "/topics/{topic}/events"),
    ("get", "/topics/{topic}/events"),
    ("get", "/events"),
    ("get", "/topics/{topic}"),
    ("delete", "/topics/{topic}"),
    ("post", "/topics/{topic}/close"),
]


def test_each_route_lists_its_success_statuses() -> None:
    assert {"200", "201"} <= statuses("post", "/topics/{topic}/events")
    assert {"200", "204"} <= statuses("get", "/topics/{topic}/events")  # 204: closed topic
    assert {"200", "204"} <= statuses("get", "/events")
    assert "200" in statuses("get", "/topics")
    assert "204" in statuses("delete", "/topics/{topic}")
    assert {"200", "201"} <= statuses("post", "/topics/{topic}/close")


@pytest.mark.parametrize(("method", "path"), TOPIC_ROUTES)
def test_topic_routes_list_their_refusals(method: str, path: str) -> None:
    assert {"400", "401", "403"} <= statuses(method, path)
    assert PATHS[path][method]["security"], "a token: how it is sent"


def test_the_statuses_that_occur_are_listed_where_they_occur() -> None:
    assert "409" in statuses("post", "/topics/{topic}/events")  # a closed topic
    for path, method, _ in operations():
        assert "431" in statuses(method, path), (method, path)  # (any request head)
    for method, path in [*TOPIC_ROUTES, ("get", "/topics"), ("get", "/readyz/store")]:
        if path != "/events":  # (a stream is told to come back instead: 200)
            assert "503" in statuses(method, path), (method, path)
    assert "404" in statuses("get", "/topics/{topic}")
    assert "401" in statuses("get", "/topics")  # (an invalid token: no listing)


def test_only_a_publish_takes_a_body_and_its_refusals() -> None:
    for path, method, operation in operations():
        publish = (method, path) == ("post", "/topics/{topic}/events")
        assert ("requestBody" in operation) == publish, (method, path)
        assert {"413", "415"} & set(operation["responses"]) == (
            {"413", "415"} if publish else set()
        ), (method, path)


# -- bodies, media types, parameters ---------------------------------------------------------


def test_a_publish_takes_json_an_array_batch_ndjson_and_text() -> None:
    content = PATHS["/topics/{topic}/events"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "application/x-ndjson", "text/plain"}
    forms = content["application/json"]["schema"]["oneOf"]
    event_in = {"$ref": "#/components/schemas/EventIn"}
    assert event_in in forms
    (batch,) = [form for form in forms if form.get("type") == "array"]
    assert batch["items"] == event_in
    assert resolve(event_in)["required"] == ["data"]


def test_streams_are_text_event_stream() -> None:
    subscribe = PATHS["/topics/{topic}/events"]["get"]["responses"]["200"]["content"]
    assert set(subscribe) == {"text/event-stream", "application/json"}  # (history by Accept)
    assert resolve(subscribe["application/json"]["schema"])["title"] == "HistoryPage"
    assert set(PATHS["/events"]["get"]["responses"]["200"]["content"]) == {"text/event-stream"}
    assert set(PATHS["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


def test_every_input_is_a_parameter() -> None:
    topics = parameters("get", "/events")[("query", "topic")]
    assert topics["required"] and topics["schema"]["type"] == "array"
    assert topics.get("explode", True) and topics.get("style", "form") == "form"  # ?topic=a&topic=b
    subscribe = parameters("get", "/topics/{topic}/events")
    assert {("header", "Last-Event-ID")} | {
        ("query", name) for name in ("last_event_id", "from", "after", "limit")
    } <= set(subscribe)
    assert subscribe[("query", "from")]["schema"]["enum"] == ["now", "earliest"]
    assert {("header", "Last-Event-ID"), ("query", "last_event_id"), ("query", "from")} <= set(
        parameters("get", "/events")
    )
    assert {("query", "event"), ("query", "close"), ("header", "Idempotency-Key")} <= set(
        parameters("post", "/topics/{topic}/events")
    )
    assert {("query", n) for n in ("prefix", "limit", "cursor")} <= set(
        parameters("get", "/topics")
    )


def test_a_token_may_come_by_header_cookie_or_query() -> None:
    schemes = DOCUMENT["components"]["securitySchemes"].values()
    assert {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"} in schemes
    assert {"type": "apiKey", "in": "cookie", "name": "broker_token"} in schemes
    assert {"type": "apiKey", "in": "query", "name": "access_token"} in schemes
    for method, path in TOPIC_ROUTES:
        assert {} in PATHS[path][method]["security"], "authorization is optional"
