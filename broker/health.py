"""What the log says of the store's health: when it stops answering, while it does
not (throttled), and when it answers again.

Requests meanwhile are answered 503 (publishes) or told to come back (streams):
without these lines an outage with no stream open wrote nothing at all, and its
end was never said."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)
OUTAGE_REMINDER_S = 30.0


class ThrottledLog:
    """A warning said at most once per ``every_s``, with how many were not said since
    (a Redis at its memory limit refuses every publish: thousands of lines a second
    said nothing more than the first)."""

    def __init__(
        self, every_s: float, logger: logging.Logger = log, level: int = logging.WARNING
    ) -> None:
        self._every_s = every_s
        self._logger = logger
        self._level = level
        self._last = -every_s
        self._unsaid = 0

    def say(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._every_s:
            self._unsaid += 1
            return
        if self._unsaid:
            message += f" (and {self._unsaid} more since the last said)"
        self._last, self._unsaid = now, 0
        self._logger.log(self._level, message, *args)


class StoreHealth:
    """Counts the store's failures from the first after it answered, and says so."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self.failing_since: float | None = None  # (monotonic)
        self._failures = 0
        self._logger = logger
        self._still = ThrottledLog(OUTAGE_REMINDER_S, logger)

    def failed(self, operation: str, error: BaseException) -> None:
        self._failures += 1
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            self._still = ThrottledLog(OUTAGE_REMINDER_S, self._logger)
            self._still.say(
                "store: a %s failed: %s (answered 503 until it answers)", operation, error
            )
            return
        self._still.say(
            "store: still failing, for %.0f s, %d operations: %s",
            time.monotonic() - self.failing_since,
            self._failures,
            error,
        )

    def answered(self) -> None:
        """An operation succeeded: an outage under way is over."""
        if self.failing_since is None:
            return
        self._logger.warning(
            "store: answers again, after %.1f s and %d failed operations",
            time.monotonic() - self.failing_since,
            self._failures,
        )
        self.failing_since, self._failures = None, 0
