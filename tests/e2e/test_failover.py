"""Publishing and subscribing through a load balancer while instances and Redis fail.

Three brokers behind nginx or HAProxy; three npm `eventsource` clients and one
Chromium EventSource subscribe through the balancer and reconnect on their own.
A publisher retries each event with its Idempotency-Key until acknowledged,
while failures hit the deployment (each time the instance serving the most
streams, so that clients really lose their streams):

- rolling-failures: an instance is SIGKILLed and restarted; one is SIGTERMed
  (it must exit 0) and restarted; Redis is restarted (SIGTERM, AOF on); a last
  instance is SIGTERMed and restarted.
- redis-outage: Redis stops (SIGTERM, AOF on) and, while it is down, an
  instance crashes, so its clients reconnect during the outage, and a new
  client subscribes; then Redis and the instance start again.

On Sentinel and on a Redis Cluster (see topology.py), the scenario is:

- primary-failover: an instance is SIGKILLed and restarted; then the primary
  serving the topic is SIGKILLed and, while no primary is elected yet, the
  instance serving the most streams crashes too, so its clients reconnect
  during the failover; once a replica is promoted the instance restarts and the
  operator restores a replica; a last instance is SIGTERMed and restarted.

The oracle: every acknowledged event reaches every subscriber exactly once, in
order, with its acknowledged id; no client ends closed. No `broker.gap` is
expected anywhere: the single Redis keeps every acknowledged write across its
restart (AOF), and on Sentinel and Cluster the brokers publish with
BROKER_PUBLISH_DURABILITY=replicated, so an acknowledged event is on a replica
before the failover promotes the most up-to-date one.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.e2e.balancers import LoadBalancer
from tests.e2e.brokers import BrokerCluster
from tests.e2e.clients import ClientFactory, SseClient
from tests.e2e.oracle import CLOSED, check_delivery, gave_up, last_n
from tests.e2e.publisher import Publisher
from tests.e2e.topology import FailoverRedis, RedisTopology, RestartableRedis
from tests.support.polling import wait_until

pytestmark = pytest.mark.e2e

NODE_CLIENTS = 3
PUBLISH_RATE = 60.0  # events per second: modest (a STEP is 1/3 s), so the run is about the failures
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


@dataclass
class Run:
    """One scenario's deployment, subscribers and timeline."""

    cluster: BrokerCluster
    redis: RedisTopology
    topic: str
    clients: list[SseClient]
    timeline: Timeline
    start_client: Callable[[], SseClient]  # one more subscriber on the topic

    def progress(self, events: int = STEP) -> None:
        wait_for_progress(self.timeline.publisher, events, self.timeline)

    def note(self, what: str) -> None:
        self.timeline.note(what)


def kill_and_restart(run: Run) -> None:
    instance = run.cluster.busiest(otherwise=0)
    instance.kill()
    run.note(f"broker-{instance.index} SIGKILLed")
    run.progress()
    instance.start()
    run.note(f"broker-{instance.index} restarted and ready")


def terminate_and_restart(run: Run, otherwise: int) -> None:
    instance = run.cluster.busiest(otherwise)
    code = instance.terminate(timeout=SIGTERM_EXIT_TIMEOUT)
    run.note(f"broker-{instance.index} exited {code} after SIGTERM")
    assert code == 0, f"broker-{instance.index} exited {code} after SIGTERM\n{run.timeline}"
    instance.start()
    run.note(f"broker-{instance.index} restarted and ready")


def restartable(run: Run) -> RestartableRedis:
    assert isinstance(run.redis, RestartableRedis), f"{run.redis.name} cannot be restarted"
    return run.redis


def with_failover(run: Run) -> FailoverRedis:
    assert isinstance(run.redis, FailoverRedis), f"{run.redis.name} has no failover"
    return run.redis


