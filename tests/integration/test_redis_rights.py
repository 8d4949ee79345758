"""The rights the broker needs of Redis (the README's Redis permissions), and what
happens without them: a refusal that waiting will not mend stops the store at open,
naming it (it had opened, said ready, and answered every publish 503)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as redis

from broker import Broker, NewEvent
from broker import constants as c
from broker.errors import StoreMisconfigured
from broker.redis_open import open_store
from tests.support.polling import await_until
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import RedisClusterGroup
from tests.support.sse import collect

# The README's list, as an ACL: the commands the broker sends, and those its scripts run.
NEEDED = (
    "+evalsha +script|load +xread +scan +ping +time +info +client|id +client|unblock "
    "+wait +select +auth +hello "
    "+xadd +xtrim +xrange +xrevrange +xlen +xinfo|stream +xsetid +del +exists +hdel +hget "
    "+hmget +hset +persist +pexpire +pttl +zadd +zrangebyscore +zrem +zscore"
).split()

CLUSTER_NEEDED = "+cluster|slots +command +asking".split()  # (ASKING: slots migrating)


async def user_url(
    redis_admin: redis.Redis, server: RedisServer, commands: list[str], keys: str = "broker:*"
) -> str:
    name = f"u{uuid.uuid4().hex[:8]}"
    await redis_admin.acl_setuser(
        name, enabled=True, passwords=["+pw"], keys=[keys], commands=["-@all", *commands]
    )
    return f"redis://{name}:pw@127.0.0.1:{server.port}/0"


async def test_a_user_with_the_listed_rights_does_everything(
    private_redis: RedisServer, redis_admin: redis.Redis
) -> None:
    broker = Broker(open_store(await user_url(redis_admin, private_redis, list(NEEDED))))
    await broker.start()
    try:
        topic = f"rights-{uuid.uuid4().hex[:8]}"
        first = await broker.publish(topic, [NewEvent("1")], idempotency_key="k")
        again = await broker.publish(topic, [NewEvent("1")], idempotency_key="k")
        assert again.replayed and again.ids == first.ids
        subscription = await broker.subscribe({topic: first.ids[0]})
        try:
            await broker.publish(topic, [NewEvent("2"), NewEvent("3")])
            await broker.close_topic(topic)
            events = await collect(subscription.chunks(), lambda got: len(got) >= 3)
            assert [e.data for e in events] == ["2", "3", "{}"]
            assert events[-1].event == "broker.end"
        finally:
            subscription.close()
        assert len((await broker.history(topic, after=None, limit=10)).events) == 4
        assert (await broker.topic_info(topic)).length == 4
        assert await broker.delete_topic(topic)
    finally:
        await broker.close()


@pytest.mark.parametrize(
    ("without", "said"),
    [
        ("+evalsha", "evalsha"),
        ("+script|load", "script|load"),
        ("+client|id", "client|id"),
        ("+pexpire", "PEXPIRE"),
        ("+hmget", "can't run this command"),  # (run by the state script)
        ("+xadd", "may not run XADD"),  # (by the append script: asked of Redis's ACL)
        ("+hset", "may not run HSET"),
        ("+xread", "may not run XREAD"),  # (the live reads)
    ],
)
async def test_a_right_missing_stops_the_store_at_open(
    private_redis: RedisServer, redis_admin: redis.Redis, without: str, said: str
) -> None:
    rights = [right for right in NEEDED if right != without]
    store = open_store(await user_url(redis_admin, private_redis, rights))
    try:
        with pytest.raises(StoreMisconfigured, match=said):
            await store.open()
    finally:
        await store.close()


async def test_keys_outside_the_users_pattern_stop_the_store_at_open(
    private_redis: RedisServer, redis_admin: redis.Redis
) -> None:
    store = open_store(await user_url(redis_admin, private_redis, list(NEEDED), keys="app:*"))
    try:
        with pytest.raises(StoreMisconfigured, match="keys"):
            await store.open()
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("url_of", "said"),
    [
        (lambda port: f"redis://:wrong@127.0.0.1:{port}/0", "invalid"),
        (lambda port: f"redis://127.0.0.1:{port}/99", "DB index"),
    ],
    ids=["wrong-password", "no-such-db"],
)
async def test_a_wrong_password_or_database_stops_the_store_at_open(
    private_redis: RedisServer, redis_admin: redis.Redis, url_of: object, said: str
) -> None:
    await redis_admin.config_set("requirepass", "right")
    try:
        assert callable(url_of)
        url = url_of(private_redis.port)
        if "/99" in url:
            url = url.replace("redis://", "redis://:right@")
        store = open_store(url)
        try:
            with pytest.raises(StoreMisconfigured, match=said):
                await store.open()
        finally:
            await store.close()
    finally:
        await redis_admin.config_set("requirepass", "")


async def test_a_read_only_replica_given_as_the_primary_stops_the_store_at_open(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It served reads, said ready, and refused every write: a load balancer kept it.
    (Asked again meanwhile: a primary endpoint failing over answers READONLY a moment.)"""
    monkeypatch.setattr(c, "READONLY_AT_START_S", 1.5)
    replica = RedisServer(
        appendonly=False, extra_args=["--replicaof", "127.0.0.1", str(private_redis.port)]
    ).start()
    try:
        store = open_store(replica.url)
        try:
            with pytest.raises(StoreMisconfigured, match="read only"):
                await store.open()
        finally:
            await store.close()
    finally:
        replica.close()


