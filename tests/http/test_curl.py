"""The README's curl examples, run with the real ``curl`` binary."""

from __future__ import annotations

import json
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.http.helpers import (
    new_topic,
)
from tests.support.broker_process import BrokerProcess
from tests.support.sse import parse_sse

CURL = shutil.which("curl")


def curl_binary() -> str:
    if CURL is None:  # `make test` installs it (scripts/ensure-system-tools.sh)
        pytest.fail("curl is missing: apt-get install curl (or run make system-tools)")
    return CURL


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [curl_binary(), "-sS", "--max-time", "10", *args],
        capture_output=True,
        text=True,
        timeout=15,
    )


class CurlStream:
    """``curl -N`` left running; its output read with deadlines."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.output = b""

    def read_until(self, marker: bytes, timeout: float = 5.0) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"curl did not print {marker!r}: {self.output!r}")
            readable, _, _ = select.select([self.process.stdout], [], [], remaining)
            if readable:
                data = self.process.stdout.read1(65536)  # type: ignore[attr-defined]
                if not data:
                    raise AssertionError(f"curl ended before {marker!r}: {self.output!r}")
                self.output += data
        return self.output.decode()


@contextmanager
def curl_stream(*args: str) -> Iterator[CurlStream]:
    process = subprocess.Popen(
        [curl_binary(), "-sS", "-N", "--max-time", "30", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield CurlStream(process)
    finally:
        process.terminate()
        process.wait(timeout=5)
        assert process.stdout is not None
        process.stdout.close()


def test_curl_publish_json(http_broker: BrokerProcess) -> None:
    topic = new_topic()
    result = curl(
        "-X", "POST",
        "-H", "Content-Type: application/json",
        "-d", '{"data": {"temperature": 21.5}, "event": "reading"}',
        "-w", "\n%{http_code}",
        f"{http_broker.url}/topics/{topic}/events",
    )  # fmt: skip
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "201", result
    assert set(json.loads(body)) == {"id"}


def test_curl_publish_a_batch_and_text(http_broker: BrokerProcess) -> None:
    topic = new_topic()
    batch = curl(
        "-H", "Content-Type: application/json",
        "-d", '[{"data": 1}, {"data": 2}]',
        f"{http_broker.url}/topics/{topic}/events",
    )  # fmt: skip
    assert len(json.loads(batch.stdout)["ids"]) == 2
    text = curl(
        "-H", "Content-Type: text/plain; charset=utf-8",
        "--data-binary", "hello\nworld",
        f"{http_broker.url}/topics/{topic}/events?event=greeting",
    )  # fmt: skip
    assert set(json.loads(text.stdout)) == {"id"}
    repeat = curl(
        "-i",
        "-H", "Content-Type: text/plain; charset=utf-8",
        "-H", "Idempotency-Key: curl-1",
        "--data-binary", "once",
        f"{http_broker.url}/topics/{topic}/events",
    )  # fmt: skip
    assert " 201" in repeat.stdout.splitlines()[0]
    again = curl(
        "-i",
        "-H", "Content-Type: text/plain; charset=utf-8",
        "-H", "Idempotency-Key: curl-1",
        "--data-binary", "once",
        f"{http_broker.url}/topics/{topic}/events",
    )  # fmt: skip
    assert " 200" in again.stdout.splitlines()[0]
    assert "idempotent-replayed: true" in again.stdout.lower()


def test_curl_error_is_problem_json(http_broker: BrokerProcess) -> None:
    result = curl(
        "-i",
        "-H", "Content-Type: application/json",
        "-d", "not json",
        f"{http_broker.url}/topics/{new_topic()}/events",
    )  # fmt: skip
    head, _, body = result.stdout.replace("\r\n", "\n").partition("\n\n")
    assert " 400" in head.splitlines()[0]
    assert "content-type: application/problem+json" in head.lower()
    assert json.loads(body)["status"] == 400


def test_curl_subscribes_with_no_accept_header_and_gets_live_events(
    http_broker: BrokerProcess,
) -> None:
    topic = new_topic()
    with curl_stream(f"{http_broker.url}/topics/{topic}/events") as stream:
        stream.read_until(b"retry:")
        stream.read_until(b"\n\n")
        response = httpx.post(
            f"{http_broker.url}/topics/{topic}/events",
            json={"data": {"hello": "curl"}, "event": "greet"},
        )
        event_id = response.json()["id"]
        output = stream.read_until(b'data: {"hello":"curl"}\n\n')
    assert f"id: {event_id}\nevent: greet\ndata: " in output


def test_curl_resumes_with_last_event_id(http_broker: BrokerProcess) -> None:
    topic = new_topic()
    ids = httpx.post(
        f"{http_broker.url}/topics/{topic}/events", json=[{"data": n} for n in range(3)]
    ).json()["ids"]
    with curl_stream(
        "-H", f"Last-Event-ID: {ids[0]}", f"{http_broker.url}/topics/{topic}/events"
    ) as s:
        output = s.read_until(f"id: {ids[2]}\n".encode())
        output = s.read_until(b"data: 2\n\n")
    assert [e["id"] for e in parse_sse(output) if "id" in e] == ids[1:]


def test_curl_reads_history_as_json(http_broker: BrokerProcess) -> None:
    topic = new_topic()
    ids = httpx.post(
        f"{http_broker.url}/topics/{topic}/events", json=[{"data": n} for n in range(3)]
    ).json()["ids"]
    result = curl(
        "-H", "Accept: application/json", f"{http_broker.url}/topics/{topic}/events?limit=2"
    )  # fmt: skip
    page = json.loads(result.stdout)
    assert [e["id"] for e in page["events"]] == ids[:2]
    assert page["next"] == ids[1]
    info = json.loads(curl(f"{http_broker.url}/topics/{topic}").stdout)
    assert info["length"] == 3
