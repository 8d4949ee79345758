"""The Python client's answer to inputs it cannot use: a clear error, at once."""

from __future__ import annotations

import contextlib
import http.server
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from brokerclient import (
    AsyncPublisher,
    AsyncSubscriber,
    Publisher,
    RequestFailed,
    StreamInterrupted,
    Subscriber,
    event,
)
from brokerclient import http as client_http


@pytest.mark.parametrize("make", [Publisher, AsyncPublisher])
def test_a_publishers_url_without_a_scheme_is_refused_at_once(make: type) -> None:
    """``localhost:8000`` was tried as a URL and retried as unreachable (3 s)."""
    with pytest.raises(ValueError, match="http:// or https://"):
        make("localhost:8000")


@pytest.mark.parametrize("make", [Subscriber, AsyncSubscriber])
def test_a_subscribers_url_without_a_scheme_is_refused_at_once(make: type) -> None:
    """A subscriber retried it for ever (its default ``give_up_after`` is None)."""
    with pytest.raises(ValueError, match="http:// or https://"):
        make("orders", "localhost:8000")


def test_a_page_answered_200_where_a_topic_was_asked_is_a_failed_request() -> None:
    """A stream "from now" first asks where its topic ends; a proxy's HTML page answered
    200 raised a JSONDecodeError (a traceback from ``broker tail``)."""

    def html_page(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, html="<html>a proxy's page</html>")

    client = httpx.Client(base_url="http://broker.test", transport=httpx.MockTransport(html_page))
    with Subscriber("orders", client=client) as subscriber, pytest.raises(RequestFailed):
        next(iter(subscriber))


@pytest.mark.parametrize("make", [Publisher, AsyncPublisher])
@pytest.mark.parametrize("key", ["é", "", "k" * 201, "a\nb"])
async def test_an_idempotency_key_the_broker_refuses_is_refused_before_sending(
    make: type, key: str
) -> None:
    """``é`` was a UnicodeEncodeError from inside httpx; the others went to the broker
    for a 400 (or, empty, were taken for no key at all)."""
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(201, json={"id": "1-0"})

    transport = httpx.MockTransport(record)
    if make is Publisher:
        with httpx.Client(base_url="http://b.test", transport=transport) as client:
            with pytest.raises(ValueError, match="idempotency key"):
                Publisher(client=client).publish("t", 1, idempotency_key=key)
    else:
        async with httpx.AsyncClient(base_url="http://b.test", transport=transport) as client:
            with pytest.raises(ValueError, match="idempotency key"):
                await AsyncPublisher(client=client).publish("t", 1, idempotency_key=key)
    assert sent == []


@pytest.mark.parametrize("data", [float("nan"), float("inf"), {"a": [-float("inf")]}])
def test_a_nan_or_an_infinity_is_refused_before_sending(data: object) -> None:
    """The broker answered the body "malformed JSON"; the direct publisher stored
    ``null`` in their place, in silence (tests/face/test_client.py)."""
    client = httpx.Client(base_url="http://b.test", transport=httpx.MockTransport(_never))
    with Publisher(client=client) as publisher, pytest.raises(ValueError, match="no JSON form"):
        publisher.publish("t", data)


def _never(request: httpx.Request) -> httpx.Response:
    raise AssertionError("nothing may be sent")


def _reads_the_body(request: httpx.Request) -> httpx.Response:
    request.read()
    raise AssertionError("the stream's iterator raised: no answer to make")


def test_a_stream_interrupted_where_no_answer_can_be_read_says_the_broker_may_have_refused_it() -> (
    None
):
    """A transport that is not httpcore's HTTP/1.1 (HTTP/2; a mock, here) cannot read an
    answer the broker sent before the iterator raised (a refusal: the advice "resend
    the same events" may be false then): the error says so, where it said nothing."""

    def dies() -> Iterator[dict[str, object]]:
        yield event(1)
        raise OSError("the model's process died")

    client = httpx.Client(base_url="http://b.test", transport=httpx.MockTransport(_reads_the_body))
    with Publisher(client=client) as publisher, pytest.raises(StreamInterrupted) as raised:
        publisher.stream("t", dies(), idempotency_key="unread")
    assert isinstance(raised.value.__cause__, OSError)
    assert "it may have refused the stream" in str(raised.value), raised.value
    assert raised.value.idempotency_key == "unread"


def test_the_clients_idempotency_key_rule_is_the_brokers() -> None:
    from broker import constants as c
    from brokerclient.http import IDEMPOTENCY_KEY

    assert IDEMPOTENCY_KEY.pattern == c.IDEMPOTENCY_KEY_PATTERN.pattern


