"""``broker publish TOPIC --lines``: stdin streamed as a streaming ingest, one event a line,
through the real console script and a real broker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import uuid
from typing import Any

import httpx
import redis

from broker import constants as c
from tests.face.test_cli import broker, lines
from tests.support.broker_process import BROKER_BIN, BrokerProcess
from tests.support.polling import WaitTimeout, wait_until
from tests.support.redis_server import RedisServer, free_port


def history(url: str, topic: str) -> list[dict[str, Any]]:
    answer = httpx.get(
        f"{url}/topics/{topic}/events", headers={"Accept": "application/json"}, timeout=10
    )
    return list(answer.json()["events"]) if answer.status_code == 200 else []


def test_lines_are_stored_in_order_each_once_and_close_closes(face_broker: BrokerProcess) -> None:
    topic = f"cli.lines.{uuid.uuid4().hex[:8]}"
    stdin = '1\n{"a": 2}\n\n  \r\n"three"\n[4]'  # (blank lines skipped; the last one unended)
    done = broker("publish", topic, "--lines", "--event", "tok", "--close",
                  url=face_broker.url, stdin=stdin)  # fmt: skip
    assert done.returncode == 0, done.stderr
    events = history(face_broker.url, topic)
    assert [(e["event"], e["data"]) for e in events] == [
        ("tok", 1), ("tok", {"a": 2}), ("tok", "three"), ("tok", [4]), ("broker.end", {}),
    ]  # fmt: skip
    assert lines(done.stdout) == [{
        "count": 4, "first_id": events[0]["id"], "last_id": events[3]["id"],
        "end_id": events[4]["id"],
    }]  # fmt: skip
    refused = broker("publish", topic, "5", url=face_broker.url)
    assert refused.returncode == 1 and "409" in refused.stderr  # closed


def test_text_lines_are_json_strings_less_their_line_ending(face_broker: BrokerProcess) -> None:
    """A blank line is an empty string (the text's own line); CRLF and LF are taken off,
    a lone CR inside kept; nothing is parsed as JSON."""
    topic = f"cli.lines.{uuid.uuid4().hex[:8]}"
    stdin = "a\r\n\nnot json\n{x}\n a\rb \r\nlast"
    done = broker("publish", topic, "--lines", "--text", url=face_broker.url, stdin=stdin)
    assert done.returncode == 0, done.stderr
    assert [e["data"] for e in history(face_broker.url, topic)] == [
        "a", "", "not json", "{x}", " a\rb ", "last",
    ]  # fmt: skip
    assert lines(done.stdout)[0]["count"] == 6


def piped(url: str, *args: str) -> subprocess.Popen[str]:
    """``broker publish ARGS`` whose stdin the test writes to, and closes, as it goes;
    SIGINT as a terminal's Ctrl-C finds it (default: Python's KeyboardInterrupt), not as
    the suite's runner may have it: run in the background of a shell without job
    control (a CI script's ``&``), it ignores SIGINT, its children with it, and a
    Ctrl-C test's SIGINT did nothing (the stream ended at stdin's end, exit 0)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return subprocess.Popen(
        [str(BROKER_BIN), "publish", *args, "--url", url], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
        preexec_fn=_ctrl_c_as_at_a_terminal,
    )  # fmt: skip


def _ctrl_c_as_at_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_until_stored(
    publishing: subprocess.Popen[str], url: str, topic: str, text: str, count: int
) -> None:
    """Writes ``text`` to its stdin, left open, and waits for the topic to hold ``count``
    events."""
    assert publishing.stdin is not None
    publishing.stdin.write(text)
    publishing.stdin.flush()
    wait_until(
        lambda: len(history(url, topic)) == count,
        timeout=10,
        what=f"{count} event(s) stored while stdin is open",
    )
    assert publishing.poll() is None


def test_a_line_is_stored_before_stdin_ends(face_broker: BrokerProcess) -> None:
    """Each line goes when it is read, not once stdin is read whole: a generator's first
    token is on the page while the generator runs."""
    topic = f"cli.lines.{uuid.uuid4().hex[:8]}"
    publishing = piped(face_broker.url, topic, "--lines")
    try:
        write_until_stored(publishing, face_broker.url, topic, "1\n", 1)
        write_until_stored(publishing, face_broker.url, topic, "2\n", 2)
        out, err = publishing.communicate("3\n", timeout=30)
    finally:
        publishing.kill()
    assert publishing.returncode == 0, err
    assert [e["data"] for e in history(face_broker.url, topic)] == [1, 2, 3]
    assert lines(out)[0]["count"] == 3


