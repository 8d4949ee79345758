"""The client's errors: one base class, a few subclasses carrying what a caller needs."""

from __future__ import annotations

from typing import Any


class BrokerClientError(Exception):
    """Anything the client could not do."""

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (and copied) with its members as they are. ``Exception`` rebuilds an
        error by calling its class with ``args`` (the message alone): a subclass whose
        ``__init__`` takes more (a status, a key) could not be unpickled, and an error
        raised in a worker process broke a ``ProcessPoolExecutor`` (and killed a
        ``multiprocessing.Pool``'s result thread: its caller waited for ever)."""
        return (_rebuilt, (type(self), self.args), self.__dict__)


def _rebuilt(cls: type[BaseException], args: tuple[Any, ...]) -> BaseException:
    """An error of ``cls`` with ``args``, its ``__init__`` not run: its members are set
    from the pickled state (``BrokerClientError.__reduce__``,
    ``StreamKeyboardInterrupt.__reduce__``)."""
    return cls.__new__(cls, *args)


class Unreachable(BrokerClientError):
    """The broker could not be reached (or kept answering 503) within the attempts allowed.

    ``idempotency_key``: a publish's key (the caller's, or the one made up for it): an
    attempt may have been stored, its answer lost, so a later retry must send it again,
    or it stores a second copy. A stream's retry sends the same lines again, from the
    first, under it (``lines_sent``: how many the iterator had given); but a stream the
    client went on with as a stream of its own (``after_line`` > 0: the broker said its
    lines up to that one were kept and the whole stream again would store them twice)
    sends the lines after ``after_line`` under it, as a stream of their own."""

    def __init__(
        self,
        message: str,
        *,
        idempotency_key: str | None = None,
        lines_sent: int | None = None,
        after_line: int = 0,
    ) -> None:
        super().__init__(message)
        self.idempotency_key = idempotency_key
        self.lines_sent = lines_sent
        self.after_line = after_line


class StreamInterrupted(BrokerClientError):
    """A streaming ingest's iterator raised, or gave an event that is not JSON: that
    error (the caller's) is its ``__cause__``.

    The lines it gave before (``lines_sent``) were sent, and each one that reached the
    broker is stored; the request was broken off, not ended, so the broker took it for
    no complete stream (a ``close`` was not done). ``idempotency_key`` is the key to
    resend under. ``after_line`` 0 (sent in one part): the stream's key (the caller's,
    or the one made up for it), under which a resend of the whole stream stores those
    lines no second time, and goes on with the rest. The same events first: a resend
    whose line n is not the one stored under the key (a model's new answer) is refused
    (``RequestFailed``, 400), nothing of it stored. ``after_line`` n > 0: the stream
    was gone on with after line n as a stream of its own (see ``Unreachable``), and
    the key is ``K+n``, not the caller's: a resend sends the events after line n under
    it (the whole stream again stores lines 1..n twice).

    A broker that had answered before the iterator raised (its answer read for up to
    ``publish_body.ANSWER_WAIT_S``) is heeded instead: a refusal is raised as it is (a
    closed topic: ``TopicClosed``; the caller's error its ``__cause__`` still), and lines
    kept with the rest to go as a stream of their own give this error with that
    ``after_line`` and key. Where no answer can be read (HTTP/2; a transport not
    httpx's own), the message says the broker may have refused the stream."""

    def __init__(
        self, message: str, *, idempotency_key: str, lines_sent: int, after_line: int = 0
    ) -> None:
        super().__init__(message)
        self.idempotency_key = idempotency_key
        self.lines_sent = lines_sent
        self.after_line = after_line


class StreamPartFailed(BrokerClientError):
    """A stream gone on in parts (``after_line`` > 0: see ``Unreachable``) that failed on
    an error not the broker's: the ``token`` callable raised, or httpx did with an error
    that is no transport's (that error is its ``__cause__``). Raised as it was, it told
    nothing of the parts, and a caller who resent the whole stream under its key stored
    lines 1..``after_line`` twice. Those lines are stored; ``idempotency_key`` is the
    key of the part under way (``K+after_line``), under which a resend sends the events
    after ``after_line`` (``lines_sent``: how many the iterator had given in all).
    Before any part went on so, such an error is raised as it is."""

    def __init__(
        self, message: str, *, idempotency_key: str, lines_sent: int, after_line: int
    ) -> None:
        super().__init__(message)
        self.idempotency_key = idempotency_key
        self.lines_sent = lines_sent
        self.after_line = after_line


class StreamKeyboardInterrupt(KeyboardInterrupt):
    """A Ctrl-C (a ``KeyboardInterrupt``, its ``__cause__``) wherever it landed during
    ``stream()``: reading the caller's iterator, sending, waiting for an answer or a
    retry. Still a ``KeyboardInterrupt`` (``except KeyboardInterrupt`` catches it), now
    saying where the stream stood, as ``StreamInterrupted`` does: ``idempotency_key``,
    the key to resend under (the caller's, or the one made up; ``K+n`` once it went on
    after line n as a stream of its own, ``after_line`` n, under which only the events
    after line n go: the whole stream again under K stores lines 1..n twice), and
    ``lines_sent``, the events its iterator had given. Raised as it was, it said
    neither, and a caller who resent the whole stream under K stored them twice."""

    def __init__(self, *, idempotency_key: str, lines_sent: int, after_line: int) -> None:
        which = "the same events, from the first,"
        if after_line:
            which = f"the events after the first {after_line}, as a stream of their own,"
        super().__init__(
            f"interrupted after {lines_sent} lines: resend {which} under idempotency key "
            f"{idempotency_key} to store each line once"
        )
        self.idempotency_key = idempotency_key
        self.lines_sent = lines_sent
        self.after_line = after_line

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (and copied) with its members and its advice, as ``BrokerClientError``
        is: rebuilt by ``KeyboardInterrupt``'s way, its ``__init__`` called with its
        message alone (it takes keywords only), it could not be unpickled, and one
        raised in a worker process (``ProcessPoolExecutor`` hands any ``BaseException``
        to its parent pickled) broke the pool."""
        return (_rebuilt, (type(self), self.args), self.__dict__)


class RequestFailed(BrokerClientError):
    """The broker answered with an error; ``problem`` is its problem+json body, if any.

    A stream's refusal carries the key of the request refused (``idempotency_key``;
    None for a refusal that is not a stream's). ``after_line`` > 0: the stream had gone
    on after that line as a stream of its own (see ``Unreachable``): its lines up to it
    were stored by its earlier requests, and the key is ``K+after_line``; a resend sends
    the events after ``after_line`` under it, never the whole stream under K (that
    stores those lines twice). The line numbers of the broker's detail count from the
    line after ``after_line``."""

    def __init__(
        self,
        status: int,
        problem: dict[str, Any] | None,
        message: str,
        *,
        idempotency_key: str | None = None,
        after_line: int = 0,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem or {}
        self.idempotency_key = idempotency_key
        self.after_line = after_line


class StreamStopped(RequestFailed):
    """A streaming ingest the broker ended part-way (its newest lines lost by a
    failover, or its line records lapsed), whose rest the client could not send exactly
    as a stream of its own; not retried: the whole stream again would store the lines
    kept twice.

    ``last_line_kept``: the stream's last line the broker kept (counted from the
    stream's first line, whatever part it was in), exactly when ``exact``; else at most
    that one (the broker could not tell which: which lines to send again is the
    caller's to find, reading the topic back). ``idempotency_key``: the key the stream
    was last sent under (``K+after_line``, when an earlier answer had it go on after
    ``after_line`` as a stream of its own)."""

    idempotency_key: str

    def __init__(
        self,
        status: int,
        problem: dict[str, Any] | None,
        message: str,
        *,
        last_line_kept: int,
        exact: bool,
        idempotency_key: str,
        after_line: int = 0,
    ) -> None:
        super().__init__(
            status, problem, message, idempotency_key=idempotency_key, after_line=after_line
        )
        self.last_line_kept = last_line_kept
        self.exact = exact


class TopicClosed(RequestFailed):
    """A publish to a topic that was closed (409)."""

    @property
    def end_id(self) -> str | None:
        """The id of the topic's ``broker.end`` (from the problem's ``end_id``)."""
        end_id = self.problem.get("end_id")
        return end_id if isinstance(end_id, str) else None


class TopicDeleted(RequestFailed):
    """A streaming ingest whose topic was deleted (``DELETE``) while it was writing to it
    (409 ``/problems#topic-deleted``): the lines it had stored went with the topic, and
    it is not to be resent, which would create the topic again."""
