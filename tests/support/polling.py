"""The suite's one way to wait for a condition: poll it, bounded in time, and say what
did not happen. Never a bare sleep that hopes a race is over."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError, TimeoutError):
    """A condition that did not come true in time: a test failure, and a timeout."""


def wait_until(
    condition: Callable[[], T],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    tolerate: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    Errors of the ``tolerate`` types count as "not yet" (a server restarting).
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = condition()
        except tolerate as error:
            result, last_error = None, error  # type: ignore[assignment]
        if result:
            return result
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"{what}: not within {timeout:g} s (last error: {last_error})")
        time.sleep(interval)


async def await_until(
    condition: Callable[[], T | Awaitable[T]],
    *,
    timeout: float,
    what: str,
    interval: float = 0.02,
    worker: asyncio.Task[object] | None = None,
) -> T:
    """``wait_until`` with the event loop running; ``condition`` may be a coroutine
    function. If ``worker`` (the task that makes it come true) ends first, fail at
    once with its own error."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if worker is not None and worker.done():
            worker.result()  # raises what stopped it
            raise AssertionError(f"{what}: {worker.get_name()} ended first")
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(interval)