def _refusing(sent: list[httpx.Request]) -> httpx.MockTransport:
    def refuse(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(401, json={"title": "Unauthorized"})

    return httpx.MockTransport(refuse)


@pytest.mark.parametrize("token", ["plain", lambda: "asked"], ids=["str", "callable"])
def test_a_subscriber_refused_401_tries_again_only_with_a_callable_and_only_once(
    token: object,
) -> None:
    """A string token refused is refused for good: one request, as before. A callable is
    asked again for one more try; refused again, it raises (never a loop)."""
    sent: list[httpx.Request] = []
    client = httpx.Client(base_url="http://b.test", transport=_refusing(sent))
    subscriber = Subscriber("orders", client=client, from_earliest=True, token=token)  # type: ignore[arg-type]
    with subscriber, pytest.raises(RequestFailed) as refused:
        next(iter(subscriber))
    assert refused.value.status == 401
    assert [r.headers["authorization"] for r in sent] == (
        ["Bearer plain"] if token == "plain" else ["Bearer asked", "Bearer asked"]
    )


async def test_a_publisher_refused_401_with_a_string_token_sends_once() -> None:
    sent: list[httpx.Request] = []
    async with httpx.AsyncClient(base_url="http://b.test", transport=_refusing(sent)) as client:
        with pytest.raises(RequestFailed):
            await AsyncPublisher(client=client, token="plain").publish("t", 1)
    assert [r.headers["authorization"] for r in sent] == ["Bearer plain"]


def test_a_token_callable_that_returns_no_string_is_a_type_error() -> None:
    client = httpx.Client(base_url="http://b.test", transport=httpx.MockTransport(_never))
    with Publisher(client=client, token=lambda: b"bytes") as publisher:  # type: ignore[arg-type,return-value]
        with pytest.raises(TypeError, match="not a str"):
            publisher.publish("t", 1)


def test_what_a_subscribers_token_callable_raises_is_raised_as_it_is() -> None:
    """Its own httpx error (a token fetched over HTTP) was taken for the broker's, and
    retried for ever (``give_up_after`` None, the default)."""
    calls: list[int] = []

    def token() -> str:
        calls.append(1)
        raise httpx.ConnectError("the token service is down")

    client = httpx.Client(base_url="http://b.test", transport=httpx.MockTransport(_never))
    with Subscriber("orders", client=client, token=token) as subscriber:
        with pytest.raises(httpx.ConnectError, match="token service"):
            next(iter(subscriber))
    assert calls == [1]


async def test_what_an_async_subscribers_token_callable_raises_is_raised_as_it_is() -> None:
    async def token() -> str:
        raise httpx.ConnectError("the token service is down")

    async with (
        httpx.AsyncClient(base_url="http://b.test", transport=httpx.MockTransport(_never)) as c,
        AsyncSubscriber("orders", client=c, token=token) as subscriber,
    ):
        with pytest.raises(httpx.ConnectError, match="token service"):
            await subscriber.__aiter__().__anext__()


async def test_the_clients_this_library_builds_share_one_tls_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each built its own, loading the CA bundle on the caller's event loop: 25-50 ms
    for every subscriber or publisher an app opened (soak test)."""
    made: list[object] = []
    create = httpx.create_ssl_context

    def counted(*args: object, **kwargs: object) -> object:
        made.append(None)
        return create(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(httpx, "create_ssl_context", counted)
    client_http._tls_trusting.cache_clear()
    url = "http://127.0.0.1:1"
    clients = [Publisher(url), Subscriber("t", url)]
    async_clients = [AsyncPublisher(url), AsyncSubscriber("t", url)]
    try:
        assert len(made) == 1
    finally:
        for client in clients:
            client.close()
        await async_clients[0].aclose()
        await async_clients[1].aclose()
        client_http._tls_trusting.cache_clear()


@contextlib.contextmanager
def _https_server(authority: trustme.CA) -> Iterator[str]:
    """A real HTTPS server on loopback whose certificate ``authority`` signed; its URL."""

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_the_shared_tls_context_follows_ssl_cert_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``SSL_CERT_FILE`` was read once per process: set to another CA later (a program's
    own, a test's), it was not seen, and a broker whose certificate that CA signed was
    refused. The context is still one while the variable stays the same."""
    first, second = trustme.CA(), trustme.CA()
    first.cert_pem.write_to_path(tmp_path / "first.pem")
    second.cert_pem.write_to_path(tmp_path / "second.pem")
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "first.pem"))
    client_http._tls_trusting.cache_clear()
    try:
        trusting_first = client_http.shared_tls()
        assert client_http.shared_tls() is trusting_first
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "second.pem"))
        with _https_server(second) as url:
            with httpx.Client(verify=client_http.shared_tls()) as client:
                assert client.get(url).status_code == 200
            with httpx.Client(verify=trusting_first) as client, pytest.raises(httpx.ConnectError):
                client.get(url)  # (the server is real: only the CA trusted tells them apart)
        assert client_http.shared_tls() is not trusting_first
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "first.pem"))
        assert client_http.shared_tls() is trusting_first
    finally:
        client_http._tls_trusting.cache_clear()
