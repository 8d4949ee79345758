"""Redis beyond one server, for the suite: a Sentinel group and a Redis Cluster on loopback.

Every process is a real ``redis-server`` on a free 127.0.0.1 port with a directory
of its own (Sentinels rewrite their config file; cluster nodes write nodes.conf).
Every wait has a deadline, and a group that fails to come up stops what it started.

The helpers are synchronous (they talk to Redis with the blocking client); an
async test that must keep its event loop running while it waits calls them
through ``asyncio.to_thread``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis

from tests.support.polling import wait_until
from tests.support.redis_server import REDIS_SERVER, RedisServer, free_port, redis_ping
from tests.support.tls import TlsFiles

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
T = TypeVar("T")


def wait_for(condition: Callable[[], T | None], timeout: float, what: str) -> T:
    """``wait_until``, with Redis errors counted as "not yet": the node may be restarting."""
    return wait_until(  # type: ignore[return-value]
        condition, timeout=timeout, what=what, tolerate=(redis.RedisError, OSError)
    )


class _Clients:
    """One cached blocking client per port, so probing does not change connection counts."""

    def __init__(self) -> None:
        self._clients: dict[int, redis.Redis] = {}

    def __call__(self, port: int) -> redis.Redis:
        client = self._clients.get(port)
        if client is None:
            client = redis.Redis(
                host="127.0.0.1", port=port, socket_timeout=2.0, socket_connect_timeout=1.0
            )
            self._clients[port] = client
        return client

    def forget(self, port: int) -> None:
        client = self._clients.pop(port, None)
        if client is not None:
            client.close()

    def close(self) -> None:
        for port in list(self._clients):
            self.forget(port)


def _role(client: redis.Redis) -> str:
    info: Any = client.info("replication")
    return str(info["role"])


# -- Sentinel ---------------------------------------------------------------------


@dataclass
class SentinelProcess:
    """One ``redis-server --sentinel`` watching ``service``; its config file is its own."""

    primary_port: int
    service: str = "mymaster"
    quorum: int = 2
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    port: int = field(default_factory=free_port)
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sentinel-")))
    process: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> Path:
        config = self.directory / "sentinel.conf"
        config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            "protected-mode no\n"
            f"dir {self.directory}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {self.service} 1\n"
        )
        return config

    def start(self) -> SentinelProcess:
        config = self._write_config()
        self.process = subprocess.Popen(
            [REDIS_SERVER, str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.directory,
        )
        redis_ping(self.port)
        return self

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)


class SentinelGroup:
    """A primary, its replicas and three Sentinels (quorum 2) monitoring ``service``.

    Failover is quick on purpose: a primary is down after 1 s without answers.
    """

    def __init__(
        self, *, replicas: int = 1, service: str = "mymaster", down_after_ms: int = 1000
    ) -> None:
        self._down_after_ms = down_after_ms
        self.service = service
        self._replica_count = replicas
        self.servers: dict[int, RedisServer] = {}
        self.sentinels: list[SentinelProcess] = []
        self._clients = _Clients()
        self.primary_port = 0

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    def client(self, port: int) -> redis.Redis:
        """A blocking client of one server or Sentinel (cached)."""
        return self._clients(port)

    def start(self) -> SentinelGroup:
        try:
            primary = self._start_server(["--repl-diskless-sync-delay", "0"])
            self.primary_port = primary.port
            for _ in range(self._replica_count):
                self.add_replica(wait=False)
            self.wait_for_replicas(self._replica_count)
            for _ in range(3):
                sentinel = SentinelProcess(
                    primary.port, self.service, down_after_ms=self._down_after_ms
                )
                self.sentinels.append(sentinel.start())
            self.wait_until_monitored()
        except BaseException:
            self.close()
            raise
        return self

    def _start_server(self, extra_args: list[str]) -> RedisServer:
        server = RedisServer(appendonly=False, extra_args=extra_args).start()
        self.servers[server.port] = server
        return server

    def add_replica(self, *, wait: bool = True, timeout: float = 15.0) -> RedisServer:
        """Start one more replica of the current primary (and wait until it is in sync)."""
        replica = self._start_server(
            ["--replicaof", "127.0.0.1", str(self.primary_port), "--repl-diskless-sync-delay", "0"]
        )
        if wait:
            self.wait_for_replicas(1, timeout)
        return replica

    def wait_for_replicas(self, count: int, timeout: float = 15.0) -> None:
        """Until the current primary has ``count`` replicas online (synced, streaming)."""

        def online() -> bool:
            info: Any = self._clients(self.primary_port).info("replication")
            states = [v.get("state") for k, v in info.items() if k.startswith("slave")]
            return states.count("online") >= count

        wait_for(online, timeout, f"{count} replica(s) online on :{self.primary_port}")

    def wait_until_monitored(self, timeout: float = 20.0) -> None:
        """Until every Sentinel knows the primary, its replicas and the other Sentinels.

        Before that a failover could not gather its quorum or find a replica.
        """
        others = len(self.sentinels) - 1

        def ready(sentinel: SentinelProcess) -> bool:
            master: Any = self._clients(sentinel.port).sentinel_master(self.service)
            return bool(
                master["flags"] == "master"
                and master["num-other-sentinels"] >= others
                and master["num-slaves"] >= self._replica_count
            )

        for sentinel in self.sentinels:
            wait_for(lambda s=sentinel: ready(s), timeout, f"sentinel :{sentinel.port} ready")

    def current_primary_port(self) -> int:
        """The primary's port as the first Sentinel that answers names it."""
        for sentinel in self.sentinels:
            try:
                reply: Any = self._clients(sentinel.port).execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
                )
            except (redis.RedisError, OSError):
                continue
            return int(reply[1])
        raise RuntimeError("no Sentinel answered")

    def kill_primary(self) -> int:
        """SIGKILL the primary: a crash, with no chance to flush or hand over. Its port."""
        port = self.primary_port
        self._clients.forget(port)
        self.servers[port].stop(kill=True)
        return port

    def wait_for_failover(self, timeout: float = 30.0) -> int:
        """Until every Sentinel names a new primary that takes writes; its port."""
        old = self.primary_port

        def promoted() -> int | None:
            ports = {self._sentinel_view(s) for s in self.sentinels}
            if len(ports) != 1:
                return None
            port = ports.pop()
            if port == old or _role(self._clients(port)) != "master":
                return None
            return port

        self.primary_port = wait_for(promoted, timeout, f"failover away from :{old}")
        return self.primary_port

    def _sentinel_view(self, sentinel: SentinelProcess) -> int:
        reply: Any = self._clients(sentinel.port).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
        )
        return int(reply[1])

    def close(self) -> None:
        self._clients.close()
        for sentinel in self.sentinels:
            sentinel.close()
        for server in self.servers.values():
            server.close()
        self.sentinels.clear()
        self.servers.clear()


