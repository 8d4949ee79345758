"""Publishing and subscribing through a load balancer while instances and Redis fail.

Three brokers behind nginx or HAProxy; three npm `eventsource` clients and one
Chromium EventSource subscribe through the balancer and reconnect on their own.
A publisher retries each event with its Idempotency-Key until acknowledged,
while one instance is SIGKILLed, another SIGTERMed, Redis is restarted (AOF
on, so nothing acknowledged is lost) and the instances are restarted.

The oracle: every acknowledged event reaches every subscriber exactly once, in
order, with its acknowledged id; no client ends closed. Because this Redis
keeps every acknowledged write across its restart, no `broker.gap` is expected.
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests.e2e.balancers import LoadBalancer
from tests.e2e.brokers import BrokerCluster
from tests.e2e.clients import CLOSED, ClientFactory, SseClient
from tests.e2e.oracle import check_delivery, last_n
from tests.e2e.procs import wait_until
from tests.e2e.publisher import Publisher
from tests.e2e.topology import RedisTopology

pytestmark = pytest.mark.e2e

NODE_CLIENTS = 3
PUBLISH_RATE = 30.0  # events per second: modest, so the run is about the failures
STEP = 20  # acknowledged events between two failures
CONVERGENCE_TIMEOUT = 30.0
SIGTERM_EXIT_TIMEOUT = 10.0


class Timeline:
    """What the scenario did and when, for the failure message."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.started = time.time()  # wall clock, as the clients' records are
        self.lines: list[str] = []

    def note(self, what: str) -> None:
        elapsed = time.time() - self.started
        self.lines.append(f"{elapsed:6.2f}s acked={self.publisher.acked:4d} {what}")

    def __str__(self) -> str:
        return "\n".join(self.lines)


def wait_for_progress(publisher: Publisher, events: int, timeline: Timeline) -> None:
    """Let `events` more events be acknowledged: the deployment serves between failures."""
    target = publisher.acked + events

    def progressed() -> bool:
        if publisher.failure or not publisher.is_alive():
            raise AssertionError(f"publisher stopped: {publisher.failure}\n{timeline}")
        return publisher.acked >= target

    wait_until(progressed, timeout=30, what=f"{target} acknowledged events\n{timeline}")


def restart_gracefully(cluster: BrokerCluster, index: int, timeline: Timeline) -> None:
    instance = cluster.instances[index]
    code = instance.terminate(timeout=SIGTERM_EXIT_TIMEOUT)
    timeline.note(f"broker-{index} exited {code} after SIGTERM")
    assert code == 0, f"broker-{index} exited {code} after SIGTERM\n{timeline}"
    instance.start()
    timeline.note(f"broker-{index} restarted and ready")


def run_failures(
    cluster: BrokerCluster, redis: RedisTopology, publisher: Publisher, timeline: Timeline
) -> None:
    wait_for_progress(publisher, STEP, timeline)
    cluster.instances[0].kill()
    timeline.note("broker-0 SIGKILLed")
    wait_for_progress(publisher, STEP, timeline)
    cluster.instances[0].start()
    timeline.note("broker-0 restarted and ready")
    wait_for_progress(publisher, STEP, timeline)
    restart_gracefully(cluster, 1, timeline)
    wait_for_progress(publisher, STEP, timeline)
    redis.restart()
    timeline.note(f"redis ({redis.name}) restarted with its AOF")
    wait_for_progress(publisher, STEP, timeline)
    restart_gracefully(cluster, 2, timeline)
    wait_for_progress(publisher, STEP, timeline)


def start_subscribers(
    topic: str, node_client: ClientFactory, chromium_client: ClientFactory
) -> list[SseClient]:
    # from=earliest: an empty topic's whole history, so no event can slip in
    # between the subscription starting and the first publish.
    path = f"/topics/{topic}/events?from=earliest"
    clients = [node_client(path) for _ in range(NODE_CLIENTS)]
    clients.append(chromium_client(path))

    def all_open() -> bool:
        for client in clients:
            client.poll()
        return all(any(r["kind"] == "open" for r in c.records) for c in clients)

    wait_until(all_open, timeout=30, what="every subscriber to open its stream")
    return clients


def wait_for_convergence(clients: list[SseClient], last: int, timeline: Timeline) -> None:
    """Wait (bounded) until every client has received the last acknowledged event."""

    def converged() -> bool:
        for client in clients:
            client.poll()
        return all(last_n(client.records) == last for client in clients)

    try:
        wait_until(converged, timeout=CONVERGENCE_TIMEOUT, what="every client to catch up")
    except TimeoutError:
        pass  # the oracle below says precisely what is missing
    timeline.note("clients caught up (or convergence timed out)")


@pytest.mark.timeout(180)
def test_every_acknowledged_event_reaches_every_subscriber_through_failures(
    redis_topology: RedisTopology,
    broker_cluster: BrokerCluster,
    load_balancer: LoadBalancer,
    node_client: ClientFactory,
    chromium_client: ClientFactory,
) -> None:
    topic = f"e2e.failover.{uuid.uuid4().hex[:8]}"
    clients = start_subscribers(topic, node_client, chromium_client)
    publisher = Publisher(load_balancer.url, topic, rate=PUBLISH_RATE)
    timeline = Timeline(publisher)
    publisher.start()
    try:
        run_failures(broker_cluster, redis_topology, publisher, timeline)
    finally:
        publisher.stop()
    timeline.note(f"publisher stopped: {publisher.stats}")
    assert publisher.failure is None, f"{publisher.failure}\n{timeline}"
    acks = publisher.snapshot()
    assert [a.n for a in acks] == list(range(len(acks)))
    wait_for_convergence(clients, acks[-1].n, timeline)

    gaps_allowed = redis_topology.loses_acknowledged_writes_on_restart
    deliveries = [
        check_delivery(c.name, acks, c.records, gaps_allowed=gaps_allowed) for c in clients
    ]
    report = "\n".join(d.summary(timeline.started) for d in deliveries) + f"\n{timeline}"
    print(report)  # shown with -s or -rP: how many reconnects each client made
    assert not any(d.problems for d in deliveries), report
    closed = [c.name for c in clients if c.ready_state() in (CLOSED, None)]
    assert not closed, f"clients ended closed or dead: {closed}\n{report}"
