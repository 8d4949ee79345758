"""``broker``: the console script. ``serve`` runs the service (``api.serve``); ``publish``,
``tail`` and ``topics`` are the command-line client (``brokerclient.cli``).

This module imports only argparse and the client's parsers: each command loads what
it runs, so a client command starts without the server side (uvicorn, Starlette,
pydantic, the Redis store): test_architecture.py and test_cli.py hold it to that.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from brokerclient.cli import add_client_commands


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker", description="Resumable SSE event broker")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="bind address (BROKER_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (BROKER_PORT, default 8000)")
    serve.add_argument("--redis-url", help="Redis URL (BROKER_REDIS_URL; unset: embedded store)")
    serve.add_argument("--workers", type=int, help="worker processes (BROKER_WORKERS, default 1)")
    add_client_commands(commands)  # publish, tail, topics: the command-line client
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # `broker publish TOPIC --event x DATA`: argparse fills TOPIC and the optional DATA
    # together, from the arguments before the first option, so a DATA after an option
    # is left over (it was "unrecognized arguments"); after `--`, it is DATA whatever
    # it looks like.
    late = extra[1:] if extra[:1] == ["--"] else extra
    if getattr(args, "data", "") is None and len(late) == 1:
        if late is not extra or _not_a_flag(late[0]):
            args.data, extra = late[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if hasattr(args, "run_client"):
        sys.exit(args.run_client(args))
    # (deferred: the server side takes half a second to import, which `broker publish`
    # and `broker tail` have no use for)
    from api.serve import run_serve

    run_serve(args)


def _not_a_flag(argument: str) -> bool:
    """DATA, not a mistyped option: a negative number is data."""
    return not argument.startswith("-") or argument[1:2].isdigit()


if __name__ == "__main__":
    main()