# -- Cluster ------------------------------------------------------------------------


CLUSTER_FORM_ATTEMPTS = 2


class ClusterNotFormed(RuntimeError):
    """``redis-cli --cluster create`` failed."""


class RedisClusterGroup:
    """A Redis Cluster of ``masters`` primaries, each with ``replicas`` replicas, on loopback.

    ``cluster-node-timeout`` is 1 s, so a replica takes over a killed primary's
    slots within a few seconds. With ``tls``, each node has a TLS port too
    (``tls_ports``, by plain port), and the nodes talk to each other over TLS; a
    client on a TLS port is told the others' TLS ports, the helpers here keep to the
    plain ones.
    """

    def __init__(self, *, masters: int = 3, replicas: int = 0, tls: TlsFiles | None = None) -> None:
        self._masters = masters
        self._replicas = replicas
        self._tls = tls
        self.servers: dict[int, RedisServer] = {}
        self.tls_ports: dict[int, int] = {}
        self._clients = _Clients()

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.servers)

    @property
    def live_ports(self) -> list[int]:
        return [port for port, server in self.servers.items() if server.process is not None]

    def client(self, port: int) -> redis.Redis:
        """A blocking client of one node (cached: probing opens no new connections)."""
        return self._clients(port)

    def start(self) -> RedisClusterGroup:
        """Start the nodes and form the cluster. ``redis-cli --cluster create`` once hung
        past its timeout on a loaded CI machine (its nodes never agreed): then the whole
        group starts again, on new ports, once."""
        for attempt in range(1, CLUSTER_FORM_ATTEMPTS + 1):
            try:
                for _ in range(self._masters * (1 + self._replicas)):
                    self._start_node()
                self._create()
                self.wait_until_ok()
                if self._replicas:
                    self.wait_for_replicas()
                return self
            except (subprocess.TimeoutExpired, ClusterNotFormed) as error:
                self.close()
                if attempt == CLUSTER_FORM_ATTEMPTS:
                    raise
                print(f"redis cluster did not form ({error}); starting it again", file=sys.stderr)
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    def _start_node(self) -> None:
        args = [
            "--cluster-enabled", "yes",
            "--cluster-node-timeout", "1000",
            # The bus port is chosen, not port + 10000: that may be over 65535.
            "--cluster-port", str(free_port()),
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        tls_port = free_port() if self._tls is not None else 0
        if self._tls is not None:
            args += self._tls.server_args(tls_port)
            args += ["--tls-cluster", "yes", "--tls-replication", "yes"]
        server = RedisServer(appendonly=False, extra_args=args).start()
        self.servers[server.port] = server
        if self._tls is not None:
            self.tls_ports[server.port] = tls_port

    def _create(self) -> None:
        nodes = [f"127.0.0.1:{port}" for port in self.servers]
        command = [REDIS_CLI, "--cluster", "create", *nodes]
        command += ["--cluster-replicas", str(self._replicas), "--cluster-yes"]
        done = subprocess.run(command, capture_output=True, timeout=45, check=False)
        if done.returncode != 0:
            raise ClusterNotFormed(
                f"redis-cli --cluster create failed: {done.stdout!r} {done.stderr!r}"
            )

    def wait_until_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and knows every slot's owner."""

        def ok(port: int) -> bool:
            info: Any = self.client(port).execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            return "cluster_state:ok" in text and "cluster_slots_ok:16384" in text

        for port in self.live_ports:
            wait_for(lambda p=port: ok(p), timeout, f"cluster_state:ok on :{port}")

    def wait_for_replicas(self, timeout: float = 30.0) -> None:
        """Until every primary streams to its replicas, so any of them can take over."""

        def synced(port: int) -> bool:
            info: Any = self.client(port).info("replication")
            states = [v.get("state") for k, v in info.items() if k.startswith("slave")]
            return states.count("online") >= self._replicas

        for port in self.master_ports():
            wait_for(lambda p=port: synced(p), timeout, f"replicas of :{port} online")

    def master_ports(self) -> list[int]:
        """The ports of the primaries that serve slots, as a live node sees them."""
        return sorted({owner for _, _, owner in self._slot_ranges()})

    def _slot_ranges(self) -> list[tuple[int, int, int]]:
        for port in self.live_ports:
            try:
                slots: Any = self.client(port).execute_command("CLUSTER", "SLOTS")
            except (redis.RedisError, OSError):
                continue
            return [(int(r[0]), int(r[1]), int(r[2][1])) for r in slots]
        raise RuntimeError("no cluster node answered CLUSTER SLOTS")

    def keyslot(self, key: str) -> int:
        return int(self.client(self.live_ports[0]).execute_command("CLUSTER", "KEYSLOT", key))

    def master_port_of(self, key: str) -> int:
        """The port of the primary serving ``key``'s slot."""
        slot = self.keyslot(key)
        for first, last, port in self._slot_ranges():
            if first <= slot <= last:
                return port
        raise RuntimeError(f"no node serves slot {slot}")

    def kill_master_of(self, key: str) -> int:
        """SIGKILL the primary serving ``key``'s slot; its port."""
        port = self.master_port_of(key)
        self._clients.forget(port)
        self.servers[port].stop(kill=True)
        return port

    def wait_for_failover(self, key: str, dead_port: int, timeout: float = 30.0) -> int:
        """Until a live node serves ``key``'s slot and the cluster is ok again; its port."""

        def taken_over() -> int | None:
            port = self.master_port_of(key)
            return port if port != dead_port and port in self.live_ports else None

        port = wait_for(taken_over, timeout, f"failover of {key} away from :{dead_port}")
        self.wait_until_ok(timeout)
        return port

    def node_id(self, port: int) -> str:
        reply: Any = self.client(port).execute_command("CLUSTER", "MYID")
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    def tryagain_replies(self) -> int:
        """How many TRYAGAIN errors the live nodes have answered (INFO errorstats)."""
        total = 0
        for port in self.live_ports:
            stats: Any = self.client(port).info("errorstats")
            total += int(stats.get("errorstat_TRYAGAIN", {}).get("count", 0))
        return total

    def connected_clients(self, port: int) -> int:
        info: Any = self.client(port).info("clients")
        return int(info["connected_clients"])

    def close(self) -> None:
        self._clients.close()
        for server in self.servers.values():
            server.close()
        self.servers.clear()
        self.tls_ports.clear()


class SlotMigration:
    """One slot moved from its primary to another, step by step, as ``redis-cli --cluster
    reshard`` does: IMPORTING on the target, MIGRATING on the source, its keys moved
    by MIGRATE, then SETSLOT NODE on the target, the source and the others."""

    def __init__(self, cluster: RedisClusterGroup, slot: int, source: int, target: int) -> None:
        self.cluster, self.slot, self.source, self.target = cluster, slot, source, target

    def begin(self) -> None:
        source_id, target_id = self.cluster.node_id(self.source), self.cluster.node_id(self.target)
        self.cluster.client(self.target).execute_command(
            "CLUSTER", "SETSLOT", self.slot, "IMPORTING", source_id
        )
        self.cluster.client(self.source).execute_command(
            "CLUSTER", "SETSLOT", self.slot, "MIGRATING", target_id
        )

    def move(self, *keys: str) -> None:
        """MIGRATE these keys to the target."""
        self.cluster.client(self.source).execute_command(
            "MIGRATE", "127.0.0.1", self.target, "", 0, 5000, "KEYS", *keys
        )

    def move_the_rest(self) -> None:
        """MIGRATE every key still on the source, ten at a time (redis-cli's pipeline)."""
        source = self.cluster.client(self.source)
        for _ in range(10_000):
            keys: Any = source.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 10)
            if not keys:
                return
            self.move(*(key.decode() for key in keys))
        raise AssertionError(f"slot {self.slot} never emptied")

    def finish(self) -> None:
        target_id = self.cluster.node_id(self.target)
        others = [p for p in self.cluster.master_ports() if p not in (self.source, self.target)]
        for port in (self.target, self.source, *others):
            self.cluster.client(port).execute_command(
                "CLUSTER", "SETSLOT", self.slot, "NODE", target_id
            )
