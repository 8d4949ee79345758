"""The parts of uvicorn, httptools and Starlette the edge relies on beyond their public APIs.

`api/connections.py` serves streams lean by standing in for uvicorn's HTTP
protocol (`api/lean_stream.py` builds their requests by hand, `api/proxy_headers.py`
reads their proxy headers as uvicorn does); `api/sse.py` writes through uvicorn's
``send`` from a plain call; `api/lifecycle.py` chains uvicorn's signal handlers.
pyproject.toml pins these libraries below their next minor release; when the pin
moves, these checks say, without starting a server, which surface changed and which
file depends on it.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import pkgutil
import textwrap
import types
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import asynccontextmanager
from typing import Any

import httptools
import pytest
import uvicorn.protocols.http
import uvicorn.protocols.http.flow_control
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from uvicorn.config import Config
from uvicorn.lifespan.on import LifespanOn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import Server, ServerState

from api.connections import BrokerHttpProtocol
from api.guard import DATA_AFTER_CLOSE

CONNECTIONS = "api/connections.py"
PROXY_HEADERS = "api/proxy_headers.py"
LEAN_STREAM = "api/lean_stream.py"
SSE = "api/sse.py"
LIFECYCLE = "api/lifecycle.py"
GUARD = "api/guard.py"


def changed(surface: str, user: str, why: str) -> str:
    return f"uvicorn/starlette surface `{surface}`, relied on by {user} ({why}), has changed"


def syntax_of(function: Callable[..., Any]) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(function)))


def keywords_of_calls(tree: ast.AST, callee: str) -> list[set[str]]:
    """The keyword names of every call to ``<something>.callee`` in the tree."""
    return [
        {keyword.arg for keyword in node.keywords if keyword.arg}
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == callee
    ]


# -- api/connections.py: standing in for uvicorn's HTTP protocol -----------------


def test_uvicorn_builds_its_http_protocol_with_the_arguments_ours_takes() -> None:
    calls = keywords_of_calls(syntax_of(Server.startup), "http_protocol_class")
    expected = {"config", "server_state", "app_state", "_loop"}
    assert expected in calls, changed(
        "uvicorn.server.Server.startup -> config.http_protocol_class(...)",
        CONNECTIONS,
        f"BrokerHttpProtocol is built with the keywords {sorted(expected)}; calls: {calls}",
    )


def test_httptools_protocol_takes_a_connection_midway() -> None:
    ours = list(inspect.signature(BrokerHttpProtocol.__init__).parameters)
    theirs = list(inspect.signature(HttpToolsProtocol.__init__).parameters)
    assert theirs == ours, changed(
        "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol.__init__",
        CONNECTIONS,
        f"_hand_to_uvicorn builds it as uvicorn would; parameters {theirs}, ours {ours}",
    )
    for method in ("connection_made", "data_received", "shutdown"):
        assert callable(getattr(HttpToolsProtocol, method, None)), changed(
            f"HttpToolsProtocol.{method}",
            CONNECTIONS,
            "_hand_to_uvicorn feeds it the socket and the bytes already read",
        )


async def test_httptools_protocol_tells_when_a_connection_idles_between_requests() -> None:
    """``api.guard`` gives a handed-over connection back once uvicorn idles it: when its
    response completed with no pipelined request, uvicorn arms the keep-alive timer."""
    loop = asyncio.get_running_loop()
    protocol = HttpToolsProtocol(Config(app=Starlette()), ServerState(), {}, _loop=loop)
    assert protocol.timeout_keep_alive_task is None and len(protocol.pipeline) == 0, changed(
        "HttpToolsProtocol.timeout_keep_alive_task / .pipeline",
        "api/guard.py",
        "a connection idles when the keep-alive timer is armed and nothing is pipelined",
    )
    assert protocol.connections is protocol.server_state.connections
    source = inspect.getsource(HttpToolsProtocol.on_response_complete)
    assert "self.pipeline" in source and "self.timeout_keep_alive_task = " in source, changed(
        "HttpToolsProtocol.on_response_complete", "api/guard.py", "it arms the keep-alive timer"
    )
    assert callable(getattr(protocol, "_unset_keepalive_if_required", None)), changed(
        "HttpToolsProtocol._unset_keepalive_if_required", "api/guard.py", "given back, unarmed"
    )


def test_httptools_protocol_answers_unreadable_bytes_through_send_400_response() -> None:
    """``api.guard`` holds uvicorn's 400 back until the request being answered is: it
    overrides the method uvicorn's parser error calls, and reads its cycle's state."""
    source = inspect.getsource(HttpToolsProtocol.data_received)
    assert "self.send_400_response(" in source, changed(
        "HttpToolsProtocol.data_received", "api/guard.py", "a parser error calls send_400_response"
    )
    assert "self._unsupported_upgrade_warning()" in source, changed(
        "HttpToolsProtocol.data_received", "api/guard.py", "an upgrade it does not take"
    )
    cycle_source = inspect.getsource(RequestResponseCycle.__init__)
    assert "self.more_body = True" in cycle_source, changed(
        "RequestResponseCycle.more_body", "api/guard.py", "whether its request was read whole"
    )
    assert "self.response_complete = False" in cycle_source, changed(
        "RequestResponseCycle.response_complete", "api/guard.py", "whether it is still answering"
    )


def test_bytes_after_a_request_that_closes_are_a_parser_error_once_leniency_is_off() -> None:
    """``api.guard`` turns off the leniency uvicorn sets on its parser (bytes after a
    ``Connection: close`` request dropped unseen), to see a client sending on past it:
    the parser then raises, and uvicorn calls ``send_400_response``."""
    source = inspect.getsource(HttpToolsProtocol.__init__)
    assert "lenient_data_after_close=True" in source, changed(
        "HttpToolsProtocol.__init__", GUARD, "sets the leniency the guard turns off"
    )
    for closing in (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", b"GET / HTTP/1.0\r\n\r\n"):
        parser = httptools.HttpRequestParser(types.SimpleNamespace())
        parser.set_dangerous_leniencies(lenient_data_after_close=False)
        with pytest.raises(httptools.HttpParserError) as raised:
            parser.feed_data(closing + b"GET / HTTP/1.1\r\n")
        # (told apart from bytes that are no request by its reason alone: not warned of)
        assert str(raised.value) == DATA_AFTER_CLOSE, changed(
            "httptools.HttpParserError's reason for data after close", GUARD, str(raised.value)
        )
    with pytest.raises(httptools.HttpParserError) as garbage:
        httptools.HttpRequestParser(types.SimpleNamespace()).feed_data(b"NOT HTTP\r\n\r\n")
    assert str(garbage.value) != DATA_AFTER_CLOSE


UVICORN_DATA_RECEIVED = """
def data_received(self, data: bytes) -> None:
    self._unset_keepalive_if_required()

    try:
        self.parser.feed_data(data)
    except httptools.HttpParserError:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)
        return
    except httptools.HttpParserUpgrade:
        if self._should_upgrade():
            self.handle_websocket_upgrade()
        else:
            self._unsupported_upgrade_warning()
