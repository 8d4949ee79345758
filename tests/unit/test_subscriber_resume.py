"""The Python subscriber's reconnect schedule (``_Resume`` decides, on a fake clock), and its
time limit against a broker that accepts and never answers."""

from __future__ import annotations

import inspect
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import httpx
import pytest

from broker.framing import seconds_text
from brokerclient import resume as resume_module
from brokerclient import subscriber
from brokerclient.errors import Unreachable
from brokerclient.sse import Event, SseDecoder


def test_give_up_after_is_kept_not_overshot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each try takes 0.01 s and fails: the subscriber gives up once ``give_up_after`` has
    passed since the first try, not a whole backoff later (``broker tail
    --give-up-after 2`` gave up after about 3.8 s)."""
    now = [100.0]
    monkeypatch.setattr(resume_module.time, "monotonic", lambda: now[0])
    resume = resume_module._Resume(["t"], None, False, give_up_after=2.0)
    with pytest.raises(Unreachable):
        for _ in range(100):
            resume.attempting()
            now[0] += 0.01  # the try
            now[0] += resume.failed("down")
    assert now[0] - 100.0 <= 2.0 + 0.01 + 1e-9


def test_give_up_after_counts_the_first_try(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first connect that takes 10 s to time out is 10 s spent failing."""
    now = [100.0]
    monkeypatch.setattr(resume_module.time, "monotonic", lambda: now[0])
    resume = resume_module._Resume(["t"], None, False, give_up_after=5.0)
    resume.attempting()
    now[0] += 10.0  # the connect timed out
    with pytest.raises(Unreachable):
        resume.failed("connect timeout")


