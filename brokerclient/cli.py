"""The command-line client: ``broker publish``, ``broker tail``, ``broker topics``.

Data goes to stdout (JSON, one object per line), progress and errors to stderr.
Exit codes, for scripts:

- 0: done (``tail``: the topic was closed, or it was interrupted by Ctrl-C: 130);
- 1: the broker refused or failed (a 4xx or 500 answer, a closed topic, an answer
  that is not the broker's);
- 2: bad usage (unknown flag, DATA or a ``--lines`` line that is not JSON without ``--text``);
- 3: the broker could not be reached (or kept answering 503) in the time allowed.

``--url`` defaults to ``BROKER_URL`` (else http://127.0.0.1:8000), ``--token`` to
``BROKER_TOKEN``, ``--token-file`` to ``BROKER_TOKEN_FILE`` (a file read again at each
connection: a token that something outside renews, a mounted secret). The commands
are registered on ``broker``'s parser by ``api.cli`` (see ``add_client_commands``);
nothing here imports ``api``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from brokerclient.http import PublishResult, Token

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEFAULT_GIVE_UP_SECONDS = 60.0
MAX_TOPIC_PAGES = 100_000
Command = Callable[[argparse.Namespace], int]
log = logging.getLogger("brokerclient.cli")


class UsageError(Exception):
    """What the user typed cannot be run (exit 2)."""


def add_client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``publish``, ``tail`` and ``topics``; each sets ``args.run_client``."""
    common = argparse.ArgumentParser(add_help=False)
    url_help = f"the broker's URL (BROKER_URL, default {_default_url()})"
    common.add_argument("--url", default=None, help=url_help)
    common.add_argument(
        "--token", default=None, help="a JWT, sent as a Bearer token (BROKER_TOKEN)"
    )
    common.add_argument(
        "--token-file",
        default=None,
        help="a file holding the JWT, read again at each connection: a new token written "
        "there is used from the next one on (`tail` reconnecting past a token's expiry; "
        "BROKER_TOKEN_FILE)",
    )
    _publish_parser(commands, common)
    _tail_parser(commands, common)
    topics = commands.add_parser("topics", parents=[common], help="list topics (JSON lines)")
    topics.add_argument("--prefix", default="", help="only topics whose name starts with this")
    topics.set_defaults(run_client=_guarded(run_topics))


def _publish_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    publish = commands.add_parser(
        "publish", parents=[common],
        help="publish one event (DATA, else stdin), or one a line of stdin (--lines)",
        description="Publish DATA (JSON unless --text) to TOPIC; without DATA, read it from "
        "stdin; with --lines, stream stdin, one event a line. Prints the broker's answer "
        "({\"id\": ...}) on stdout.",
    )  # fmt: skip
    publish.add_argument("topic")
    publish.add_argument("data", nargs="?", help="the event's data (default: stdin)")
    publish.add_argument("--event", help="the event type")
    publish.add_argument("--text", action="store_true", help="publish DATA as text, not JSON")
    publish.add_argument("--idempotency-key", help="a key that makes a repeat store nothing")
    publish.add_argument("--close", action="store_true", help="close the topic after this event")
    publish.add_argument(
        "--lines", action="store_true",
        help="stream stdin, one event a line, each sent as it is read (a streaming ingest): "
        "a line is the event's data, a JSON value as DATA is (a blank one skipped, as the "
        "ingest skips it), or with --text the line less its LF/CRLF, sent as a JSON string "
        "(the ingest stores JSON; a blank one an empty string: a text's own line); --close "
        "closes the topic at stdin's end. Prints {\"count\", \"first_id\", \"last_id\"}; a "
        "failure names the --idempotency-key (made up if not given) to rerun it under",
    )  # fmt: skip
    publish.add_argument(
        "--keepalive", type=_keepalive_seconds, metavar="SECONDS",
        help="with --lines: while stdin is silent this long, a space (the next line's "
        "start) keeps the stream open, which the broker stops after its "
        "BROKER_BODY_TIMEOUT_SECONDS (30 s) without a read (default 10; 0: off)",
    )  # fmt: skip
    publish.set_defaults(run_client=_guarded(run_publish))


def _tail_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    tail = commands.add_parser(
        "tail", parents=[common], help="print a topic's events as JSON lines, live",
        description="Print events as JSON lines ({\"id\", \"event\", \"data\", \"topic\"}; "
        "data is the raw text), resuming across drops; stops when the topic is closed.",
    )  # fmt: skip
    tail.add_argument("topics", nargs="+", metavar="TOPIC")
    start = tail.add_mutually_exclusive_group()
    start.add_argument("--from", dest="start", choices=["earliest"], help="start from the oldest")
    start.add_argument("--last-event-id", help="resume after this id")
    give_up = "seconds without a connection before exiting 3 (default %(default)s)"
    tail.add_argument("--give-up-after", type=float, default=DEFAULT_GIVE_UP_SECONDS, help=give_up)
    quiet = "seconds a stream may send nothing before it is reconnected: a broker that "
    quiet += "says its heartbeat: two of its heartbeats and a second, or this if longer (a "
    quiet += "proxy that holds heartbeats back); one that does not (an older one): more than "
    quiet += "its BROKER_HEARTBEAT_SECONDS (default 45; doubled by each stream that times "
    quiet += "out, up to 8 times)"
    tail.add_argument("--read-timeout", type=_seconds, metavar="SECONDS", help=quiet)
    tail.set_defaults(run_client=_guarded(run_tail))