"""
"""What ``GuardedHttpToolsProtocol._feed`` does in its place (but for its log of data
after a request that closes the connection)."""


def test_the_guard_feeds_its_parser_as_uvicorns_data_received_does() -> None:
    assert ast.dump(syntax_of(HttpToolsProtocol.data_received)) == ast.dump(
        ast.parse(UVICORN_DATA_RECEIVED)
    ), changed(
        "HttpToolsProtocol.data_received",
        GUARD,
        "GuardedHttpToolsProtocol._feed is a copy of it, whose log of bytes after a request "
        "that closes is at debug: bring what changed over",
    )


def test_server_state_has_what_the_lean_path_updates() -> None:
    state = ServerState()
    for name, kind in (("connections", set), ("total_requests", int), ("default_headers", list)):
        assert isinstance(getattr(state, name, None), kind), changed(
            f"uvicorn.server.ServerState.{name} ({kind.__name__})",
            CONNECTIONS,
            "lean streams register there, count requests, and send uvicorn's headers (raw_answers)",
        )


def test_graceful_shutdown_calls_shutdown_on_every_connection() -> None:
    source = inspect.getsource(Server.shutdown)
    assert "server_state.connections" in source and ".shutdown()" in source, changed(
        "uvicorn.server.Server.shutdown",
        CONNECTIONS,
        "a drain ends lean streams through their shutdown(), as uvicorn's own connections",
    )


def test_config_loads_our_protocol_by_its_import_string() -> None:
    config = Config(app=Starlette(), http="api.connections:BrokerHttpProtocol")
    config.load()
    assert config.http_protocol_class is BrokerHttpProtocol, changed(
        "uvicorn.config.Config(http=...)", "api/serve.py", "`broker serve` names the protocol"
    )
    assert config.root_path == "", changed(
        "uvicorn.config.Config.root_path", CONNECTIONS, "a root path sends streams to uvicorn"
    )


async def test_the_lifespan_state_reaches_the_protocol_as_app_state() -> None:
    """The app's lifespan yields itself into the state uvicorn hands protocols."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        yield {"broker.app": app}

    app = Starlette(lifespan=lifespan)
    config = Config(app=app, lifespan="on")
    config.load()
    on = LifespanOn(config)
    await on.startup()
    try:
        assert on.state.get("broker.app") is app, changed(
            "uvicorn.lifespan.on.LifespanOn.state", CONNECTIONS, "APP_STATE_KEY is found there"
        )
    finally:
        await on.shutdown()
    assert "app_state=self.lifespan.state" in inspect.getsource(Server.startup), changed(
        "uvicorn.server.Server.startup", CONNECTIONS, "app_state is the lifespan's state"
    )


