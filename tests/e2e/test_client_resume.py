"""The Python client's subscriber behind a real load balancer, across a ``kill -9``."""

from __future__ import annotations

import queue
import threading
import uuid

import pytest

from brokerclient import Publisher, RetryPolicy, Subscriber, event
from tests.e2e.balancers import LoadBalancer
from tests.e2e.brokers import BrokerCluster
from tests.support.polling import wait_until

pytestmark = pytest.mark.e2e
TOTAL = 40


def test_subscriber_resumes_across_a_kill_behind_the_load_balancer(
    broker_cluster: BrokerCluster, load_balancer: LoadBalancer
) -> None:
    topic = f"e2e.client.{uuid.uuid4().hex[:8]}"
    received: queue.Queue[object] = queue.Queue()
    subscriber = Subscriber(topic, load_balancer.url, from_earliest=True, give_up_after=30)
    reader = threading.Thread(target=lambda: [received.put(e) for e in subscriber])
    patient = RetryPolicy(attempts=40, backoff=0.05, max_backoff=0.5)
    with Publisher(load_balancer.url, retry=patient) as publisher:
        publisher.publish_batch(topic, [event(n) for n in range(TOTAL // 2)])
        reader.start()
        try:
            got = [received.get(timeout=15) for _ in range(TOTAL // 2)]
            wait_until(lambda: broker_cluster.busiest(0).open_streams() > 0, timeout=10,
                       what="the stream to be counted")  # fmt: skip
            broker_cluster.busiest(0).kill()  # SIGKILL: no clean end of the stream
            for n in range(TOTAL // 2, TOTAL):
                publisher.publish(topic, n)
            got += [received.get(timeout=30) for _ in range(TOTAL // 2)]
        finally:
            publisher.publish(topic, "end", close=True)
            reader.join(timeout=30)
            subscriber.close()
    assert not any(e.is_gap for e in got)  # type: ignore[attr-defined]
    assert [e.json() for e in got] == list(range(TOTAL))  # type: ignore[attr-defined]