@contextmanager
def _silent_server() -> Iterator[str]:
    """A server that accepts connections and reads, and never answers: a hung broker."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with suppress(TimeoutError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for connection in held:
            connection.close()
        listener.close()


@pytest.mark.parametrize("topics", [["t"], ["t", "u"]], ids=["from-now-asks-the-topic", "stream"])
def test_give_up_after_is_a_time_limit_while_the_broker_never_answers(
    topics: list[str],
) -> None:
    """A broker that accepts and never answers is given up on after ``give_up_after``,
    not after the 60 s read timeout (it took the connect and read timeouts first)."""
    with _silent_server() as url:
        sub = subscriber.Subscriber(topics, url, read_timeout=60, give_up_after=0.5)
        started = time.monotonic()
        with pytest.raises(Unreachable):
            next(iter(sub))
        sub.close()
    assert time.monotonic() - started < 20


async def test_an_async_subscriber_gives_up_in_time_while_the_broker_never_answers() -> None:
    with _silent_server() as url:
        sub = subscriber.AsyncSubscriber(["t"], url, read_timeout=60, give_up_after=0.5)
        started = time.monotonic()
        with pytest.raises(Unreachable):
            await anext(aiter(sub))
        await sub.aclose()
    assert time.monotonic() - started < 20


def test_a_shortened_attempt_keeps_a_clients_own_longer_timeouts_otherwise() -> None:
    """Only a failing subscriber's attempts are shortened; a client passed in keeps its
    own timeouts (None: no limit) until then."""
    usual = httpx.Timeout(3.0, read=None)
    resume = resume_module._Resume(["t"], None, False, give_up_after=1.0)
    assert resume.attempt_timeout(usual) is usual
    resume.attempting()
    shortened = resume.attempt_timeout(usual)
    assert shortened.read is not None and 0 < shortened.read <= 1.0
    assert shortened.connect is not None and shortened.connect <= 1.0
    assert resume_module._Resume(["t"], None, False, None).attempt_timeout(usual) is usual


@contextmanager
def _quiet_stream_server(
    beats: int,
    head_after: float = 0.0,
    *,
    beat_every: float = 1.2,
    silence: float = 0.0,
    status_line: bytes = b"HTTP/1.1 200 OK",
) -> Iterator[tuple[str, list[int]]]:
    """A broker whose stream answers (after ``head_after`` seconds), then only beats
    every ``beat_every`` s ``beats`` times, then stays silent ``silence`` s before its
    one event: healthy, but quiet longer than ``give_up_after``. Yields its URL and the
    connections it took (a list of one count)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    taken = [0]
    stop = threading.Event()

    def serve(connection: socket.socket) -> None:
        with connection:
            connection.recv(65536)  # the request's head
            if stop.wait(head_after):
                return
            connection.sendall(status_line + b"\r\ncontent-type: text/event-stream\r\n\r\n")
            for _ in range(beats):
                if stop.wait(beat_every):
                    return
                connection.sendall(b": beat\n\n")
            if stop.wait(silence):
                return
            connection.sendall(b"id: a.1-0\ndata: 1\n\n")
            stop.wait(10)

    def accept() -> None:
        while not stop.is_set():
            with suppress(TimeoutError):
                connection = listener.accept()[0]
                taken[0] += 1
                threading.Thread(target=serve, args=(connection,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", taken
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK"])
def test_a_read_timeout_learnt_from_heartbeats_applies_to_the_stream_being_read(
    status_line: bytes,
) -> None:
    """Given 1 s, beats 0.6 s apart teach 1.8 s, which the stream being read waits, as
    over a proxy answering HTTP/1.0 (its network stream is this body's alone, as over
    HTTP/1.1): there it read on with the 1 s it began with, timed out in a silence of
    1.4 s, and reconnected (the timeout in force was given to HTTP/1.1 bodies only)."""
    server = _quiet_stream_server(beats=4, beat_every=0.6, silence=1.4, status_line=status_line)
    with server as (url, taken):
        sub = subscriber.Subscriber(["t"], url, last_event_id="a.0-1", read_timeout=1.0)
        event = next(iter(sub))
        sub.close()
    assert event.data == "1" and taken == [1]


def test_a_quiet_stream_is_no_failure_however_short_give_up_after_is() -> None:
    """Only the wait for the answer's head is cut to what is left of ``give_up_after``:
    a stream that answered reads on with the usual read timeout (cut too, a healthy
    stream quiet for longer was taken for a failure, reconnected, and given up on)."""
    with _quiet_stream_server(beats=3) as (url, taken):
        sub = subscriber.Subscriber(["t"], url, last_event_id="a.0-1", give_up_after=0.8)
        event = next(iter(sub))
        sub.close()
    assert event.data == "1" and taken == [1]


async def test_a_quiet_async_stream_is_no_failure_however_short_give_up_after_is() -> None:
    with _quiet_stream_server(beats=3) as (url, taken):
        sub = subscriber.AsyncSubscriber(["t"], url, last_event_id="a.0-1", give_up_after=0.8)
        event = await anext(aiter(sub))
        await sub.aclose()
    assert event.data == "1" and taken == [1]


@pytest.mark.parametrize("origin", ["0.0-0", "0.1795868389781-0"])
def test_a_topic_whose_log_began_meanwhile_did_not_move(origin: str) -> None:
    """Two topics with no log yet (``a~0.0-0!b~0.0-0``; the broker's origin carries its
    time, ``0.<ms>-0``), both published to while the subscriber was away: back, the
    first event (a's) comes with b's part at its new log's start (``b~<epoch>.0-0``).
    Two parts changed, so the event was given no topic (``broker tail`` printed
    ``"topic": null``, and an end went uncounted)."""
    resume = resume_module._Resume(["a", "b"], f"a~{origin}!b~{origin}", False, None)
    event = resume.delivered(Event("a~abcdefgh.5-0!b~ijklmnop.0-0", None, "1"))
    assert event.topic == "a"
    event = resume.delivered(Event("a~abcdefgh.5-0!b~ijklmnop.7-0", None, "2"))
    assert event.topic == "b"


def test_a_beat_event_is_no_event_and_moves_no_cursor() -> None:
    """A ``broker.beat`` (the heartbeat of a stream that asked ``?heartbeat=event``, as
    /client.js does) is not handed over as an event, and leaves the cursor where the
    events left it: it has no id."""
    resume = resume_module._Resume(["t"], "abcdefgh.1-0", False, None)
    chunk = [
        Event(None, "broker.beat", "1"),
        Event("abcdefgh.2-0", None, "2"),
        Event(None, "broker.beat", "1"),
    ]
    assert [event.data for event in resume.received(chunk)] == ["2"]
    assert resume.last_event_id == "abcdefgh.2-0"


def test_closing_a_subscriber_ends_a_read_blocked_in_another_thread() -> None:
    """``close()`` while another thread waits in a read of a quiet stream: the read went
    on until the next heartbeat came (15 s by default) or its timeout; the async
    subscriber's ends at once. The connection is shut, and the read ends now."""
    with _quiet_stream_server(beats=0) as (url, _):
        sub = subscriber.Subscriber(["t"], url, last_event_id="a.0-1")
        got: list[Event] = []
        failed: list[BaseException] = []

        def iterate() -> None:
            try:
                got.extend(sub)
            except BaseException as error:  # (what the thread raised, for the assertion)
                failed.append(error)

        reading = threading.Thread(target=iterate)
        reading.start()
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(got) == 1, "the stream's one event"
        sub.close()  # the server says nothing more for 10 s
        reading.join(timeout=5)
        assert not reading.is_alive() and failed == []


def test_closing_a_subscriber_before_its_streams_head_ends_it_when_the_head_comes() -> None:
    """``close()`` while another thread waits for the stream's head (a broker holds it
    during a Redis outage), on a client the caller passed (not closed by ``close``):
    the stream was read on once the head came, events delivered after the close."""
    with (
        _quiet_stream_server(beats=0, head_after=3.0) as (url, _),
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        sub = subscriber.Subscriber(["t"], url, last_event_id="a.0-1", client=client)
        got: list[Event] = []
        reading = threading.Thread(target=lambda: got.extend(sub))
        reading.start()
        time.sleep(0.2)  # (the request is sent, its head not come: the server holds it 3 s)
        sub.close()
        reading.join(timeout=5)
        assert not reading.is_alive() and got == []


def test_the_first_event_of_a_stream_names_its_topic_beside_an_origin_with_a_time() -> None:
    """A multi-topic stream's first event (no cursor before it), one topic with no log:
    its part is the origin, which now carries the broker's time (``0.<ms>-<n>``); taken
    for a place that moved, the event was given no topic (and an end, uncounted)."""
    resume = resume_module._Resume(["a", "b"], None, True, None)
    event = resume.delivered(Event("a~abcdefgh.5-0!b~0.1795868389781-2", None, "1"))
    assert event.topic == "a"


def test_a_thousand_failures_in_a_row_still_wait_not_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """The doubling was a float power: past 1024 failures in a row (34 minutes of a Redis
    outage at the broker's retry: 2000) it raised OverflowError, and the subscriber and
    ``broker tail`` died with a traceback."""
    now = [100.0]
    monkeypatch.setattr(resume_module.time, "monotonic", lambda: now[0])
    resume = resume_module._Resume(["t"], None, False, give_up_after=None)
    for _ in range(2000):
        delay = resume.failed("down")
        assert 0 < delay <= resume_module.MAX_DELAY
        now[0] += delay
    assert resume.failures == 2000


def _hinted(retry_ms: int) -> resume_module._Resume:
    resume = resume_module._Resume(["t"], None, False, give_up_after=None)
    decoder = SseDecoder()
    decoder.feed(f"retry: {retry_ms}\n\n".encode())
    resume.read(decoder)
    return resume


@pytest.mark.parametrize("retry_ms", [0, 1, 100])
def test_a_tiny_retry_hint_backs_off_from_a_floor(retry_ms: int) -> None:
    """``retry:`` is an event's publisher's to choose: ``retry: 1`` replaced the backoff,
    and a client that could not connect tried a thousand times a second; ``retry: 0``
    was taken for no hint at all."""
    resume = _hinted(retry_ms)
    assert resume.retry_hint_ms == retry_ms
    delays = [resume.failed("down") for _ in range(8)]
    assert delays[0] == resume_module.MIN_DELAY
    assert delays[:4] == [resume_module.MIN_DELAY * 2**n for n in range(4)]
    assert delays[-1] == resume_module.MAX_DELAY


def test_the_first_retry_waits_what_the_hint_says() -> None:
    """As EventSource does; the next ones twice as long each, up to the cap."""
    resume = _hinted(2000)
    assert [resume.failed("down") for _ in range(3)] == [2.0, 4.0, resume_module.MAX_DELAY]


def _read_timed_out(resume: resume_module._Resume) -> None:
    """A stream that answered, then sent nothing for its read timeout."""
    resume.connected()
    resume.broke(httpx.ReadTimeout("nothing read"))


def test_streams_that_time_out_reading_are_read_longer_up_to_a_bound() -> None:
    """Each stream read twice as long as the one before it timed out, up to 8 times the
    given read timeout; a head that never came (no stream answered) changes nothing."""
    resume = resume_module._Resume(["t"], None, False, None, read_timeout_asked=2.0)
    resume.broke(httpx.ReadTimeout("no answer's head"))
    assert resume.read_timeout == 2.0
    seen = []
    for _ in range(6):
        _read_timed_out(resume)
        seen.append(resume.read_timeout)
    assert seen == [4.0, 8.0, 16.0, 16.0, 16.0, 16.0]


def test_no_read_timeout_stays_none() -> None:
    resume = resume_module._Resume(["t"], None, False, None, read_timeout_asked=None)
    _read_timed_out(resume)
    assert resume.read_timeout is None


def test_heartbeats_set_the_read_timeout_to_three_of_theirs_never_under_the_given() -> None:
    """Doubled by streams that timed out (connections that died, as a phone's do), the
    read timeout stayed grown: each later dead connection was noticed up to 8 times
    later. Heartbeats tell the broker's interval: the longest between two on a stream;
    a shorter read timeout is taken once they have come for as long as the one in
    force, a longer one at once."""
    resume = resume_module._Resume(["t"], None, False, None, read_timeout_asked=2.0)
    _read_timed_out(resume)
    _read_timed_out(resume)
    assert resume.read_timeout == 8.0
    resume.connected()
    resume.heard(100.0)
    assert resume.read_timeout == 8.0  # one heartbeat tells nothing
    for n in range(1, 16):
        resume.heard(100.0 + n * 0.5)
        assert resume.read_timeout == 8.0  # heard for under 8 s: maybe a burst
    resume.heard(108.0)
    assert resume.read_timeout == 2.0  # 3 x 0.5 s is under the given 2 s
    resume.connected()  # a broker with a longer heartbeat: read for three of them
    resume.heard(200.0)
    resume.heard(203.0)
    assert resume.read_timeout == 9.0
    resume.heard(205.0)  # the longest interval counts (a beat may come early)
    assert resume.read_timeout == 9.0
    resume.connected()
    resume.heard(300.0)
    resume.heard(400.0)
    assert resume.read_timeout == 16.0  # never over 8 times the given one


def test_heartbeats_close_together_do_not_shorten_a_learnt_read_timeout() -> None:
    """Heartbeats 3 s apart set 9 s; then a burst (an outage's heartbeats let through at
    once, or the broker's, one per backoff step from 0.05 s while its store is down):
    taken for the interval, it set the read timeout back to the given 2 s, under the
    broker's own pace, and the stream timed out on its next heartbeat."""
    resume = resume_module._Resume(["t"], None, False, None, read_timeout_asked=2.0)
    resume.connected()
    resume.heard(100.0)
    resume.heard(103.0)
    assert resume.read_timeout == 9.0
    now = 103.0
    for step in (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0):
        now += step
        resume.heard(now)
        assert resume.read_timeout == 9.0


def test_a_heartbeat_the_broker_says_sets_the_read_timeout_and_nothing_grows_it() -> None:
    """Two of the said interval and the margin, over the default read timeout (45 s
    against a 1 s heartbeat saw a dead connection 15 times later); a stream that times
    out then died (the timeout is not doubled), and heartbeats teach nothing more."""
    resume = resume_module._Resume(["t"], None, False, None)
    resume.connected(heartbeat_s=1.0)
    said = resume_module.SILENT_HEARTBEATS * 1.0 + resume_module.SILENCE_MARGIN_S
    assert resume.read_timeout == said == 3.0
    resume.heard(100.0)
    resume.heard(100.9)
    assert resume.read_timeout == said
    resume.broke(httpx.ReadTimeout("nothing read"))
    assert resume.read_timeout == said
    resume.connected(heartbeat_s=60.0)  # (an instance whose heartbeat is longer)
    assert resume.read_timeout == 121.0


def test_a_stream_that_does_not_say_its_heartbeat_is_read_with_the_guess_as_it_was() -> None:
    """An older broker behind the same name (a fleet being upgraded): its streams are
    read with the read timeout guessed before (grown by a stream that timed out here),
    not with the one a newer broker said."""
    resume = resume_module._Resume(["t"], None, False, None, read_timeout_asked=2.0)
    _read_timed_out(resume)
    assert resume.read_timeout == 4.0
    resume.connected(heartbeat_s=1.0)
    assert resume.read_timeout == 3.0
    resume.connected()
    assert resume.read_timeout == 4.0
    _read_timed_out(resume)
    assert resume.read_timeout == 8.0


def test_no_read_timeout_stays_none_whatever_the_broker_says() -> None:
    resume = resume_module._Resume(["t"], None, False, None, read_timeout_asked=None)
    resume.connected(heartbeat_s=1.0)
    assert resume.read_timeout is None


def test_a_read_timeout_given_longer_than_the_heartbeat_said_is_kept() -> None:
    """Given 60 s on purpose (a proxy that holds heartbeats back): a broker saying 15 s
    cut it to 31 s, and every stream behind the proxy reconnected every 31 s for good;
    the given one is the least a stream is read for, the next streams' too."""
    resume = resume_module._Resume(["t"], None, False, None, read_timeout_asked=60.0)
    resume.connected(heartbeat_s=15.0)
    assert resume.read_timeout == 60.0
    resume.heard(100.0)
    resume.heard(115.0)
    resume.broke(httpx.ReadTimeout("nothing read"))  # (a dead connection: not grown)
    resume.connected(heartbeat_s=15.0)
    assert resume.read_timeout == 60.0


def test_a_read_timeout_given_shorter_than_the_heartbeat_said_gives_way_to_it() -> None:
    """Given 45 s (the default's number, but given) against a 60 s heartbeat: a live
    stream is never cut for being quieter than its broker's pace."""
    resume = resume_module._Resume(["t"], None, False, None, read_timeout_asked=45.0)
    resume.connected(heartbeat_s=60.0)
    assert resume.read_timeout == 121.0
    resume.connected(heartbeat_s=1.0)
    assert resume.read_timeout == 45.0  # (shorter said: the given one is the floor)


def test_the_default_read_timeout_follows_the_heartbeat_said_both_ways() -> None:
    """Not given: the broker's heartbeat decides alone, under the default or over it;
    and an older broker's streams are read with the default, as before."""
    resume = resume_module._Resume(["t"], None, False, None)
    assert resume.read_timeout == resume_module.GUESSED_READ_TIMEOUT_S == 45.0
    resume.connected(heartbeat_s=1.0)
    assert resume.read_timeout == 3.0
    resume.connected(heartbeat_s=30.0)
    assert resume.read_timeout == 61.0
    resume.connected()
    assert resume.read_timeout == 45.0


@pytest.mark.parametrize("given", [60.0, 45.0, 2.0, None])
def test_a_subscriber_tells_a_read_timeout_given_from_the_default(given: float | None) -> None:
    """The same number as the default, given, is given: only leaving it out (or passing
    ``DEFAULT_READ_TIMEOUT`` itself, as ``broker tail`` does without ``--read-timeout``)
    lets the heartbeat read for less."""
    with subscriber.Subscriber("t", read_timeout=given) as chosen:
        assert chosen._resume.read_timeout_given and chosen._resume.read_timeout == given
    with subscriber.Subscriber("t") as default:
        assert not default._resume.read_timeout_given
    with subscriber.Subscriber("t", read_timeout=subscriber.DEFAULT_READ_TIMEOUT) as same:
        assert not same._resume.read_timeout_given


def test_the_default_read_timeout_is_no_number_a_caller_could_pass_by_chance() -> None:
    """It was a float subclass worth 45: arithmetic on it (``DEFAULT_READ_TIMEOUT * 2``)
    gave a plain float, a timeout given; the signature said ``float``. It is a sentinel
    now, which the signature names, and the 45 s an older broker is read for apart."""
    assert not isinstance(subscriber.DEFAULT_READ_TIMEOUT, (int, float))
    assert repr(subscriber.DEFAULT_READ_TIMEOUT) == "DEFAULT_READ_TIMEOUT"
    parameter = inspect.signature(subscriber.Subscriber).parameters["read_timeout"]
    assert parameter.default is subscriber.DEFAULT_READ_TIMEOUT
    assert "ReadTimeout" in str(parameter.annotation)


@pytest.mark.parametrize("given", [60.0, 2.0, None])
def test_a_read_timeout_given_beside_a_client_passed_in_is_the_one_taken(
    given: float | None,
) -> None:
    """A client passed in: its own read timeout counts as given (a floor under the
    heartbeat), but a ``read_timeout`` given beside it was dropped for the client's (5 s,
    httpx's default, read as a floor). The one given wins now."""
    with httpx.Client(timeout=5.0) as client:
        with subscriber.Subscriber("t", read_timeout=given, client=client) as chosen:
            assert chosen._resume.read_timeout_given and chosen._resume.read_timeout == given
        with subscriber.Subscriber("t", client=client) as the_clients:
            assert the_clients._resume.read_timeout_given
            assert the_clients._resume.read_timeout == 5.0


async def test_an_async_subscriber_takes_a_read_timeout_given_beside_its_client_too() -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None)) as client:
        async with subscriber.AsyncSubscriber("t", read_timeout=60.0, client=client) as chosen:
            assert chosen._resume.read_timeout == 60.0
        async with subscriber.AsyncSubscriber("t", client=client) as the_clients:
            assert the_clients._resume.read_timeout is None  # (the client's: never)


@pytest.mark.parametrize(
    ("said", "seconds"),
    [("15", 15.0), ("0.5", 0.5), (" 2 ", 2.0), (None, None), ("", None), ("0", None),
     ("-1", None), ("nan", None), ("inf", None), ("15, 15", None), ("soon", None)],
)  # fmt: skip
def test_the_heartbeat_header_is_taken_only_as_a_positive_number_of_seconds(
    said: str | None, seconds: float | None
) -> None:
    """A value that is no interval (a proxy's doubled header, a broken one) is no heartbeat
    said: the read timeout is guessed, as for an older broker."""
    assert resume_module.heartbeat_of(said) == seconds


@pytest.mark.parametrize("seconds", [15.0, 1.0, 0.5, 0.1, 2.25, 3600.0, 1e-05, 86400.0])
def test_the_heartbeat_the_broker_says_is_the_one_the_subscriber_reads(seconds: float) -> None:
    """A plain decimal, no exponent (``1e-05`` is no number to every parser)."""
    said = seconds_text(seconds).decode("ascii")
    assert re.fullmatch(r"[0-9]+(\.[0-9]+)?", said), said
    assert resume_module.heartbeat_of(said) == seconds


class _NetworkStream:
    """httpcore's network stream as the subscriber sees it: ``read(max_bytes, timeout)``."""

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self.timeouts.append(timeout)
        return b""


def _answered(stream: _NetworkStream, http_version: bytes) -> httpx.Response:
    request = httpx.Request("GET", "http://broker.test/topics/t/events")
    request.extensions["timeout"] = {"read": 1.0}
    extensions = {"network_stream": stream, "http_version": http_version}
    return httpx.Response(200, request=request, extensions=extensions)


def test_a_body_over_http_1_is_read_with_the_timeout_in_force_then_its_stream_left_as_it_was() -> (
    None
):
    stream = _NetworkStream()
    resume = resume_module._Resume(["t"], None, False, give_up_after=1.0, read_timeout_asked=2.0)
    with subscriber._read_as_usual(_answered(stream, b"HTTP/1.1"), resume):
        stream.read(10, 1.0)
        resume.read_timeout = 7.0  # (learnt from heartbeats while the body is read)
        stream.read(10, 1.0)
    stream.read(10, 1.0)  # (the connection serving another request: its own timeout)
    assert stream.timeouts == [2.0, 7.0, 1.0]
    assert "read" not in vars(stream)


def test_a_body_over_http_2_leaves_the_connection_s_reads_alone() -> None:
    """Over HTTP/2 the network stream is the connection's, read for all its streams."""
    stream = _NetworkStream()
    resume = resume_module._Resume(["t"], None, False, give_up_after=1.0, read_timeout_asked=2.0)
    with subscriber._read_as_usual(_answered(stream, b"HTTP/2"), resume):
        stream.read(10, 1.0)
    assert stream.timeouts == [1.0]
    assert "read" not in vars(stream)
