"""The Python client's answer to inputs it cannot use: a clear error, at once."""

from __future__ import annotations

import httpx
import pytest

from brokerclient import AsyncPublisher, AsyncSubscriber, Publisher, RequestFailed, Subscriber


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
