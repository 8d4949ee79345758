"""The face's tests share one Chromium a module (tests/face/conftest.py), each test on a
page of its own: nothing of a test's page reaches the next test's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.broker_process import BrokerProcess
from tests.support.chromium import Chromium

pytestmark = pytest.mark.e2e


def test_a_fresh_page_keeps_nothing_of_the_page_before(
    face_broker: BrokerProcess, module_chromium: Chromium, tmp_path: Path
) -> None:
    """Cookies, storage, a script run on every load, the requests and console recorded:
    what a test leaves in its page is gone from the next one's, as from a new browser."""
    browser, page = module_chromium, f"{face_broker.url}/healthz"
    browser.fresh_page(tmp_path)
    browser.set_cookie("left", "behind", face_broker.url)
    browser.run_on_every_load("window.__leftBehind = true; console.log('left behind')")
    browser.navigate(page)
    browser.evaluate("sessionStorage.setItem('left', '1'); localStorage.setItem('left', '1')")
    assert browser.evaluate("document.cookie") == "left=behind"
    assert browser.evaluate("window.__leftBehind") is True
    assert page in browser.requests and "left behind" in browser.console
    browser.fresh_page(tmp_path)
    assert browser.requests == [] and browser.console == []
    browser.navigate(page)
    assert browser.evaluate("document.cookie") == ""
    assert browser.evaluate("window.__leftBehind === undefined") is True
    assert browser.evaluate("sessionStorage.length + localStorage.length") == 0
    assert page in browser.requests and browser.console == []
