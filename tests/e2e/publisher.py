"""A publisher that retries every event with its Idempotency-Key until it is acknowledged.

It publishes one event at a time at a steady rate, so the order it gets
acknowledgements in is the order of the topic's log; a retry of an event that
was stored but whose answer was lost must be answered from the idempotency
record (200 replay), never stored again.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx

RETRYABLE_STATUSES = {500, 502, 503, 504}


@dataclass(frozen=True)
class Ack:
    """One acknowledged event: its sequence number, its id, and how it got there."""

    n: int
    id: str
    attempts: int
    replayed: bool


@dataclass
class PublisherStats:
    attempts: int = 0
    transport_errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


class Publisher(threading.Thread):
    """Publishes {"n": 0, 1, ...} to one topic through the load balancer until stopped.

    An event that is not acknowledged within `event_deadline` seconds stops the
    publisher with `failure` set: every later number would be unjustified.
    """

    def __init__(
        self,
        base_url: str,
        topic: str,
        *,
        rate: float = 30.0,
        max_events: int = 2000,
        event_deadline: float = 20.0,
    ) -> None:
        super().__init__(name=f"publisher-{topic}", daemon=True)
        self.url = f"{base_url}/topics/{topic}/events"
        self.interval = 1.0 / rate
        self.max_events = max_events
        self.event_deadline = event_deadline
        self.run_id = uuid.uuid4().hex[:12]
        self.acks: list[Ack] = []
        self.stats = PublisherStats()
        self.failure: str | None = None
        self._stop_requested = threading.Event()
        self._lock = threading.Lock()

    @property
    def acked(self) -> int:
        with self._lock:
            return len(self.acks)

    def snapshot(self) -> list[Ack]:
        with self._lock:
            return list(self.acks)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the event in flight, then stop."""
        self._stop_requested.set()
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"the publisher did not stop within {timeout}s")

    def run(self) -> None:
        started = time.monotonic()
        with httpx.Client(timeout=httpx.Timeout(3.0, connect=1.0)) as client:
            for n in range(self.max_events):
                slot = started + n * self.interval
                if self._stop_requested.wait(max(0.0, slot - time.monotonic())):
                    return
                ack = self._publish(client, n)
                if ack is None:
                    return
                with self._lock:
                    self.acks.append(ack)

    def _publish(self, client: httpx.Client, n: int) -> Ack | None:
        key = f"e2e-{self.run_id}-{n}"
        deadline = time.monotonic() + self.event_deadline
        for attempt in range(1, 1000):
            delay = self._attempt(client, n, key)
            if isinstance(delay, Ack):
                return Ack(n, delay.id, attempt, delay.replayed)
            if delay is None or time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
        self.failure = self.failure or f"event {n} was not acknowledged within the deadline"
        return None

    def _attempt(self, client: httpx.Client, n: int, key: str) -> Ack | float | None:
        """One POST: the Ack, or the delay before a retry, or None when it cannot succeed."""
        self.stats.attempts += 1
        try:
            response = client.post(
                self.url, json={"data": {"n": n}}, headers={"Idempotency-Key": key}
            )
        except httpx.TransportError:
            self.stats.transport_errors += 1
            return 0.1
        self.stats.statuses[response.status_code] = (
            self.stats.statuses.get(response.status_code, 0) + 1
        )
        if response.status_code in (200, 201):
            replayed = response.headers.get("Idempotent-Replayed") == "true"
            return Ack(n, str(response.json()["id"]), 0, replayed)
        if response.status_code in RETRYABLE_STATUSES:
            return retry_delay(response.headers.get("Retry-After"))
        self.failure = f"event {n}: unexpected {response.status_code} {response.text[:300]}"
        return None


def retry_delay(retry_after: str | None) -> float:
    """Honour a numeric Retry-After, within 0.05-1 s so the test stays fast and bounded."""
    try:
        seconds = float(retry_after) if retry_after else 0.2
    except ValueError:
        seconds = 0.2
    return min(max(seconds, 0.05), 1.0)
