"""``broker publish``, ``broker tail`` and ``broker topics``: the real console script."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from tests.support.broker_process import BROKER_BIN, BrokerProcess
from tests.support.redis_server import RedisServer, free_port


def broker(*args: str, url: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    return run([str(BROKER_BIN), *args], url=url, stdin=stdin, **env)


def run(
    command: list[str], url: str, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    environment |= {"BROKER_URL": url, **env}
    return subprocess.run(command, input=stdin, capture_output=True, text=True,
                          env=environment, timeout=60)  # fmt: skip


def lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines()]


def test_publish_then_tail_from_earliest(face_broker: BrokerProcess) -> None:
    topic = f"cli.{uuid.uuid4().hex[:8]}"
    url = face_broker.url
    one = broker("publish", topic, '{"n": 1}', url=url)
    assert one.returncode == 0, one.stderr
    text = broker("publish", topic, "--text", "--event", "note", url=url, stdin="hello\n")
    assert text.returncode == 0, text.stderr
    closing = broker("publish", topic, "3", "--close", url=url)
    assert closing.returncode == 0, closing.stderr
    tail = broker("tail", topic, "--from", "earliest", url=url)
    assert tail.returncode == 0, tail.stderr  # the topic was closed: tail ends by itself
    events = lines(tail.stdout)
    assert [(e["event"], e["data"]) for e in events] == [
        (None, '{"n":1}'), ("note", "hello"), (None, "3"), ("broker.end", "{}"),
    ]  # fmt: skip
    assert events[0]["id"] == lines(one.stdout)[0]["id"]
    assert lines(closing.stdout) == [{"id": events[2]["id"], "end_id": events[3]["id"]}]
    assert "the topic was closed" in tail.stderr
    after_first = broker("tail", topic, "--last-event-id", events[0]["id"], url=url)
    assert [e["data"] for e in lines(after_first.stdout)] == ["hello", "3", "{}"]
    refused = broker("publish", topic, "4", url=url)
    assert refused.returncode == 1 and "409" in refused.stderr and refused.stdout == ""


SERVER_SIDE = ["starlette", "uvicorn", "redis", "fakeredis", "pydantic", "pydantic_settings"]
SERVER_SIDE += ["orjson", "prometheus_client", "jwt", "api.serve", "api.settings", "broker.core"]
SAYING_WHAT_IT_LOADED = f"""
import atexit, sys
loaded = lambda: sorted(m for m in sys.modules if m in {SERVER_SIDE})
atexit.register(lambda: print("server side loaded:", loaded(), file=sys.stderr))
from api.cli import main
main()
"""


def test_the_client_commands_load_no_server_side(face_broker: BrokerProcess) -> None:
    """``broker publish|tail|topics`` imported the server side (uvicorn, Starlette, the
    settings' pydantic, the core and its Redis store): 0.6 s of CPU before each one did
    anything. Run as the console script runs them, they say at exit what they loaded."""
    topic = f"cli.lean.{uuid.uuid4().hex[:8]}"
    for command in (
        ["--help"],
        ["publish", topic, "1"],
        ["publish", topic, "--lines", "--close"],  # (stdin empty: a stream of no line)
        ["tail", topic, "--from", "earliest"],
        ["topics", "--prefix", topic],
    ):
        done = run([sys.executable, "-c", SAYING_WHAT_IT_LOADED, *command], url=face_broker.url)
        assert done.returncode == 0, (command, done.stderr)
        assert "server side loaded: []" in done.stderr, (command, done.stderr)


def test_tail_of_a_deleted_topic_says_it_was_deleted(face_broker: BrokerProcess) -> None:
    """It said "the topic was closed" after the ``deleted`` gap."""
    topic = f"cli.{uuid.uuid4().hex[:8]}"
    published = broker("publish", topic, "1", url=face_broker.url)
    assert published.returncode == 0, published.stderr
    assert httpx.delete(f"{face_broker.url}/topics/{topic}", timeout=10).status_code == 204
    [answer] = lines(published.stdout)
    tail = broker("tail", topic, "--last-event-id", answer["id"], url=face_broker.url)
    assert tail.returncode == 0, tail.stderr
    assert [e["event"] for e in lines(tail.stdout)] == ["broker.gap"]
    assert "the topic was deleted" in tail.stderr


def test_topics_lists_as_json_lines(face_broker: BrokerProcess) -> None:
    prefix = f"cli.list.{uuid.uuid4().hex[:8]}"
    for name in ("a", "b"):
        assert broker("publish", f"{prefix}.{name}", "1", url=face_broker.url).returncode == 0
    listed = broker("topics", "--prefix", prefix, url=face_broker.url)
    assert listed.returncode == 0, listed.stderr
    assert sorted(t["topic"] for t in lines(listed.stdout)) == [f"{prefix}.a", f"{prefix}.b"]


def test_usage_and_unreachable_exit_codes(face_broker: BrokerProcess) -> None:
    topic = f"cli.codes.{uuid.uuid4().hex[:8]}"
    not_json = broker("publish", topic, "not json", url=face_broker.url)
    assert not_json.returncode == 2 and "--text" in not_json.stderr and not_json.stdout == ""
    assert broker("tail", url=face_broker.url).returncode == 2  # no topic
    nobody = f"http://127.0.0.1:{free_port()}"
    down = broker("publish", topic, "1", url=nobody)
    assert down.returncode == 3 and "unreachable" in down.stderr
    # The key the publish was sent under: it may have been stored, its answer lost (a
    # rerun without it stored a second copy).
    assert "retry with --idempotency-key bc-" in down.stderr, down.stderr
    keyed = broker("publish", topic, "1", "--idempotency-key", "order 7", url=nobody)
    assert keyed.returncode == 3 and "--idempotency-key 'order 7'" in keyed.stderr, keyed.stderr
    bad_key = broker("publish", topic, "1", "--idempotency-key", "é", url=face_broker.url)
    assert bad_key.returncode == 2 and "idempotency key" in bad_key.stderr, bad_key.stderr
    down_tail = broker("tail", topic, "--give-up-after", "1", url=nobody)
    assert down_tail.returncode == 3
    # A URL without its scheme is a usage error (it was retried, then "unreachable").
    no_scheme = broker("publish", topic, "1", url=face_broker.url.removeprefix("http://"))
    assert no_scheme.returncode == 2 and "http://" in no_scheme.stderr, no_scheme.stderr
    # Text that is not UTF-8 is a usage error (it was a traceback).
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    not_utf8 = subprocess.run(
        [str(BROKER_BIN), "publish", topic, "--text", "--url", face_broker.url],
        input=b"\xff\xfe caf\xe9",
        capture_output=True,
        env=environment,
        timeout=60,
    )
    assert not_utf8.returncode == 2 and b"UTF-8" in not_utf8.stderr, not_utf8.stderr


def test_tail_resumes_across_a_broker_kill(own_broker: BrokerProcess) -> None:
    topic = f"cli.resume.{uuid.uuid4().hex[:8]}"
    url = own_broker.url
    assert broker("publish", topic, "0", url=url).returncode == 0
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    tail = subprocess.Popen(
        [str(BROKER_BIN), "tail", topic, "--from", "earliest", "--url", url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
    )  # fmt: skip
    try:
        assert tail.stdout is not None
        assert json.loads(tail.stdout.readline())["data"] == "0"
        own_broker.kill()
        own_broker.start()
        for n in (1, 2):
            assert broker("publish", topic, str(n), url=url).returncode == 0
        assert broker("publish", topic, "3", "--close", url=url).returncode == 0
        out, err = tail.communicate(timeout=30)
    finally:
        tail.kill()
    assert tail.returncode == 0, err
    assert [e["data"] for e in lines(out)] == ["1", "2", "3", "{}"]
    assert "reconnecting" in err


def test_tail_gives_up_when_the_broker_keeps_answering_come_back_later(
    private_redis: RedisServer,
) -> None:
    """The store is down: every stream is a 200 that holds only a retry hint and ends
    (so that an EventSource keeps trying). That is no working connection: ``tail`` gives
    up after ``--give-up-after`` (exit 3), as when the broker cannot be reached at all."""
    process = BrokerProcess(redis_url=private_redis.url).start()
    try:
        private_redis.stop()
        started = time.monotonic()
        tail = broker(
            "tail", "cli.down", "--from", "earliest", "--give-up-after", "3", url=process.url
        )
        assert tail.returncode == 3, (tail.returncode, tail.stderr)
        assert time.monotonic() - started < 20
    finally:
        process.close()


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers each request with the next of ``answers`` (status, content type, body)."""

    answers: ClassVar[list[tuple[int, str, bytes]]] = []

    def _answer(self) -> None:
        status, content_type, body = self.answers.pop(0)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[tuple[str, list[tuple[int, str, bytes]]]]:
    answers: ClassVar[list[tuple[int, str, bytes]]] = []
    handler = type("Handler", (_Scripted,), {"answers": answers})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", answers
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_topics_tries_again_on_503_and_a_page_not_json_is_an_error(
    scripted: tuple[str, list[tuple[int, str, bytes]]],
) -> None:
    """``broker topics`` exited 1 on the first 503 (a publish retries it), and an answer
    that is not JSON (a proxy's page) was a traceback."""
    url, answers = scripted
    page = json.dumps({"topics": [{"topic": "a", "length": 1}], "next": None}).encode()
    answers += [(503, "application/problem+json", b"{}")] * 2 + [(200, "application/json", page)]
    listed = broker("topics", url=url)
    assert listed.returncode == 0, listed.stderr
    assert lines(listed.stdout) == [{"topic": "a", "length": 1}]
    answers += [(200, "text/html", b"<html>a proxy</html>")]
    html = broker("publish", "t", "1", url=url)
    assert html.returncode == 1 and "not JSON" in html.stderr, html.stderr
    assert "Traceback" not in html.stderr


def test_publish_takes_its_data_after_its_options(face_broker: BrokerProcess) -> None:
    """argparse fills TOPIC and the optional DATA from the arguments before the first
    option: ``broker publish t --event x 1`` was "unrecognized arguments: 1"."""
    topic = f"cli.{uuid.uuid4().hex[:8]}"
    for args in (
        ["--event", "x", "1"],
        ["--text", "hello", "--event", "y"],
        ["--event", "z", "-5"],
        ["--text", "--event", "w", "--", "--x"],  # (after --, DATA whatever it looks like)
    ):
        done = broker("publish", topic, *args, url=face_broker.url)
        assert done.returncode == 0, done.stderr
    history = httpx.get(
        f"{face_broker.url}/topics/{topic}/events", headers={"Accept": "application/json"}
    ).json()["events"]
    assert [(e["event"], e["data"]) for e in history] == [
        ("x", 1), ("y", "hello"), ("z", -5), ("w", "--x"),
    ]  # fmt: skip
    refused = broker("publish", topic, "--evnt", "x", url=face_broker.url)
    assert refused.returncode == 2 and "unrecognized arguments: --evnt x" in refused.stderr


def test_publish_of_text_that_is_not_unicode_is_a_usage_error(face_broker: BrokerProcess) -> None:
    """A JSON string with a lone surrogate has no UTF-8: it was a traceback."""
    done = broker("publish", f"cli.{uuid.uuid4().hex[:8]}", '"\\ud800x"', url=face_broker.url)
    assert done.returncode == 2, done.stderr
    assert "not valid Unicode text" in done.stderr and "Traceback" not in done.stderr


def test_text_from_stdin_loses_its_last_line_ending_crlf_too(face_broker: BrokerProcess) -> None:
    """`printf 'a\\r\\n' | broker publish t --text` stored "a\\r" (audit): one final line
    ending is dropped, LF or CRLF, as for `echo a |`; any other is the text's own."""
    topic = f"cli.{uuid.uuid4().hex[:8]}"
    for stdin in ("a\r\n", "b\n", "c\r\n\r\n", "d"):
        done = broker("publish", topic, "--text", url=face_broker.url, stdin=stdin)
        assert done.returncode == 0, done.stderr
    history = httpx.get(
        f"{face_broker.url}/topics/{topic}/events", headers={"Accept": "application/json"}
    ).json()["events"]
    assert [e["data"] for e in history] == ["a", "b", "c\r\n", "d"]


def test_a_token_file_that_cannot_be_used_is_a_usage_error(
    face_broker: BrokerProcess, tmp_path: Path
) -> None:
    """Told at once, before any request: a file missing or empty, or a token given twice."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = [
        (["--token-file", str(tmp_path / "missing")], "missing"),
        (["--token-file", str(empty)], "is empty"),
        (["--token-file", str(empty), "--token", "t"], "not both"),
    ]
    for options, said in cases:
        for command in (["tail", "cli.token-file"], ["topics"], ["publish", "cli.token-file", "1"]):
            answer = broker(*command, *options, url=face_broker.url)
            assert answer.returncode == 2 and said in answer.stderr, (command, answer.stderr)
    both = broker("topics", url=face_broker.url, BROKER_TOKEN="t", BROKER_TOKEN_FILE=str(empty))
    assert both.returncode == 2 and "both set" in both.stderr, both.stderr
    # A flag wins over the environment (BROKER_TOKEN exported, a file given).
    token_file = tmp_path / "token"
    token_file.write_text("a-token\n")
    flag = broker("topics", "--token-file", str(token_file), url=face_broker.url, BROKER_TOKEN="t")
    assert flag.returncode == 0, flag.stderr
