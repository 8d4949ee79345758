"""The ASGI application: ``create_app(settings)``.

Run it with ``broker serve`` or ``uvicorn --factory api.app:create_app``
(settings then come from ``BROKER_*`` variables; settings it cannot use stop the
process, naming the variable: ``api.settings.SettingsRefused``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from api import face, routes
from api.answers import counting, route_class
from api.auth import Authorizer, redact_tokens
from api.cors import CorsPolicy, adding_headers, cors_headers
from api.gc_tuning import tune_gc
from api.guard import APP_STATE_KEY
from api.hosts import ANY_NAME_SERVED, HostPolicy, host_refused
from api.lifecycle import drain_on_shutdown_signals
from api.metrics import PrometheusObserver, count_response, render_metrics
from api.openapi import openapi_document
from api.problems import NOT_SNIFFED, HttpProblem, problem, problem_for
from api.publish import PublishEndpoint
from api.settings import Settings, SettingsRefused, settings_from_environment, split_list
from api.sse import EventStreamResponse, OpenStreams, stream_headers
from broker import Broker, BrokerError, BrokerLimits, open_store
from broker import constants as c
from broker.errors import StoreMisconfigured
from broker.policy import TopicPolicy

log = logging.getLogger(__name__)


def build_broker(settings: Settings) -> Broker:
    """The core, from settings: the only place settings become constructor arguments."""
    observer = PrometheusObserver()
    store = open_store(
        settings.redis_url,
        retention_maxlen=settings.retention_maxlen,
        retention_seconds=settings.retention_seconds,
        topic_ttl_seconds=settings.topic_ttl_seconds,
        topic_policies=[TopicPolicy(**p.model_dump()) for p in settings.topic_policies],
        idempotency_seconds=settings.idempotency_seconds,
        durability=settings.publish_durability,
        allow_eviction=settings.redis_eviction == "allow",
        # (a publish may wait that long, however slow Redis's replies are meanwhile)
        append_timeout=max(c.REDIS_REPLY_TIMEOUT_SECONDS, settings.publish_timeout_seconds),
        observer=observer,
    )
    limits = BrokerLimits(
        subscriber_buffer_bytes=settings.subscriber_buffer_bytes,
        heartbeat_seconds=settings.heartbeat_seconds,
    )
    return Broker(store, limits=limits, observer=observer)


UVICORN_STARTUP_FAILURE = 3
"""The exit status uvicorn takes for a worker that could not start (``uvicorn.config.
STARTUP_FAILURE``): under ``--workers N`` its supervisor then stops, where it started
any other worker that exited again, for ever."""


def _settings_or_startup_failure() -> Settings:
    """The settings of the environment; refused, the process exits as a uvicorn worker
    that cannot start (``UVICORN_STARTUP_FAILURE``), the line said first (an exit status
    given as a number prints nothing)."""
    try:
        return settings_from_environment()
    except SettingsRefused as refused:
        print(refused, file=sys.stderr, flush=True)
        refused.code = UVICORN_STARTUP_FAILURE
        raise


def create_app(settings: Settings | None = None) -> Starlette:
    """The broker's HTTP service, with a lifespan that opens and closes the core.

    Without ``settings``, read from the ``BROKER_*`` variables: settings it cannot use
    are said on stderr in one line, and raise ``SettingsRefused`` with that line, which
    exits with uvicorn's status for a worker that cannot start."""
    settings = settings or _settings_or_startup_failure()
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        broker = build_broker(settings)
        streams = OpenStreams()
        try:
            await broker.start()
        except StoreMisconfigured as refused:
            app.state.refused_at_start = str(refused)  # (said in one line: see __call__)
            raise
        metrics = broker.observer
        if isinstance(metrics, PrometheusObserver):
            metrics.start_flushing()
        app.state.broker, app.state.streams, app.state.settings = broker, streams, settings
        app.state.instance = face.instance_name(app.state.authorizer.enabled)
        if settings.gc_tuning:
            tune_gc()
        restore_signals = drain_on_shutdown_signals(streams.drain)
        try:
            # For api.connections and api.guard, which answer on the connection.
            yield {APP_STATE_KEY: app}
        finally:
            streams.drain()
            restore_signals()
            await broker.close()
            if isinstance(metrics, PrometheusObserver):
                metrics.stop_flushing()  # what was counted last reaches the files

    app = BrokerApp(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers={
            BrokerError: _broker_error,
            HttpProblem: _broker_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
    )
    app.router.redirect_slashes = False  # an API answers 404, not a redirect to a guess
    # Built here, not in the lifespan: a key that cannot be used stops the app at once.
    app.state.authorizer = Authorizer.from_settings(settings)
    app.state.cors = CorsPolicy(split_list(settings.cors_origins))
    app.state.stream_headers = stream_headers(settings.heartbeat_seconds)
    app.state.hosts = HostPolicy(
        split_list(settings.allowed_hosts), auth_enabled=app.state.authorizer.enabled
    )
    _say_authorization(app, settings)
    return app


def _say_authorization(app: Starlette, settings: Settings) -> None:
    """The authorization in force, at start, with the risks of a setup valid but weak."""
    if not app.state.authorizer.enabled:
        log.warning("authorization: off: anyone who reaches the broker may publish and subscribe")
        return
    log.info("authorization: on (JWT)")
    if app.state.hosts.serves_any_name:
        log.warning("authorization: on, but %s", ANY_NAME_SERVED)
    shared = _key_of_an_identity_provider(settings)
    if shared is not None and settings.jwt_audience is None:
        log.warning(NO_AUDIENCE, shared)


NO_AUDIENCE = (
    "authorization: on, but BROKER_JWT_AUDIENCE is not set: every token the key of %s "
    "verifies is valid here, whatever service it was issued for (its aud is not "
    "checked). An identity provider signs the tokens of all its services with that "
    "key: one issued for another service (and replayed here by it, or by anyone it "
    "leaks to) passes, and gets rights here if it carries a broker claim. Set "
    "BROKER_JWT_AUDIENCE to the audience the provider names this broker by"
)


def _key_of_an_identity_provider(settings: Settings) -> str | None:
    """The setting of a key whose tokens may be meant for other services: a public key
    or a key set is an identity provider's (a secret is this deployment's own)."""
    if settings.jwt_jwks_url is not None:
        return "BROKER_JWT_JWKS_URL"
    if settings.jwt_public_key is not None:
        return "BROKER_JWT_PUBLIC_KEY"
    return None


PUBLISH = PublishEndpoint()


class AppState(State):
    """Starlette's ``app.state``, each entry also an attribute of the instance itself.

    ``State`` keeps its entries in a dict behind ``__getattr__``, which Python calls
    only once the ordinary lookup failed: every ``app.state.broker`` built and dropped
    an AttributeError first, some 4,500 instructions, and a lean publish read the state
    7 times (its settings, broker, authorizer, hosts, streams: 10% of a publish,
    callgrind, ``bench.publishing``). Here the ordinary lookup finds them. Written
    through ``State``'s own methods too, so it reads as one whatever the way
    (``tests/unit/test_private_surfaces_starlette.py``)."""

    def __setattr__(self, key: str, value: Any) -> None:
        super().__setattr__(key, value)
        object.__setattr__(self, key, value)

    def __delattr__(self, key: str) -> None:
        super().__delattr__(key)
        object.__delattr__(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        self.__setattr__(key, value)

    def __delitem__(self, key: str) -> None:
        self.__delattr__(key)


class BrokerApp(Starlette):
    """Starlette, with the two hot routes dispatched before its middleware and router.

    A stream lives for hours, and every frame of the middleware, router and
    request wrapper would live with it (memory per idle subscriber); their
    wrappers around ``send`` would also hide uvicorn's, which the live reader
    writes through directly. A publish is the hottest short request: the
    middleware and router were a tenth of its CPU. Everything else (history
    included) goes the usual way; the routes table still documents all of them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state = AppState()  # (before anything is stored in it)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await super().__call__(scope, receive, self._saying_refusals(send))
            return
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        route = route_class(scope)
        # The stream writes its CORS headers itself, and is counted here: a wrapper
        # would hide uvicorn's send.
        stream_send, send = send, counting(route, send)
        cors = cors_headers(scope)
        send = adding_headers(cors, send) if cors else send
        if self.state.hosts.refuses(scope):
            # With CORS too: a listed origin's page reads why (a rebinding page's origin
            # is not listed, and gets none).
            await host_refused(scope)(scope, receive, send)
            return
        if self.state.cors.is_preflight(scope):
            await self._preflight(scope, receive, send)
        elif _is_publish(scope):
            await self._publish(scope, receive, send)
        elif (topic := routes.stream_topic(scope)) is not None:
            response = await self._open_stream(scope, receive, topic)
            if _is_stream(response):
                count_response(route, 200)  # (its head is its first send)
                await response(scope, receive, stream_send)
            else:
                await response(scope, receive, send)
        elif scope["path"].endswith("\n"):
            # Starlette's route patterns end in ``$``, which also matches before a final
            # line feed: ``/metrics%0A`` was ``/metrics``, past the shipped proxies that
            # answer that path 404, and ``POST /topics/t/close%0A`` closed ``t``. No
            # route's path ends in one (the two above match whole paths: not theirs).
            await problem(404, "HTTP error", "Not Found")(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    def _saying_refusals(self, send: Send) -> Send:
        """The lifespan's ``send``, whose startup failure is said in one line when the
        broker refused its store (a Redis that may evict keys, a replica): Starlette
        sends the traceback, and uvicorn printed it whole before the reason, which is
        all an operator needs (new-user audit). Anything else keeps its traceback."""

        async def send_saying_refusals(message: Message) -> None:
            refused = getattr(self.state, "refused_at_start", None)
            if message["type"] == "lifespan.startup.failed" and refused:
                message = {**message, "message": f"broker: {refused}"}
            await send(message)

        return send_saying_refusals

    async def _preflight(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            headers = self.state.cors.preflight(scope)
        except HttpProblem as error:
            await problem_for(error)(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _publish(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await PUBLISH(scope, receive, send)
        except Exception:
            log.exception("unexpected error publishing on %s", scope.get("path"))
            await problem(500, "Internal error", "the broker could not publish")(
                scope, receive, send
            )

    async def _open_stream(
        self, scope: Scope, receive: Receive, topic: str
    ) -> Response | EventStreamResponse:
        try:
            request = Request(scope, receive)
            return await routes.open_stream(request, topic or None)
        except (BrokerError, HttpProblem) as error:
            return problem_for(error)
        except Exception:
            log.exception("unexpected error opening a stream on %s", scope.get("path"))
            return problem(500, "Internal error", "the broker could not open this stream")


def _is_stream(response: object) -> bool:
    return isinstance(response, EventStreamResponse)


def _is_publish(scope: Scope) -> bool:
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    match = routes.TOPIC_EVENTS_PATH.fullmatch(scope["path"])
    if match is None:
        return False
    scope["path_params"] = {"topic": match.group(1)}
    return True


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    body, content_type = render_metrics()
    return Response(body, media_type=content_type, headers=NOT_SNIFFED)


async def openapi(request: Request) -> Response:
    """This service's OpenAPI document, generated from its routes."""
    return routes.json_response(openapi_document(ROUTES))


ROUTES = [
    Route("/topics/{topic}/events", PUBLISH, methods=["POST"], name="publish"),
    Route("/topics/{topic}/events", routes.topic_events, methods=["GET"], name="subscribe"),
    Route("/events", routes.multi_topic_events, methods=["GET"], name="subscribe_many"),
    Route("/topics", routes.list_topics, methods=["GET"], name="list_topics"),
    Route("/topics/{topic}", routes.topic_info, methods=["GET"], name="topic_info"),
    Route("/topics/{topic}", routes.delete_topic, methods=["DELETE"], name="delete_topic"),
    Route("/topics/{topic}/close", routes.close_topic, methods=["POST"], name="close_topic"),
    # A topic holding "/" (sent as %2F) cannot match the routes above; it is a bad
    # topic name (400), not an unknown route (404).
    Route(
        "/topics/{topic:path}",
        routes.bad_topic,
        name="bad_topic",
        include_in_schema=False,
        # Every method: one a topic's route lacks (PUT, PATCH) gets this route's 405,
        # naming all the path's methods (Starlette's names only its first route's).
        methods=["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS"],
    ),
    Route("/healthz", routes.healthz, methods=["GET"], name="healthz"),
    Route("/readyz", routes.readyz, methods=["GET"], name="readyz"),
    Route("/readyz/store", routes.readyz_store, methods=["GET"], name="readyz_store"),
    Route("/metrics", metrics, methods=["GET"], name="metrics"),
    Route("/openapi.json", openapi, methods=["GET"], name="openapi", include_in_schema=False),
    Route("/docs", face.docs, methods=["GET"], name="docs", include_in_schema=False),
    Route("/", face.index, methods=["GET"], name="index", include_in_schema=False),
    Route("/client.js", face.client_js, methods=["GET"], name="client_js", include_in_schema=False),
    Route("/static/{name}", face.page_file, methods=["GET"], include_in_schema=False),
    Route(
        "/static/swagger-ui/{name}", face.swagger_ui_file, methods=["GET"], include_in_schema=False
    ),
    Route("/stats", face.stats, methods=["GET"], name="stats"),
]


async def _broker_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, BrokerError | HttpProblem)
    return problem_for(error)


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    headers = dict(error.headers) if error.headers else None
    return problem(error.status_code, "HTTP error", str(error.detail), headers)


async def _unexpected_error(request: Request, error: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return problem(500, "Internal error", "the broker could not handle this request")


def configure_logging(level: str) -> None:
    """A plain stderr handler for the broker's own loggers, unless one is set up already."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("broker", "api"):
        logging.getLogger(name).setLevel(level.upper())
    # Dropping a client that stopped reading ends its response unfinished, on
    # purpose (its socket is full); uvicorn reports that as an error.
    logging.getLogger("uvicorn.error").addFilter(_not_an_unfinished_response)
    # A token sent as ?access_token= is part of the request target the access log writes,
    # and uvicorn's line for a WebSocket upgrade (the error log), and the websockets
    # library's at debug (under plain uvicorn; `broker serve` runs no WebSocket protocol).
    for name in ("uvicorn.access", "uvicorn.error", "websockets.server"):
        logging.getLogger(name).addFilter(_no_tokens)


def _not_an_unfinished_response(record: logging.LogRecord) -> bool:
    return "without completing response" not in record.getMessage()


def _no_tokens(record: logging.LogRecord) -> bool:
    if isinstance(record.args, tuple):
        record.args = tuple(redact_tokens(a) if isinstance(a, str) else a for a in record.args)
    return True