def test_a_line_not_json_stops_it_naming_the_line_and_the_key(face_broker: BrokerProcess) -> None:
    """Exit 2 (as DATA not JSON); stdin's line named (blank lines counted), the events
    before it stored, the topic not closed; the key made up is printed, and the input
    fixed, rerun under it, stores each line once."""
    topic = f"cli.lines.{uuid.uuid4().hex[:8]}"
    publishing = piped(face_broker.url, topic, "--lines", "--close")
    try:  # (the lines before it stored first: those a broken-off body had not brought are not)
        write_until_stored(publishing, face_broker.url, topic, "1\n\n2\n", 2)
        out, err = publishing.communicate("nope\n4\n", timeout=30)
    finally:
        publishing.kill()
    assert publishing.returncode == 2, err
    assert out == "" and "Traceback" not in err
    assert "stdin line 4 is not JSON" in err, err
    assert "the 2 event(s) before it were sent" in err, err
    key = re.search(r"--idempotency-key (bc-\S+)", err)
    assert key, err
    assert [e["data"] for e in history(face_broker.url, topic)] == [1, 2]  # not closed
    fixed = broker("publish", topic, "--lines", "--close", "--idempotency-key", key[1],
                   url=face_broker.url, stdin="1\n\n2\n3\n4\n")  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr
    events = history(face_broker.url, topic)
    assert [e["data"] for e in events] == [1, 2, 3, 4, {}]
    assert events[-1]["event"] == "broker.end"
    assert lines(fixed.stdout)[0]["count"] == 4


def test_a_stream_not_stored_prints_its_key_to_rerun_under(face_broker: BrokerProcess) -> None:
    """Unreachable (exit 3), or refused (exit 1): the key made up, or the one given, is
    named, as the client's errors carry it; a usage error is told before anything is sent."""
    topic = f"cli.lines.{uuid.uuid4().hex[:8]}"
    nobody = f"http://127.0.0.1:{free_port()}"
    down = broker("publish", topic, "--lines", url=nobody, stdin="1\n")
    assert down.returncode == 3 and "unreachable" in down.stderr, down.stderr
    assert re.search(r"send the same input again under --idempotency-key bc-\S+", down.stderr)
    refused = broker("publish", topic, "--lines", "--event", "broker.x", "--idempotency-key",
                     "my key", url=face_broker.url, stdin="1\n")  # fmt: skip
    assert refused.returncode == 1 and "400" in refused.stderr, refused.stderr
    assert "--idempotency-key 'my key'" in refused.stderr, refused.stderr
    data = broker("publish", topic, "1", "--lines", url=face_broker.url, stdin="1\n")
    assert data.returncode == 2 and "give no DATA" in data.stderr, data.stderr
    not_utf8 = subprocess.run(
        [str(BROKER_BIN), "publish", topic, "--lines", "--text", "--url", face_broker.url],
        input=b"ok\n\xff\n", capture_output=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
    )  # fmt: skip
    assert not_utf8.returncode == 2 and b"stdin line 2 is not UTF-8" in not_utf8.stderr


def test_ctrl_c_before_any_part_names_the_same_input_under_its_key(
    face_broker: BrokerProcess,
) -> None:
    """Exit 130, never the stream's success; the key made up named, and the same input
    rerun under it stores each line once."""
    topic = f"cli.lines.{uuid.uuid4().hex[:8]}"
    publishing = piped(face_broker.url, topic, "--lines", "--close")
    try:
        write_until_stored(publishing, face_broker.url, topic, "1\n\n2\n", 2)
        publishing.send_signal(signal.SIGINT)
        out, err = publishing.communicate(timeout=30)
    finally:
        publishing.kill()
    assert publishing.returncode == 130, err
    assert out == "" and "Traceback" not in err, err
    assert "interrupted (Ctrl-C) at stdin line 3, 2 event(s) sent" in err, err
    key = re.search(r"send the same input again under --idempotency-key (bc-\S+)", err)
    assert key, err
    rerun = broker("publish", topic, "--lines", "--close", "--idempotency-key", key[1],
                   url=face_broker.url, stdin="1\n\n2\n3\n")  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert [e["data"] for e in history(face_broker.url, topic)] == [1, 2, 3, {}]