def _seconds(text: str) -> float:
    """A positive number of seconds (argparse says what is wrong, and exits 2)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return seconds


def _keepalive_seconds(text: str) -> float:
    """``--keepalive``: a number of seconds, 0 for off."""
    try:
        off = float(text) == 0
    except ValueError:
        off = False
    return 0.0 if off else _seconds(text)


def _default_url() -> str:
    from brokerclient.http import DEFAULT_URL

    return os.environ.get("BROKER_URL") or DEFAULT_URL


def _url(args: argparse.Namespace) -> str:
    from brokerclient.http import checked_url

    url = str(args.url or _default_url())
    try:
        return checked_url(url)
    except ValueError:
        raise UsageError(f"--url {url!r}: give it with http:// or https://") from None


def _token(args: argparse.Namespace) -> Token:
    """The token given (``--token``), or a callable reading the token file at each
    connection (``--token-file``): the clients ask a callable again for each one. A
    flag wins over the environment (``BROKER_TOKEN``, ``BROKER_TOKEN_FILE``)."""
    if args.token and args.token_file:
        raise UsageError("give --token or --token-file, not both")
    if args.token or args.token_file:
        return args.token or _token_file(args.token_file)
    token = os.environ.get("BROKER_TOKEN") or None
    path = os.environ.get("BROKER_TOKEN_FILE") or None
    if token and path:
        raise UsageError("BROKER_TOKEN and BROKER_TOKEN_FILE are both set: unset one")
    return _token_file(path) if path else token


TOKEN_FILE_PATIENCE_S = 2.0
"""How long a token file read empty or missing is read again before giving up: one being
renewed (truncated then written, or removed then made) is so for a moment."""


def _token_file(path: str) -> Callable[[], str]:
    _read_token_file(path)  # (a file that cannot be read is told at once, not at a reconnect)

    def renewed() -> str:
        deadline = time.monotonic() + TOKEN_FILE_PATIENCE_S
        while True:
            try:
                return _read_token_file(path)
            except UsageError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)

    return renewed


def _read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            token = file.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--token-file {path!r}: {error}") from None
    if not token:
        raise UsageError(f"--token-file {path!r} is empty")
    return token


def _guarded(command: Command) -> Command:
    """Runs a command, turning each kind of failure into its exit code and a line on stderr."""

    def run(args: argparse.Namespace) -> int:
        from brokerclient.errors import RequestFailed, Unreachable

        _log_to_stderr()
        try:
            return command(args)
        except UsageError as error:
            print(f"broker {args.command}: {error}", file=sys.stderr)
            return EXIT_USAGE
        except Unreachable as error:
            print(f"broker {args.command}: unreachable: {error}", file=sys.stderr)
            if error.idempotency_key is not None:  # (it may have been stored: rerun with it)
                key = shlex.quote(error.idempotency_key)
                print(f"broker {args.command}: retry with --idempotency-key {key}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except RequestFailed as error:
            print(f"broker {args.command}: {error}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            _quiet_stdout()  # the reader left (| head): not an error
            return EXIT_OK

    return run


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("broker: %(message)s"))
    client_log = logging.getLogger("brokerclient")
    client_log.addHandler(handler)
    client_log.setLevel(logging.INFO)
    client_log.propagate = False


def _quiet_stdout() -> None:
    # Python flushes stdout at exit; on a closed pipe that prints a second error.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _emit(item: Any, out: TextIO | None = None) -> None:
    stream = out or sys.stdout
    stream.write(json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n")
    stream.flush()


# -- publish --------------------------------------------------------------------


def run_publish(args: argparse.Namespace) -> int:
    if args.lines:
        from brokerclient.cli_lines import run_publish_lines

        return run_publish_lines(args)
    from brokerclient.http import new_idempotency_key
    from brokerclient.publisher import Publisher

    if args.keepalive is not None:  # (it was taken, and did nothing)
        raise UsageError("--keepalive goes with --lines: a single publish is never silent")
    raw = args.data if args.data is not None else _read_stdin()
    # (its key made here, not by the publisher: a Ctrl-C mid-request names it)
    key = args.idempotency_key or new_idempotency_key()
    result: PublishResult | None = None
    try:
        with Publisher(_url(args), token=_token(args)) as publisher:
            options = {"event": args.event, "idempotency_key": key, "close": args.close}
            try:
                if args.text:
                    result = publisher.publish_text(args.topic, raw, **options)
                else:
                    result = publisher.publish(args.topic, _json_data(raw), **options)
            except ValueError as error:  # (what cannot be sent: a lone surrogate)
                raise UsageError(str(error)) from None
        if result.replayed and args.idempotency_key is not None:
            log.info("already published under this idempotency key: nothing new was stored")
        elif result.replayed:  # (a retry of ours, whose first answer was lost)
            log.info("stored once: an answer was lost, and the retry found the event stored")
        _emit(_published(result))
        return EXIT_OK
    except KeyboardInterrupt:
        return _publish_ctrl_c(key, result)


def _published(result: PublishResult) -> dict[str, Any]:
    """What a publish prints: ``{"id"}`` (``{"ids"}`` for several), ``end_id`` if closed."""
    answer: dict[str, Any] = {"id": result.ids[0]} if len(result.ids) == 1 else {"ids": result.ids}
    if result.end_id is not None:
        answer["end_id"] = result.end_id  # (--close: where the topic ends)
    return answer


def _publish_ctrl_c(key: str, result: PublishResult | None) -> int:
    """A Ctrl-C in a publish: exit 130, saying whether it was stored. Under way, the
    event may have been stored (the request sent, its answer not read): the key to
    rerun under stores it once, as for an unreachable broker. Once answered, it was
    (with its answer). It exited silent: rerun without the key, stored twice."""
    if result is None:
        print(
            "broker publish: interrupted (Ctrl-C): the event may have been stored; rerun "
            f"with --idempotency-key {shlex.quote(key)} to store it once",
            file=sys.stderr,
        )
    else:
        answer = json.dumps(_published(result), ensure_ascii=False, separators=(",", ":"))
        print(
            f"broker publish: interrupted (Ctrl-C) once the event was stored ({answer}); "
            "nothing needs sending again",
            file=sys.stderr,
        )
    return EXIT_INTERRUPTED


def _read_stdin() -> str:
    if sys.stdin.isatty():
        log.info("reading the event's data from stdin (end with Ctrl-D)")
    try:  # (read strictly, or with surrogates standing for the bytes: the locale's)
        text = sys.stdin.read()
        text.encode("utf-8")
    except UnicodeError as error:
        raise UsageError(f"stdin is not UTF-8 text: {error}") from None
    # `echo hello | broker publish t --text` means "hello", as $(...) would; and a
    # line ended CRLF (a Windows file, `printf 'a\r\n'`) means "a" too, not "a\r".
    for ending in ("\r\n", "\n"):
        if text.endswith(ending):
            return text[: -len(ending)]
    return text


def _json_data(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as error:
        raise UsageError(f"DATA is not JSON ({error}); add --text to publish it as text") from None


# -- tail -----------------------------------------------------------------------


def run_tail(args: argparse.Namespace) -> int:
    from brokerclient.subscriber import DEFAULT_READ_TIMEOUT, Subscriber

    subscriber = Subscriber(
        args.topics,
        _url(args),
        last_event_id=args.last_event_id,
        from_earliest=args.start == "earliest",
        token=_token(args),
        # (not given: left out, the broker's heartbeat decides; given: no heartbeat
        # reads a stream for less)
        read_timeout=DEFAULT_READ_TIMEOUT if args.read_timeout is None else args.read_timeout,
        give_up_after=args.give_up_after,
    )
    last = None
    with subscriber:
        for event in subscriber:
            _emit(event.as_dict())
            if event.is_gap:
                log.info("gap: %s", event.data)
            last = event
    deleted = last is not None and last.is_gap and last.json().get("reason") == "deleted"
    log.info("the topic was %s: no more events", "deleted" if deleted else "closed")
    return EXIT_OK


# -- topics ---------------------------------------------------------------------


def run_topics(args: argparse.Namespace) -> int:
    import httpx

    from brokerclient.http import base_headers, token_now

    headers = base_headers(token_now(_token(args)))
    with httpx.Client(base_url=_url(args), timeout=10.0, headers=headers) as c:
        for topic in _topic_pages(c, args.prefix):
            _emit(topic)
    return EXIT_OK


def _get_retried(client: Any, path: str, params: dict[str, str]) -> Any:
    """A GET, tried again as a publish is on 502/503/504 and broken connections; raises
    Unreachable once the attempts are spent."""
    import time

    import httpx

    from brokerclient.attempts import Attempts
    from brokerclient.http import RETRY_STATUSES, RetryPolicy, retry_after

    attempts = Attempts(RetryPolicy(), f"GET {path}")
    while True:
        try:
            response = client.get(path, params=params)
        except httpx.TransportError as error:
            time.sleep(attempts.failed(repr(error)))
            continue
        if response.status_code not in RETRY_STATUSES:
            return response
        time.sleep(attempts.failed(f"{response.status_code}", retry_after(response)))


def _topic_pages(client: Any, prefix: str) -> Iterator[dict[str, Any]]:
    from brokerclient.http import failure, json_of

    cursor: str | None = None
    seen: set[str] = set()
    for _ in range(MAX_TOPIC_PAGES):
        params = {"prefix": prefix} | ({"cursor": cursor} if cursor else {})
        response = _get_retried(client, "/topics", params)
        if response.status_code != 200:
            raise failure(response)
        page = json_of(response)
        yield from page.get("topics", [])
        cursor = page.get("next")
        if not cursor or cursor in seen:
            return
        seen.add(cursor)