def restart_redis(run: Run) -> None:
    restartable(run).stop()
    run.note(f"redis ({run.redis.name}) stopped with SIGTERM")
    run.redis.start()
    run.note(f"redis ({run.redis.name}) started again with its AOF")


def redis_outage_with_a_crash(run: Run) -> None:
    """Redis stops; meanwhile an instance crashes and a new client subscribes.

    The crashed instance's clients reconnect, and the newcomer connects, while
    Redis is down: they must be kept (a 503 would close a browser's EventSource
    for good) and get everything once Redis is back with its AOF.
    """
    # The instance to crash is chosen by the instances' stream gauges: they must count
    # every client first, or the one chosen may serve none and test nothing.
    wait_until(
        lambda: sum(i.open_streams() for i in run.cluster.instances) >= len(run.clients),
        timeout=10,
        what="the instances' stream gauges to count every client",
    )
    instance = run.cluster.busiest(otherwise=2)
    restartable(run).stop()
    run.note(f"redis ({run.redis.name}) stopped with SIGTERM")
    crashed_at = time.time()
    instance.kill()
    run.note(f"broker-{instance.index} SIGKILLed while redis is down")
    wait_until(
        lambda: any(lost_stream(c, since=crashed_at) for c in run.clients),
        timeout=6,
        what="a client of the crashed instance to notice",
    )
    newcomer = run.start_client()
    run.note(f"{newcomer.name} subscribes while redis is down")
    wait_until(
        lambda: all(reconnect_attempted(c, since=crashed_at) for c in run.clients),
        timeout=15,
        what=f"the crashed instance's clients and {newcomer.name} to connect\n{run.timeline}",
    )
    run.note("they all tried to connect while redis was down")
    run.redis.start()
    run.note(f"redis ({run.redis.name}) started again with its AOF")
    instance.start()
    run.note(f"broker-{instance.index} restarted and ready")


def primary_failover_with_a_crash(run: Run) -> None:
    """The topic's primary crashes (SIGKILL); an instance crashes during the failover.

    Publishes answer 503 until a replica is promoted (and, being replicated,
    until the new primary has a replica streaming); the publisher retries each
    with its Idempotency-Key. The crashed instance's clients reconnect while
    there is no primary yet, and must resume exactly once the new one serves.
    """
    redis = with_failover(run)
    old = redis.kill_primary(run.topic)
    run.note(f"redis ({redis.name}) primary :{old} of the topic SIGKILLed")
    instance = run.cluster.busiest(otherwise=1)
    instance.kill()
    run.note(f"broker-{instance.index} SIGKILLed during the failover")
    new = redis.wait_for_failover(run.topic)
    run.note(f"redis ({redis.name}) failed over from :{old} to :{new}")
    instance.start()
    run.note(f"broker-{instance.index} restarted and ready")
    run.note(f"redis ({redis.name}): {redis.restore_redundancy()}")


def lost_stream(client: SseClient, since: float) -> bool:
    client.poll()
    return any(r["kind"] == "error" and r["t"] >= since for r in client.records)


def reconnect_attempted(client: SseClient, since: float) -> bool:
    """True once the client has connected since `since`, or has not lost its stream.

    A stream lost after `since` counts once the next attempt has an outcome: an
    open, another error, or giving up.
    """
    client.poll()
    if not client.records:
        return False  # a newcomer that has not connected yet
    later = [r for r in client.records if r["t"] >= since]
    lost = [i for i, r in enumerate(later) if r["kind"] == "error"]
    return not lost or lost[0] < len(later) - 1 or later[lost[0]].get("readyState") == CLOSED


def rolling_failures(run: Run) -> None:
    """SIGKILL an instance, SIGTERM another, restart Redis, SIGTERM a third; restart each."""
    run.progress()
    kill_and_restart(run)
    run.progress()
    terminate_and_restart(run, otherwise=1)
    run.progress()
    restart_redis(run)
    run.progress()
    terminate_and_restart(run, otherwise=2)
    run.progress()