def test_ctrl_c_waiting_for_stdin_once_gone_on_in_parts_names_the_part_to_finish(
    face_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    """The stream's line records lapse after its events 1-2 (stdin's lines 1 and 3):
    the broker refuses the next line, and the client goes on with the lines after
    event 2 under ``K+2`` (as its write after the broker's close fails). Ctrl-C while
    it waits for stdin: exit 130, naming stdin's line 3 and ``K+2``; that rerun stores
    each line once. It said to send the same input again under K, which stored every
    line twice."""
    topic, key = f"cli.lines.{uuid.uuid4().hex[:8]}", f"parts-{uuid.uuid4().hex[:8]}"
    publishing = piped(face_broker.url, topic, "--lines", "--idempotency-key", key)
    try:
        written = go_on_in_parts(publishing, face_broker.url, redis_server, topic, key)
        publishing.send_signal(signal.SIGINT)
        out, err = publishing.communicate(timeout=30)
    finally:
        publishing.kill()
    assert publishing.returncode == 130, err
    assert out == "" and "Traceback" not in err, err
    assert f"after line 3 (tail -n +4) under --idempotency-key {key}+2" in err, err
    rest = broker("publish", topic, "--lines", "--idempotency-key", f"{key}+2",
                  url=face_broker.url, stdin="".join(f"{n}\n" for n in written))  # fmt: skip
    assert rest.returncode == 0, rest.stderr
    assert [e["data"] for e in history(face_broker.url, topic)] == [1, 2, *written]


def test_ctrl_c_while_retrying_once_gone_on_in_parts_names_the_part_to_finish(
    own_broker: BrokerProcess, redis_server: RedisServer
) -> None:
    """As above, but the Ctrl-C lands while the client resends its part to a broker
    gone (a retry's wait or its connect, not stdin's read): the same advice, exit 130.
    It said the same input again under K there too."""
    topic, key = f"cli.lines.{uuid.uuid4().hex[:8]}", f"parts-{uuid.uuid4().hex[:8]}"
    publishing = piped(own_broker.url, topic, "--lines", "--idempotency-key", key)
    said: list[str] = []
    reading = threading.Thread(target=lambda: said.extend(publishing.stderr or ()))
    reading.start()
    try:
        written = go_on_in_parts(publishing, own_broker.url, redis_server, topic, key)
        own_broker.close()
        written += write_until_retrying(publishing, said, written[-1] + 1)
        publishing.send_signal(signal.SIGINT)
        publishing.stdin.close()
        code = publishing.wait(timeout=30)
    finally:
        publishing.kill()
        reading.join(timeout=10)
        for pipe in (publishing.stdout, publishing.stderr):
            assert pipe is not None
            pipe.close()
    err = "".join(said)
    assert code == 130, err
    assert "Traceback" not in err, err
    assert f"after line 3 (tail -n +4) under --idempotency-key {key}+2" in err, err
    own_broker.start()
    rest = broker("publish", topic, "--lines", "--idempotency-key", f"{key}+2",
                  url=own_broker.url, stdin="".join(f"{n}\n" for n in written))  # fmt: skip
    assert rest.returncode == 0, rest.stderr
    assert [e["data"] for e in history(own_broker.url, topic)] == [1, 2, *written]


def write_until_retrying(
    publishing: subprocess.Popen[str], said: list[str], first: int
) -> list[int]:
    """Write a line at a time (from ``first``) until the client, its broker gone, retries
    its part (the first write after the broker's end may pass, the next one fails);
    the lines written."""
    assert publishing.stdin is not None
    written: list[int] = []
    for n in range(first, first + RETRY_WRITES):
        publishing.stdin.write(f"{n}\n")
        publishing.stdin.flush()
        written.append(n)
        try:
            wait_until(lambda: any("; attempt 2 in" in line for line in said), timeout=0.5,
                       what="the client retrying its part")  # fmt: skip
        except WaitTimeout:
            continue
        return written
    raise AssertionError(f"the client did not retry in {RETRY_WRITES} writes:\n{said}")


RETRY_WRITES = 10


def go_on_in_parts(
    publishing: subprocess.Popen[str], url: str, redis_server: RedisServer, topic: str, key: str
) -> list[int]:
    """stdin's lines 1-3 (``1``, blank, ``2``) stored under ``key``, its line records
    lapsed then, and lines written one at a time until the client went on after its
    event 2 under ``key+2``; the lines written since."""
    write_until_stored(publishing, url, topic, "1\n\n2\n", 2)
    with redis.Redis.from_url(redis_server.url) as admin:
        admin.zadd(c.line_times_key(topic), {key: 0})
    return write_until_gone_on(publishing, url, topic)


def write_until_gone_on(publishing: subprocess.Popen[str], url: str, topic: str) -> list[int]:
    """Write a line at a time until one is stored after the lapse: the client went on
    under ``K+2`` (its writes after the broker's lingering close failed). The lines
    written."""
    assert publishing.stdin is not None
    written: list[int] = []
    for n in range(3, 3 + GO_ON_WRITES):
        publishing.stdin.write(f"{n}\n")
        publishing.stdin.flush()
        written.append(n)
        try:
            wait_until(lambda: len(history(url, topic)) > 2, timeout=0.5, what="a line stored")
        except WaitTimeout:
            continue
        wait_until(
            lambda: len(history(url, topic)) == 2 + len(written), timeout=10, what="all sent"
        )
        return written
    raise AssertionError(f"no line stored after the lapse in {GO_ON_WRITES} writes")


GO_ON_WRITES = 40
"""Lines written at most, one each half second (the lingering close takes 2 s)."""
