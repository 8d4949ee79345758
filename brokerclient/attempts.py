"""A publish's attempts (``brokerclient.publisher``; the CLI's GETs too): counted, and
how long to wait before the next one, until the retry policy's attempts are spent
(``Unreachable``). A 401 is tried once more at once with a token asked anew, never
twice in a row; a stream's attempts are counted since the last one that got further.
"""

from __future__ import annotations

import logging
import time

from brokerclient.errors import Unreachable
from brokerclient.http import RetryPolicy

log = logging.getLogger(__name__)

STREAM_WORKED_S = 1.0
"""A stream's attempt that broke off after this long, with lines no attempt had taken,
got further: its attempts are counted anew (a generation cut by restarts goes on)."""


class Attempts:
    """Counts a publish's attempts and says how long to wait before the next one.

    A stream's attempts are counted since the last one that took a line no attempt had
    taken (a long generation through rolling restarts is cut many times, each time
    further on: it was given up after the policy's attempts in all, its rest lost)."""

    def __init__(self, policy: RetryPolicy, what: str, key: str | None = None) -> None:
        self.policy, self.what, self.key, self.failures = policy, what, key, 0
        self.after_line = 0  # (a stream gone on as a stream of its own after that line)
        self._lines = 0  # the most lines any attempt took from the stream's iterator
        self._since = time.monotonic()  # (when the attempt under way began)
        self._refused = False  # an attempt was answered 401, and none got further since

    def refused(self, token_refreshes: bool, lines: int | None) -> bool:
        """Whether to try again at once after a 401: with a token that may be refreshed
        (a callable), unless it was refused twice in a row. A stream's attempt that got
        further (lines no attempt had taken, for ``STREAM_WORKED_S``) on its fresh token
        before that one expired too is no refusal in a row: its lines are bounded, and a
        token refused at once is never tried a third time."""
        lasted = time.monotonic() - self._since
        if lines is not None and lines > self._lines and lasted >= STREAM_WORKED_S:
            self._refused = False
        self._lines = max(self._lines, lines or 0)
        if not token_refreshes or self._refused:
            return False
        self._refused = True
        self._since = time.monotonic()
        log.info("%s: 401; trying once more with a fresh token", self.what)
        return True

    def failed(
        self,
        why: str,
        hinted: float | None = None,
        lines: int | None = None,
        *,
        answered: bool = False,
    ) -> float:
        """The delay before the next attempt; raises Unreachable when none is left.

        ``lines``: a stream's lines taken so far. An attempt that broke off (not one the
        broker ``answered`` 502/503/504, which it does at once, lines taken or not) got
        further with lines no attempt had taken, if it lasted ``STREAM_WORKED_S``: a
        broker whose Redis is down takes a line or two before it breaks off, every
        attempt, for ever."""
        lasted = time.monotonic() - self._since
        further = lines is not None and lines > self._lines and not answered
        if further and lasted >= STREAM_WORKED_S:
            self.failures = 0  # (this attempt got further)
        self._lines = max(self._lines, lines or 0)
        self.failures += 1
        if self.failures >= max(1, self.policy.attempts):
            said = f"{self.what}: {why} (after {self.failures} attempts"
            if self.key is not None:  # (an attempt may have been stored, its answer lost)
                said += f"; a retry must send idempotency key {self.key}"
            if self.after_line:  # (the lines before are stored; the whole again: twice)
                said += f" with the lines after line {self.after_line}, as a stream of their own"
            raise Unreachable(
                f"{said})", idempotency_key=self.key, lines_sent=lines, after_line=self.after_line
            )
        delay = self.policy.delay(self.failures, hinted)
        log.info("%s: %s; attempt %d in %.2fs", self.what, why, self.failures + 1, delay)
        self._since = time.monotonic() + delay
        return delay