def connects_during_redis_outage(run: Run) -> None:
    """Clients that (re)connect while Redis is down must not be turned away for good."""
    run.progress()
    redis_outage_with_a_crash(run)
    run.progress(2 * STEP)


def primary_failover(run: Run) -> None:
    """SIGKILL an instance; fail the topic's primary over amid a crash; SIGTERM an instance."""
    run.progress()
    kill_and_restart(run)
    run.progress()
    primary_failover_with_a_crash(run)
    run.progress(2 * STEP)
    terminate_and_restart(run, otherwise=2)
    run.progress()


SCENARIOS: dict[str, Callable[[Run], None]] = {
    "rolling-failures": rolling_failures,
    "redis-outage": connects_during_redis_outage,
    "primary-failover": primary_failover,
}

# Which scenarios each Redis topology runs: restarting a whole Sentinel group or
# Cluster is not what fails there; a primary is.
CASES = [
    pytest.param(topology, scenario, id=f"{topology}-{scenario}")
    for topology, scenario in [
        ("single", "rolling-failures"),
        ("single", "redis-outage"),
        ("sentinel", "primary-failover"),
        ("cluster", "primary-failover"),
    ]
]


def subscription_path(topic: str) -> str:
    # from=earliest: an empty topic's whole history, so no event can slip in
    # between the subscription starting and the first publish.
    return f"/topics/{topic}/events?from=earliest"


def start_subscribers(
    topic: str, node_client: ClientFactory, chromium_client: ClientFactory
) -> list[SseClient]:
    path = subscription_path(topic)
    clients = [node_client(path) for _ in range(NODE_CLIENTS)]
    clients.append(chromium_client(path))

    def all_open() -> bool:
        for client in clients:
            client.poll()
        return all(any(r["kind"] == "open" for r in c.records) for c in clients)

    wait_until(all_open, timeout=30, what="every subscriber to open its stream")
    return clients


def wait_for_convergence(clients: list[SseClient], last: int, timeline: Timeline) -> None:
    """Wait (bounded) until every client has the last acknowledged event or has given up."""

    def converged() -> bool:
        for client in clients:
            client.poll()
        return all(last_n(c.records) == last or gave_up(c.records) for c in clients)

    try:
        wait_until(converged, timeout=CONVERGENCE_TIMEOUT, what="every client to catch up")
    except TimeoutError:
        pass  # the oracle below says precisely what is missing
    timeline.note("clients caught up, gave up, or timed out")


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("redis_topology", "scenario"), CASES, indirect=["redis_topology"])
def test_every_acknowledged_event_reaches_every_subscriber_through_failures(
    scenario: str,
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
    timeline.note(f"{load_balancer.kind} configuration from {load_balancer.config_source}")

    def start_newcomer() -> SseClient:
        clients.append(node_client(subscription_path(topic)))
        return clients[-1]

    publisher.start()
    try:
        run = Run(broker_cluster, redis_topology, topic, clients, timeline, start_newcomer)
        SCENARIOS[scenario](run)
    finally:
        publisher.stop()
    timeline.note(f"publisher stopped: {publisher.stats}")
    assert publisher.failure is None, f"{publisher.failure}\n{timeline}"
    acks = publisher.snapshot()
    wait_for_convergence(clients, acks[-1].n, timeline)

    gaps_allowed = redis_topology.loses_acknowledged_writes_on_restart
    deliveries = [
        check_delivery(c.name, acks, c.records, gaps_allowed=gaps_allowed) for c in clients
    ]
    closed = [c.name for c in clients if c.ready_state() in (CLOSED, None)]
    report = "\n".join(d.summary(timeline.started) for d in deliveries)
    report += f"\nended closed or dead: {closed}\n{timeline}"
    print(report)  # shown with -s or -rP: how often each client lost its stream
    assert not any(d.problems for d in deliveries) and not closed, report