def test_httptools_parses_a_head_as_the_lean_path_reads_it() -> None:
    seen: dict[str, Any] = {"headers": []}

    class Head:
        def on_url(self, url: bytes) -> None:
            seen["url"] = url

        def on_header(self, name: bytes, value: bytes) -> None:
            seen["headers"].append((name, value))

        def on_message_complete(self) -> None:
            seen["complete"] = True

    parser = httptools.HttpRequestParser(Head())
    parser.feed_data(b"GET /topics/t/events?from=earliest HTTP/1.1\r\nHost: x\r\n\r\n")
    url = httptools.parse_url(seen["url"])
    assert (parser.get_method(), parser.get_http_version()) == (b"GET", "1.1")
    assert (url.path, url.query, seen["headers"], seen["complete"]) == (
        b"/topics/t/events",
        b"from=earliest",
        [(b"Host", b"x")],
        True,
    ), changed("httptools.HttpRequestParser / parse_url", CONNECTIONS, "the lean path's parser")
    for name in ("HttpParserError", "HttpParserUpgrade", "HttpParserInvalidURLError"):
        assert issubclass(getattr(httptools, name), Exception), changed(
            f"httptools.{name}", CONNECTIONS, "what is not a plain request goes to uvicorn"
        )


def test_a_response_object_gives_its_status_head_and_body() -> None:
    response = JSONResponse({"a": 1}, 503, headers={"Retry-After": "1"})
    assert response.status_code == 503
    assert (b"retry-after", b"1") in response.raw_headers
    assert bytes(response.body) == b'{"a":1}', changed(
        "starlette.responses.Response.raw_headers/body",
        CONNECTIONS,
        "_answer writes the app's own response to the socket",
    )
    request = Request({"type": "http", "headers": [], "app": "the app"})
    assert request.app == "the app", changed(
        "starlette.requests.Request(scope).app", LEAN_STREAM, "stream requests built by hand"
    )


# -- api/sse.py: writing through uvicorn's send from a plain call ----------------


@types.coroutine
def suspend() -> Generator[None, None, None]:
    """Hand control back to whoever drives the coroutine, as a wait on the loop would."""
    yield


def request_response_cycles() -> list[type]:
    """RequestResponseCycle of every uvicorn HTTP implementation that imports here."""
    cycles = []
    for module_info in pkgutil.iter_modules(uvicorn.protocols.http.__path__):
        try:
            module = importlib.import_module(f"uvicorn.protocols.http.{module_info.name}")
        except ImportError:  # an implementation whose parser is not installed cannot run
            continue
        cycle = getattr(module, "RequestResponseCycle", None)
        if isinstance(cycle, type):
            cycles.append(cycle)
    return cycles


def awaits_and_writes(send: Callable[..., Any]) -> tuple[list[int], list[int]]:
    """Line numbers of the awaits, and of the ``self.transport.write`` calls, in ``send``."""
    tree = syntax_of(send)
    awaits = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Await)]
    writes = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "write"
        and isinstance(node.func.value, ast.Attribute)
        and node.func.value.attr == "transport"
    ]
    return awaits, writes


def test_the_httptools_cycle_is_among_those_checked() -> None:
    names = {f"{cycle.__module__}.{cycle.__name__}" for cycle in request_response_cycles()}
    assert "uvicorn.protocols.http.httptools_impl.RequestResponseCycle" in names, names


