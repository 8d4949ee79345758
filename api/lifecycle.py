"""Draining on SIGTERM: end every open stream so clients reconnect elsewhere.

uvicorn stops accepting on SIGTERM and then waits for open responses to end;
an event stream never ends by itself. So when the app starts we chain a
handler in front of uvicorn's: it ends our streams (each with a clean end of
its chunked body) and then lets uvicorn go on with its own shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
log = logging.getLogger(__name__)


def drain_on_hangup() -> None:
    """SIGHUP (a closed terminal; a tool that means "reload") drains as SIGTERM does: it
    killed the process at once, every stream cut without its end, and said nothing.
    The broker has nothing to reload; uvicorn's SIGTERM handler does the drain. Under
    ``nohup`` (SIGHUP ignored) it stays ignored."""

    def handler(signum: int, frame: FrameType | None) -> None:
        log.warning("SIGHUP: draining and stopping, as on SIGTERM (nothing to reload)")
        os.kill(os.getpid(), signal.SIGTERM)

    if not hangups_ignored():
        signal.signal(signal.SIGHUP, handler)


def hangups_ignored() -> bool:
    """Whether SIGHUP was set to be ignored (``nohup``): a closed terminal must then
    leave the broker running, as it did."""
    return signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


def drain_on_shutdown_signals(drain: Callable[[], None]) -> Callable[[], None]:
    """Call ``drain`` on the event loop at SIGTERM/SIGINT; returns a function that undoes it."""
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(drain)
        chained = previous.get(signum)
        if callable(chained):
            chained(signum, frame)

    for sig in SHUTDOWN_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (an embedding test client): nothing to chain
            return lambda: None

    def restore() -> None:
        for sig, chained in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, chained)

    return restore
