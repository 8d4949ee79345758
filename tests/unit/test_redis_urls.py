"""``BROKER_REDIS_URL``s: what each client is given from one, and every URL that would
connect otherwise than it says refused by ``open_store``, without showing its password.

Stores are built here but never opened: nothing connects."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from broker.redis_open import URL_SCHEMES, check_redis_url, open_store
from broker.redis_store import RedisStreamStore
from broker.redis_urls import REDIS_PORT, SENTINEL_PORT, split_servers_url

PASSWORD = "s3cr/et"
QUOTED = "s3cr%2Fet"


@pytest.fixture
async def opened() -> AsyncIterator[Callable[[str], RedisStreamStore]]:
    """``open_store`` (no connection is made until ``open``), each store closed after."""
    stores: list[RedisStreamStore] = []

    def make(url: str) -> RedisStreamStore:
        stores.append(open_store(url, durability="replicated"))
        return stores[-1]

    yield make
    for store in stores:
        await store.close()


def test_a_cluster_url_is_split_into_hosts_credentials_path_and_options() -> None:
    url = split_servers_url(
        f"rediss+cluster://c%40u:{QUOTED}@n1:7000,n2,10.0.0.3:7002/?ssl_cert_reqs=none",
        REDIS_PORT,
    )
    assert url.hosts == [("n1", 7000), ("n2", 6379), ("10.0.0.3", 7002)]
    assert (url.username, url.password) == ("c@u", PASSWORD)
    assert (url.path, url.query) == ("", {"ssl_cert_reqs": "none"})


def test_a_sentinel_url_with_a_password_only_has_no_username() -> None:
    url = split_servers_url("redis+sentinel://:pw@s1,s2:26380/m1/2", SENTINEL_PORT)
    assert url.hosts == [("s1", 26379), ("s2", 26380)]
    assert (url.username, url.password, url.path) == (None, "pw", "m1/2")


def cluster_kwargs(store: RedisStreamStore) -> dict[str, Any]:
    return store._client.connection_kwargs  # type: ignore[union-attr]


def picked(options: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """``options`` cut to ``wanted``'s names, for a readable comparison."""
    return {name: options.get(name) for name in wanted}


async def test_a_cluster_urls_username_reaches_every_client(
    opened: Callable[[str], RedisStreamStore],
) -> None:
    """The cluster client, its per-node clients (WAIT) and the live reader's clients."""
    store = opened(f"redis+cluster://cu:{QUOTED}@127.0.0.1:1")
    assert cluster_kwargs(store)["username"] == "cu"
    assert cluster_kwargs(store)["password"] == PASSWORD
    node = store._open_node_client("127.0.0.1", 1)
    assert node.connection_pool.connection_kwargs["username"] == "cu"
    await node.aclose()
    assert store._live._options["username"] == "cu"  # type: ignore[union-attr]


async def test_a_sentinel_urls_username_reaches_both_primary_pools(
    opened: Callable[[str], RedisStreamStore],
) -> None:
    store = opened(f"redis+sentinel://svc:{QUOTED}@127.0.0.1:1/m1/3")
    command_pool = store._client.connection_pool  # type: ignore[union-attr]
    reader_pool = store._live._reader.connection_pool  # type: ignore[union-attr]
    for pool in (command_pool, reader_pool):
        assert pool.connection_kwargs["username"] == "svc"
        assert pool.connection_kwargs["password"] == PASSWORD
        assert pool.connection_kwargs["db"] == 3


async def test_a_tls_clusters_options_reach_every_client(
    opened: Callable[[str], RedisStreamStore],
) -> None:
    options = "ssl_ca_certs=/ca.pem&ssl_cert_reqs=none&ssl_check_hostname=false"
    options += "&ssl_certfile=/c.pem&ssl_keyfile=/k.pem"
    store = opened(f"rediss+cluster://127.0.0.1:1/?{options}")
    wanted = {
        "ssl_ca_certs": "/ca.pem",
        "ssl_cert_reqs": "none",
        "ssl_check_hostname": False,
        "ssl_certfile": "/c.pem",
        "ssl_keyfile": "/k.pem",
    }
    assert picked(cluster_kwargs(store), wanted) == wanted
    node = store._open_node_client("127.0.0.1", 1)
    assert picked(node.connection_pool.connection_kwargs, wanted) == wanted
    await node.aclose()
    reader = store._live._options  # type: ignore[union-attr]
    assert picked(reader, wanted | {"ssl": True}) == wanted | {"ssl": True}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:6379/abc", "path is its database number"),
        ("rediss://127.0.0.1:6379/0/1", "path is its database number"),
        ("redis+sentinel://127.0.0.1/m1/abc", "database is a number"),
        ("redis+sentinel://127.0.0.1/m1/0?x=1", "takes no option"),
        ("redis+sentinel://127.0.0.1", "names its service"),
        ("rediss+sentinel://127.0.0.1/m1", "TLS with Sentinel is not supported"),
        ("rediss+cluster://127.0.0.1:7000?ssl_ca_certs=/ca.pem&ssl_verify=no", "'ssl_verify'"),
        ("rediss+cluster://127.0.0.1:7000/?ssl_cert_reqs=maybe", "ssl_cert_reqs is one of"),
        ("rediss+cluster://127.0.0.1:7000/?ssl_check_hostname=off", "true or false"),
        ("redis+cluster://127.0.0.1:7000/?ssl_ca_certs=/ca.pem", "is a TLS option"),
        ("redis+cluster://127.0.0.1:7000/1", "empty or /0"),
        ("redis+cluster://127.0.0.1:70x0", "is not host[:port]"),
        ("redis+cluster://127.0.0.1:7000/?a=1&a=2", "twice"),
        ("foo+cluster://127.0.0.1:7000", "unknown Redis URL scheme"),
    ],
)
def test_a_url_that_would_connect_otherwise_than_it_says_is_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        open_store(url)


@pytest.mark.parametrize("url", ["http://redis.test", "127.0.0.1:6379", "sentinel://h/m"])
def test_an_unknown_scheme_is_told_with_every_scheme_the_broker_takes(url: str) -> None:
    """redis-py's message named redis://, rediss:// and unix:// only."""
    with pytest.raises(ValueError) as refused:
        check_redis_url(url)
    assert all(f"{scheme}://" in str(refused.value) for scheme in URL_SCHEMES)
    assert "redis+sentinel://" in str(refused.value) and "rediss+cluster://" in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hun/ter2@127.0.0.1:6379/0",  # an unencoded "/" in the password
        "redis+cluster://u:hun?ter2@127.0.0.1:7000",
        "redis+sentinel://u:hun#ter2@127.0.0.1/m1",
    ],
)
def test_a_refused_url_does_not_show_its_password(url: str) -> None:
    with pytest.raises(ValueError, match="percent-encode") as refused:
        open_store(url)
    assert "ter2" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379",
        "redis://127.0.0.1:6379/",
        "redis://127.0.0.1:6379/12",
        "redis://127.0.0.1:6379/?db=2",
        "unix:///run/redis.sock?db=1",
        "redis+sentinel://127.0.0.1/m1",
        "redis+sentinel://127.0.0.1/m1/2",
        "redis+cluster://127.0.0.1:7000/",
        "rediss+cluster://127.0.0.1:7000/0?ssl_cert_reqs=required&ssl_check_hostname=yes",
    ],
)
async def test_urls_that_say_what_they_get_are_taken(
    url: str, opened: Callable[[str], RedisStreamStore]
) -> None:
    opened(url)