@pytest.mark.parametrize("cycle", request_response_cycles(), ids=lambda c: c.__module__)
def test_send_awaits_only_before_it_writes(cycle: type) -> None:
    """A ``send`` that must wait has written nothing, so the live reader may drop it."""
    surface = f"{cycle.__module__}.RequestResponseCycle.send"
    why = "write_now drives it by hand and drops an attempt that would wait"
    send = getattr(cycle, "send", None)
    assert send is not None and inspect.iscoroutinefunction(send), changed(surface, SSE, why)
    awaits, writes = awaits_and_writes(send)
    assert writes, changed(surface, SSE, why + "; it no longer writes to self.transport")
    assert all(line < min(writes) for line in awaits), changed(
        surface, SSE, f"{why}; awaits at lines {awaits}, first write at {min(writes)}"
    )
    assert "self.send" in inspect.getsource(cycle.run_asgi), changed(  # type: ignore[attr-defined]
        f"{cycle.__module__}.RequestResponseCycle.run_asgi",
        SSE,
        "the app's send is the cycle's bound send (_completes_synchronously)",
    )


def test_driving_send_by_hand_writes_at_once_or_not_at_all() -> None:
    """The behaviour itself, on the httptools cycle with a stand-in transport."""
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    written: list[bytes] = []

    class Transport:
        def write(self, data: bytes) -> None:
            written.append(data)

    class Flow:
        write_paused = False

        async def drain(self) -> None:
            await suspend()  # a full socket: the caller gets control back here

    cycle = object.__new__(RequestResponseCycle)
    cycle.__dict__.update(
        transport=Transport(), flow=Flow(), disconnected=False, response_started=True,
        response_complete=False, chunked_encoding=True, expected_content_length=0,
        scope={"method": "GET"}, keep_alive=True,
    )  # fmt: skip
    message = {"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True}
    why = "write_now: a send that does not wait has written when its first step returns"
    sending = cycle.send(message)  # type: ignore[arg-type]
    with pytest.raises(StopIteration):
        sending.send(None)
    assert b"".join(written).count(b"data: 1") == 1, changed("RequestResponseCycle.send", SSE, why)
    Flow.write_paused = True
    written.clear()
    sending = cycle.send(message)  # type: ignore[arg-type]
    sending.send(None)  # suspended in drain()
    sending.close()
    assert written == [], changed(
        "RequestResponseCycle.send", SSE, "an attempt that would wait must have written nothing"
    )


# -- api/guard.py: closing lingering after an answer the app gave mid-body --------


def test_the_cycle_writes_through_the_transport_it_was_given() -> None:
    why = "GuardedHttpToolsProtocol gives the cycle a transport whose close() lingers"
    source = inspect.getsource(HttpToolsProtocol.on_headers_complete)
    assert "transport=self.transport" in source, changed(
        "HttpToolsProtocol.on_headers_complete", GUARD, why
    )
    assert "self.cycle = RequestResponseCycle(" in source, changed(
        "HttpToolsProtocol.on_headers_complete",
        GUARD,
        "on_headers_complete finds the request's cycle as the one self.cycle names after it",
    )


def test_an_answer_with_connection_close_closes_the_cycles_transport_then_completes() -> None:
    """The answer is written whole, then ``close()`` on the cycle's ``transport``
    (where the guard lingers), then ``on_response`` (which it skips once lingering);
    through the ``transport`` the cycle holds when it sends, set after it was made (as
    ``_close_lingering_after`` does), not one it kept aside when made."""
    calls: list[str] = []

    class Transport:
        def write(self, data: bytes) -> None:
            calls.append("write")

        def close(self) -> None:
            calls.append("close")

    class Flow:
        write_paused = False

    cycle = RequestResponseCycle(
        scope={"method": "POST", "type": "http"}, transport=object(), flow=Flow(),
        logger=None, access_logger=None, access_log=False, default_headers=[],
        message_event=asyncio.Event(), expect_100_continue=False, keep_alive=True,
        on_response=lambda: calls.append("on_response"),
    )  # type: ignore[arg-type]  # fmt: skip
    cycle.transport = Transport()  # type: ignore[assignment]  # (as the guard gives it, once made)
    headers = [(b"content-length", b"2"), (b"connection", b"close")]
    asyncio.run(cycle.send({"type": "http.response.start", "status": 409, "headers": headers}))
    asyncio.run(cycle.send({"type": "http.response.body", "body": b"{}"}))
    why = "_close_after lingers from the cycle's close() and on_response_complete skips"
    assert calls == ["write", "write", "close", "on_response"], changed(
        "RequestResponseCycle.send", GUARD, why
    )


def test_the_protocol_is_told_when_a_cycle_completes_its_answer() -> None:
    """A cycle's ``on_response`` is its protocol's ``on_response_complete``, which the
    guard skips once the connection lingers: else uvicorn read on and armed its
    keep-alive timer on a connection no longer its own, which cut the lingering."""
    source = inspect.getsource(HttpToolsProtocol.on_headers_complete)
    assert "on_response=self.on_response_complete" in source, changed(
        "HttpToolsProtocol.on_headers_complete", GUARD, "on_response_complete, skipped lingering"
    )


def test_a_cycle_told_not_to_keep_alive_once_made_says_so_and_closes_after_its_answer() -> None:
    """A client half-closed after its requests (``eof_received``): the guard sets the
    last one's ``keep_alive`` to False, once its cycle is made (running, or sent ahead):
    its answer then says ``connection: close`` (its head not out yet) and the cycle
    closes the connection after the answer, through its transport."""
    calls: list[str] = []
    written: list[bytes] = []

    class Transport:
        def write(self, data: bytes) -> None:
            calls.append("write")
            written.append(data)

        def close(self) -> None:
            calls.append("close")

    class Flow:
        write_paused = False

    cycle = RequestResponseCycle(
        scope={"method": "GET", "type": "http"}, transport=Transport(), flow=Flow(),
        logger=None, access_logger=None, access_log=False, default_headers=[],
        message_event=asyncio.Event(), expect_100_continue=False, keep_alive=True,
        on_response=lambda: calls.append("on_response"),
    )  # type: ignore[arg-type]  # fmt: skip
    cycle.keep_alive = False
    headers = [(b"content-length", b"2")]
    asyncio.run(cycle.send({"type": "http.response.start", "status": 200, "headers": headers}))
    asyncio.run(cycle.send({"type": "http.response.body", "body": b"{}"}))
    why = "eof_received: the last request's answer closes the connection"
    assert b"connection: close" in written[0].lower(), changed(
        "RequestResponseCycle.send", GUARD, why
    )
    assert calls == ["write", "write", "close", "on_response"], changed(
        "RequestResponseCycle.send", GUARD, why
    )


def test_requests_sent_ahead_are_queued_on_the_left_and_started_from_the_right() -> None:
    """``eof_received`` walks ``pipeline`` in the order the requests came (from the right)
    to drop a stream sent ahead and what follows it."""
    why = "eof_received reads the pipeline in the order sent"
    queued = inspect.getsource(HttpToolsProtocol.on_headers_complete)
    assert "self.pipeline.appendleft((self.cycle, app))" in queued, changed(
        "HttpToolsProtocol.on_headers_complete", GUARD, why
    )
    started = inspect.getsource(HttpToolsProtocol.on_response_complete)
    assert "cycle, app = self.pipeline.pop()" in started, changed(
        "HttpToolsProtocol.on_response_complete", GUARD, why
    )


def test_flow_control_wakes_a_send_waiting_for_the_socket() -> None:
    """The guard, answering a request itself, wakes the app's ``send`` waiting for the
    socket to drain (``flow.drain()``), which then finds its client gone."""
    source = inspect.getsource(RequestResponseCycle.send)
    assert "await self.flow.drain()" in source, changed(
        "RequestResponseCycle.send", GUARD, "a send waits for the socket in flow.drain()"
    )

    async def woken() -> None:
        flow = uvicorn.protocols.http.flow_control.FlowControl(transport=None)  # type: ignore[arg-type]
        flow.pause_writing()
        waiting = asyncio.create_task(flow.drain())
        await asyncio.sleep(0)
        flow.resume_writing()
        await asyncio.wait_for(waiting, 1)

    asyncio.run(woken())


def test_a_graceful_shutdown_waits_for_the_connections_to_close() -> None:
    """``api.lingering.Lingering`` is counted in ``server_state.connections`` for a
    shutdown to wait (briefly) for a connection answered and lingering: it has no task."""
    source = inspect.getsource(Server._wait_tasks_to_complete)
    assert "while self.server_state.connections" in source, changed(
        "uvicorn.server.Server._wait_tasks_to_complete",
        "api/lingering.py",
        "a shutdown waits for every connection in server_state.connections to close",
    )


# -- api/lifecycle.py: chaining uvicorn's signal handlers ------------------------


def test_uvicorn_installs_its_signal_handlers_with_signal_signal_before_startup() -> None:
    why = "drain_on_shutdown_signals chains the handler signal.signal returns"
    assert "signal.signal(" in inspect.getsource(Server.capture_signals), changed(
        "uvicorn.server.Server.capture_signals", LIFECYCLE, why
    )
    assert "capture_signals()" in inspect.getsource(Server.serve), changed(
        "uvicorn.server.Server.serve", LIFECYCLE, why + " (installed before the lifespan starts)"
    )


def test_proxy_headers_trusted_hosts_read_x_forwarded_for() -> None:
    """``api/proxy_headers.py`` names a lean request's client in the access log as
    uvicorn's ProxyHeadersMiddleware does, with its private ``_TrustedHosts``."""
    from uvicorn.middleware.proxy_headers import _TrustedHosts

    trusted = _TrustedHosts("127.0.0.1,::1")
    assert "127.0.0.1" in trusted and "203.0.113.9" not in trusted
    assert trusted.get_trusted_client_address("203.0.113.9, 127.0.0.1") == ("203.0.113.9", 0)
    assert Config(app=None, proxy_headers=True).forwarded_allow_ips in (
        "127.0.0.1,::1",
        "127.0.0.1",
    )


PROXY_PEER = "127.0.0.1"
FORWARDED_PROTOS = [[], [b"https"], [b"http"], [b" https "], [b"HTTPS"], [b"ftp"], [b"wss"]]
FORWARDED_PROTOS += [[b"http", b"https"], [b"https", b"http"], [b"https", b"ftp"]]  # (several)


@pytest.mark.parametrize("peer", [PROXY_PEER, "203.0.113.9"])
@pytest.mark.parametrize("named", FORWARDED_PROTOS)
async def test_a_lean_request_has_the_scheme_proxy_headers_middleware_gives(
    peer: str, named: list[bytes]
) -> None:
    """``api/proxy_headers.py`` gives a lean publish's scope the scheme uvicorn's
    ProxyHeadersMiddleware gives a request of the app: the cookie forgery check compares
    a page's origin with it on both paths (the lean ones said http behind any proxy)."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    headers = [(b"x-forwarded-proto", value) for value in named]
    seen: dict[str, str] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["scheme"] = scope["scheme"]

    asgi_scope = {"type": "http", "scheme": "http", "client": (peer, 5000), "headers": headers}
    await ProxyHeadersMiddleware(app, trusted_hosts=PROXY_PEER)(asgi_scope, None, None)  # type: ignore[arg-type]

    class Transport:
        def get_extra_info(self, name: str) -> Any:
            return {"peername": (peer, 5000)}.get(name)

    config = Config(app=None, proxy_headers=True, forwarded_allow_ips=PROXY_PEER)
    protocol = BrokerHttpProtocol(config, ServerState(), {})
    protocol.connection_made(Transport())  # type: ignore[arg-type]
    try:
        assert protocol.scheme_of(headers) == seen["scheme"], changed(
            "uvicorn.middleware.proxy_headers.ProxyHeadersMiddleware",
            PROXY_HEADERS,
            "the scheme a trusted proxy's X-Forwarded-Proto gives a request",
        )
    finally:
        protocol.connection_lost(None)


def test_a_request_queued_behind_another_pauses_reading_which_the_guard_resumes() -> None:
    """Behind a stream under way, the guard reads on past a request queued there
    (``flow.resume_reading()`` after uvicorn's ``on_headers_complete`` paused it), so
    that the stream's client's end is seen; a stream's wait for it (``receive``)
    resumes reading once only."""
    why = "the guard resumes reading behind a stream (a request queued pauses it)"
    queued = inspect.getsource(HttpToolsProtocol.on_headers_complete)
    assert "self.flow.pause_reading()" in queued, changed(
        "HttpToolsProtocol.on_headers_complete", GUARD, why
    )
    waits = inspect.getsource(RequestResponseCycle.receive)
    assert "self.flow.resume_reading()" in waits, changed(
        "RequestResponseCycle.receive", GUARD, why
    )

    class Transport:
        reading = True

        def pause_reading(self) -> None:
            self.reading = False

        def resume_reading(self) -> None:
            self.reading = True

    transport = Transport()
    flow = uvicorn.protocols.http.flow_control.FlowControl(transport=transport)  # type: ignore[arg-type]
    flow.pause_reading()
    assert not transport.reading
    flow.resume_reading()
    assert transport.reading
