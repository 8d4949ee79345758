"""DNS rebinding in headless Chromium (``api.hosts``): the browser resolves a site's
name to 127.0.0.1 (``--host-resolver-rules``, as a rebinding DNS answer would), and
the broker, with authorization off on loopback, serves nothing sent to that name,
while the same broker by ``localhost`` serves its page."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.broker_process import BrokerProcess
from tests.support.chromium import Chromium
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e  # needs Chromium: not in make test-fast

REBOUND = "rebound.example"


@pytest.fixture(scope="module")
def open_broker(redis_server: RedisServer) -> Iterator[BrokerProcess]:
    process = BrokerProcess(redis_url=redis_server.url, env={}).start()
    yield process
    process.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    rule = f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1"
    instance = Chromium(tmp_path, flags=(rule,), enable=("Network",)).start()
    yield instance
    instance.close()


def test_a_page_reaching_the_broker_by_a_rebound_name_gets_nothing(
    browser: Chromium, open_broker: BrokerProcess
) -> None:
    port = open_broker.port
    topic = f"rebound-{time.time_ns()}"
    browser.navigate(f"http://{REBOUND}:{port}/")
    assert "host-not-served" in str(browser.evaluate("document.body.innerText"))
    # The broker's own page, by localhost, is served.
    browser.navigate(f"http://localhost:{port}/")
    assert browser.evaluate("document.title")
    # From a document of the broker's (one without the live page's policy, which lets
    # it reach no other origin), a plain text publish (no preflight) to the rebound
    # name reaches the broker, which refuses it.
    browser.navigate(f"http://localhost:{port}/healthz")
    target = json.dumps(f"http://{REBOUND}:{port}/topics/{topic}/events")
    sent = browser.evaluate(  # (evaluate awaits the promise)
        f"fetch({target}, {{method: 'POST', mode: 'no-cors', body: 'x', headers:"
        " {'Content-Type': 'text/plain'}}).then(() => 'sent', (e) => String(e))"
    )
    assert sent == "sent", sent
    assert any(REBOUND in url for url in browser.requests), browser.requests
    info = httpx.get(f"{open_broker.url}/topics/{topic}", timeout=10)
    assert info.status_code == 404, info.text  # nothing was stored
    # And by its own name the same publish is stored.
    local = json.dumps(f"http://localhost:{port}/topics/{topic}/events")
    status = browser.evaluate(
        f"fetch({local}, {{method: 'POST', body: 'y', headers:"
        " {'Content-Type': 'text/plain'}}).then((r) => r.status)"
    )
    assert status == 201, status
