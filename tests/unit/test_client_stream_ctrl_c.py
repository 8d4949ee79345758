"""A Ctrl-C (``KeyboardInterrupt``) wherever it lands in ``stream()``: raised as
``StreamKeyboardInterrupt``, saying the key and the part a resend must send (``K+n``
once the stream went on after line n). Landing points a real SIGINT hits only by
chance (a send, a retry's wait) are raised here where chosen (the real broker's and a
real SIGINT's are in tests/face/test_cli_lines.py)."""

from __future__ import annotations

import argparse
import asyncio
import copy
import io
import json
import pickle
import sys
from collections.abc import Callable, Iterator

import httpx
import pytest

from brokerclient import (
    AsyncPublisher,
    Publisher,
    RetryPolicy,
    StreamKeyboardInterrupt,
    cli,
    cli_lines,
    event,
)
from brokerclient import publisher as publisher_module
from brokerclient.cli import add_client_commands
from brokerclient.cli_lines import StdinLines, _ctrl_c
from tests.unit.test_client_stream_parts import records_lapsed

QUICK = RetryPolicy(attempts=3, backoff=0.0)
Step = Callable[[int], None]
"""What the broker made up here does after reading each line of a request (its count)."""


class Broker(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """A transport that reads ``reads[i]`` lines of request i (``step`` after each), then
    answers it with ``answers[i]`` (the rest of its body unread, as a broker answering
    early: not ``httpx.MockTransport``, which reads the body whole first); records each
    request's key and the lines it read."""

    def __init__(self, reads: list[int], answers: list[httpx.Response], step: Step) -> None:
        self._reads, self._answers, self._step = reads, answers, step
        self.requests: list[tuple[str, list[int]]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        read: list[int] = []
        self.requests.append((request.headers["idempotency-key"], read))
        chunks = iter(request.stream)  # type: ignore[arg-type]
        for _ in range(self._reads.pop(0)):
            read.append(json.loads(next(chunks))["data"])
            self._step(len(read))
        return self._answers.pop(0)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        read: list[int] = []
        self.requests.append((request.headers["idempotency-key"], read))
        chunks = aiter(request.stream)  # type: ignore[arg-type]
        for _ in range(self._reads.pop(0)):
            read.append(json.loads(await anext(chunks))["data"])
            self._step(len(read))
        return self._answers.pop(0)


def lapsed_after_2() -> httpx.Response:
    return records_lapsed(2, "e.1-0")([])


def nothing(_: int) -> None:
    pass


def events_then_ctrl_c(count: int) -> Iterator[dict[str, object]]:
    """Events 1..count, then Ctrl-C while the next is awaited (stdin's read)."""
    for n in range(1, count + 1):
        yield event(n)
    raise KeyboardInterrupt


def streamed(broker: Broker, events: Iterator[dict[str, object]]) -> None:
    with (
        httpx.Client(base_url="http://b.test", transport=broker) as client,
        Publisher(client=client, retry=QUICK) as publisher,
    ):
        publisher.stream("t", events, idempotency_key="K")


def raised(run: Callable[[], object]) -> StreamKeyboardInterrupt:
    """What ``run`` raised: a ``StreamKeyboardInterrupt`` from the Ctrl-C (caught as any
    ``KeyboardInterrupt``: a plain one, as it was, fails the test, not the run)."""
    with pytest.raises(KeyboardInterrupt) as caught:
        run()
    assert isinstance(caught.value, StreamKeyboardInterrupt), repr(caught.value)
    assert type(caught.value.__cause__) is KeyboardInterrupt
    return caught.value


def test_ctrl_c_in_the_iterator_before_any_part_names_the_callers_key() -> None:
    broker = Broker([5], [], nothing)
    stopped = raised(lambda: streamed(broker, events_then_ctrl_c(2)))
    assert (stopped.idempotency_key, stopped.after_line, stopped.lines_sent) == ("K", 0, 2)
    assert "the same events, from the first, under idempotency key K" in str(stopped)


def test_ctrl_c_in_the_iterator_once_gone_on_names_the_part_under_way() -> None:
    """Lines 1-2 kept (records lapsed after line 3 was read), the rest under K+2; Ctrl-C
    at the iterator's line 5. It went through as a plain KeyboardInterrupt, saying
    nothing of K+2: a rerun of the whole stream under K stored lines 1-2 twice."""
    broker = Broker([3, 9], [lapsed_after_2()], nothing)
    stopped = raised(lambda: streamed(broker, events_then_ctrl_c(4)))
    assert broker.requests == [("K", [1, 2, 3]), ("K+2", [3, 4])]
    assert (stopped.idempotency_key, stopped.after_line, stopped.lines_sent) == ("K+2", 2, 4)
    assert "the events after the first 2, as a stream of their own," in str(stopped)


def test_ctrl_c_while_sending_once_gone_on_names_the_part_under_way() -> None:
    """Ctrl-C inside the transport, its part's second line just sent (httpx's send)."""

    def ctrl_c_at_the_parts_2nd(read: int) -> None:
        if len(broker.requests) == 2 and read == 2:
            raise KeyboardInterrupt

    broker = Broker([3, 9], [lapsed_after_2()], ctrl_c_at_the_parts_2nd)
    stopped = raised(lambda: streamed(broker, (event(n) for n in range(1, 9))))
    assert broker.requests == [("K", [1, 2, 3]), ("K+2", [3, 4])]
    assert (stopped.idempotency_key, stopped.after_line) == ("K+2", 2)


def test_ctrl_c_in_a_wait_between_attempts_once_gone_on_names_the_part_under_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C in the wait before the part's first request (the publisher's sleep)."""

    def ctrl_c(_: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(publisher_module.time, "sleep", ctrl_c)
    broker = Broker([3], [lapsed_after_2()], nothing)
    stopped = raised(lambda: streamed(broker, (event(n) for n in range(1, 9))))
    assert broker.requests == [("K", [1, 2, 3])]
    assert (stopped.idempotency_key, stopped.after_line) == ("K+2", 2)


def test_ctrl_c_in_an_async_stream_once_gone_on_names_the_part_under_way() -> None:
    broker = Broker([3, 9], [lapsed_after_2()], nothing)

    async def stream() -> None:
        async with (
            httpx.AsyncClient(base_url="http://b.test", transport=broker) as client,
            AsyncPublisher(client=client, retry=QUICK) as publisher,
        ):
            await publisher.stream("t", events_then_ctrl_c(4), idempotency_key="K")

    stopped = raised(lambda: asyncio.run(stream()))
    assert broker.requests == [("K", [1, 2, 3]), ("K+2", [3, 4])]
    assert (stopped.idempotency_key, stopped.after_line) == ("K+2", 2)


def test_ctrl_c_in_a_publish_goes_through_as_it_is() -> None:
    def ctrl_c(_: httpx.Request) -> httpx.Response:
        raise KeyboardInterrupt

    transport = httpx.MockTransport(ctrl_c)
    with (
        httpx.Client(base_url="http://b.test", transport=transport) as client,
        Publisher(client=client) as publisher,
        pytest.raises(KeyboardInterrupt) as caught,
    ):
        publisher.publish("t", 1)
    assert type(caught.value) is KeyboardInterrupt


def test_the_cli_names_stdins_line_and_the_part_under_way(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Exit 130; stdin's lines after event 2's (line 3, a blank one counted) under K+2."""
    lines = StdinLines(io.BytesIO(b"1\n\n2\n3\n"), text=False, event=None)
    list(lines)
    stopped = StreamKeyboardInterrupt(idempotency_key="K+2", lines_sent=3, after_line=2)
    assert _ctrl_c(stopped, lines) == 130
    said = capsys.readouterr().err
    assert "interrupted (Ctrl-C) at stdin line 4, 3 event(s) sent" in said, said
    assert "after line 3 (tail -n +4) under --idempotency-key K+2" in said, said


def stored_whole(request: httpx.Request) -> httpx.Response:
    """A broker storing the stream whole (and closing the topic: ``?close=true``)."""
    lines = [json.loads(line) for line in request.read().splitlines() if line.strip()]
    ids = [f"e.{n}-0" for n in range(1, len(lines) + 1)]
    closed = {"end_id": "e.9-0"} if request.url.params.get("close") == "true" else {}
    return httpx.Response(201, json={"ids": ids} | closed)


def ctrl_c(*_: object) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("landing", ["closing the publisher", "printing the answer"])
def test_the_cli_says_a_ctrl_c_once_the_stream_was_done_found_it_done(
    landing: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C after ``stream()`` returned (every line stored, the topic closed): exit
    130 saying so, with the answer, nothing to send again. It exited 130 saying
    nothing at all: whether to rerun, a user could not tell."""
    transport = httpx.MockTransport(stored_whole)

    class Stored(Publisher):
        def __init__(self, url: str, **options: object) -> None:
            super().__init__(client=httpx.Client(base_url=url, transport=transport))

    monkeypatch.setattr(publisher_module, "Publisher", Stored)
    if landing == "closing the publisher":
        monkeypatch.setattr(Stored, "close", ctrl_c)
    else:
        monkeypatch.setattr(cli_lines, "_emit", ctrl_c)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"1\n2\n")))
    monkeypatch.setattr(cli, "_log_to_stderr", lambda: None)  # (the logger is the suite's)
    parser = argparse.ArgumentParser()
    add_client_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["publish", "t", "--lines", "--close", "--url", "http://b.test"])
    assert args.run_client(args) == 130
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        "interrupted (Ctrl-C) once the stream was done: every line was stored and the topic "
        'closed ({"count":2,"first_id":"e.1-0","last_id":"e.2-0","end_id":"e.9-0"}); '
        "nothing needs sending again"
    ) in err, err
    assert "to finish it" not in err


def test_the_interrupt_is_pickled_and_copied_with_its_advice() -> None:
    """As ``BrokerClientError`` is (tests/face/test_client_errors_travel.py): it could
    not be unpickled nor copied (``__init__`` called with its message alone), and one
    raised in a worker process broke its ``ProcessPoolExecutor``."""
    broker = Broker([3, 9], [lapsed_after_2()], nothing)
    stopped = raised(lambda: streamed(broker, events_then_ctrl_c(4)))
    for travelled in (pickle.loads(pickle.dumps(stopped)), copy.copy(stopped)):
        assert type(travelled) is StreamKeyboardInterrupt
        assert (travelled.args, vars(travelled)) == (stopped.args, vars(stopped))
        assert (travelled.idempotency_key, travelled.after_line, travelled.lines_sent) == (
            "K+2", 2, 4,
        )  # fmt: skip
        assert "the events after the first 2, as a stream of their own," in str(travelled)


@pytest.mark.parametrize("landing", ["sending", "printing the answer"])
def test_the_cli_says_a_ctrl_c_in_a_single_publish_and_the_key_to_rerun_under(
    landing: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``broker publish t DATA``: a Ctrl-C exits 130, saying whether the event was
    stored. Under way, it may have been: the key it was sent under, to rerun with (a
    rerun without it stores the event twice). Answered: stored, with the answer. It
    exited 130 saying nothing."""
    keys: list[str | None] = []

    def stored_one(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers.get("Idempotency-Key"))
        if landing == "sending":  # (the request sent, its answer never read)
            raise KeyboardInterrupt
        return httpx.Response(201, json={"ids": ["e.1-0"]})

    transport = httpx.MockTransport(stored_one)

    class Stored(Publisher):
        def __init__(self, url: str, **options: object) -> None:
            super().__init__(client=httpx.Client(base_url=url, transport=transport))

    monkeypatch.setattr(publisher_module, "Publisher", Stored)
    if landing == "printing the answer":
        monkeypatch.setattr(cli, "_emit", ctrl_c)
    monkeypatch.setattr(cli, "_log_to_stderr", lambda: None)  # (the logger is the suite's)
    parser = argparse.ArgumentParser()
    add_client_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["publish", "t", "1", "--url", "http://b.test"])
    assert args.run_client(args) == 130
    out, err = capsys.readouterr()
    assert out == ""
    [key] = keys
    if landing == "sending":
        assert f"may have been stored; rerun with --idempotency-key {key} to store it once" in err
    else:
        assert 'once the event was stored ({"id":"e.1-0"}); nothing needs sending again' in err