async def test_a_cluster_user_needs_only_the_listed_rights_and_the_cluster_ones() -> None:
    cluster = RedisClusterGroup(masters=3).start()
    try:
        rights = [*NEEDED, *CLUSTER_NEEDED]
        for port in cluster.master_ports():
            cluster.client(port).acl_setuser(
                "broker", enabled=True, passwords=["+pw"], keys=["broker:*"],
                commands=["-@all", *rights],
            )  # fmt: skip
        nodes = ",".join(f"127.0.0.1:{port}" for port in cluster.master_ports())
        broker = Broker(open_store(f"redis+cluster://broker:pw@{nodes}"))
        await broker.start()
        try:
            topic = f"rights-{uuid.uuid4().hex[:8]}"
            subscription = await broker.subscribe({topic: "now"})
            try:
                await broker.publish(topic, [NewEvent("1")], idempotency_key="k")
                events = await collect(subscription.chunks(), lambda got: len(got) >= 1)
                assert [e.data for e in events] == ["1"]
            finally:
                subscription.close()
            listed, _ = await broker.list_topics(topic, None, 10)
            assert [t.topic for t in listed] == [topic]
        finally:
            await broker.close()
    finally:
        cluster.close()


async def test_a_redis_read_only_for_a_moment_at_start_is_waited_for(
    private_redis: RedisServer, redis_admin: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A primary endpoint failing over by DNS or a virtual IP answers READONLY for a
    moment: a broker started then refused to start (and Kubernetes backed off)."""
    other = RedisServer(appendonly=False).start()
    try:
        await redis_admin.replicaof("127.0.0.1", other.port)
        store = open_store(private_redis.url)
        try:
            opening = asyncio.ensure_future(store.open())
            await await_until(lambda: "read only" in caplog.text, timeout=5, what="no READONLY met")
            await redis_admin.replicaof("no", "one")
            await asyncio.wait_for(opening, timeout=c.READONLY_AT_START_S + 5)
            assert (await store.append(f"rights-{uuid.uuid4().hex[:8]}", [NewEvent("1")])).ids
        finally:
            await store.close()
    finally:
        await redis_admin.replicaof("no", "one")
        other.close()


@pytest.mark.parametrize("login", ["", "nobody:pw@"])
async def test_rights_are_tried_once_a_redis_out_of_reach_at_start_answers(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture, login: str
) -> None:
    """A broker started while Redis was out of reach never tried its rights: a user
    Redis refuses (here: one it does not know) was met only as a 503 per request,
    nothing naming the cause. Now it is said once Redis answers: as an error naming
    the refusal, or that Redis grants what the broker needs."""
    private_redis.stop()
    store = open_store(f"redis://{login}127.0.0.1:{private_redis.port}/0")
    try:
        with caplog.at_level("INFO", "broker"):
            await store.open()  # out of reach: no refusal yet, the broker starts
            assert "refuses what the broker needs" not in caplog.text
            private_redis.start()
            said = "refuses what the broker needs" if login else "grants what the broker needs"
            await await_until(lambda: said in caplog.text, timeout=10, what=said)
        if login:
            [record] = [r for r in caplog.records if said in r.getMessage()]
            assert record.levelname == "ERROR" and "username-password" in record.getMessage()
    finally:
        await store.close()
