"""Running it: ``broker serve`` on the embedded store, on Redis URLs, flags over variables,
and the ASGI factory under plain uvicorn."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.http.helpers import (
    metric_value,
    new_topic,
    read_metric,
)
from tests.support.broker_process import BROKER_BIN, BrokerProcess
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer, free_port


def _publish_and_read(base_url: str) -> None:
    topic = new_topic()
    with httpx.Client(base_url=base_url, timeout=10) as client:
        answer = client.post(f"/topics/{topic}/events", json={"data": "works"})
        assert answer.status_code == 201, answer.text
        page = client.get(f"/topics/{topic}/events", headers={"Accept": "application/json"})
        assert [e["data"] for e in page.json()["events"]] == ["works"]
        assert client.get("/readyz").status_code == 200


def test_the_embedded_store_says_so_in_its_first_log_line() -> None:
    process = BrokerProcess(redis_url=None).start()
    try:
        _publish_and_read(process.url)
        first = next(line for line in process.log().splitlines() if line.strip()).lower()
        assert "embedded" in first, first
        assert "not durable" in first, first
        assert "single instance" in first, first
    finally:
        process.close()


def test_web_concurrency_does_not_split_the_embedded_store() -> None:
    """uvicorn.run takes its worker count from WEB_CONCURRENCY (a PaaS sets it): two
    workers on one port, each with its own embedded store, held one topic in two
    halves (two epochs, and each reconnect a gap). The broker runs one process."""
    process = BrokerProcess(redis_url=None, env={"WEB_CONCURRENCY": "2"}).start()
    topic = new_topic()
    try:
        epochs = set()
        for n in range(6):  # a new connection each: the kernel spreads them
            answer = httpx.post(f"{process.url}/topics/{topic}/events", json={"data": n})
            assert answer.status_code == 201, answer.text
            epochs.add(answer.json()["id"].split(".")[0])
        assert httpx.get(f"{process.url}/topics/{topic}").json()["length"] == 6
        assert len(epochs) == 1, epochs
        assert "WEB_CONCURRENCY is ignored" in process.log()
    finally:
        process.close()


@pytest.mark.parametrize("value", ["", "auto"])
def test_web_concurrency_that_is_no_number_leaves_the_workers_alone(
    redis_server: RedisServer, value: str
) -> None:
    """Each ``--workers`` worker's uvicorn read WEB_CONCURRENCY and failed on a value that
    is no number: every worker exited at start, and was started again, for good."""
    env = {"WEB_CONCURRENCY": value}
    process = BrokerProcess(redis_url=redis_server.url, workers=2, env=env).start()
    try:
        _publish_and_read(process.url)
        assert "starting another" not in process.log()
    finally:
        _stop(process)


def test_replicated_durability_without_redis_stops_the_broker() -> None:
    """The embedded store has no replica: its publishes were answered 201 as if a
    replica had them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    result = subprocess.run(
        [sys.executable, "-m", "api.cli", "serve", "--port", str(free_port())],
        env=env | {"BROKER_PUBLISH_DURABILITY": "replicated"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "BROKER_PUBLISH_DURABILITY=replicated needs BROKER_REDIS_URL" in result.stderr


def test_a_flag_beats_its_variable(redis_server: RedisServer) -> None:
    """BROKER_PORT and BROKER_REDIS_URL point nowhere; --port and --redis-url win."""
    process = BrokerProcess(
        redis_url=redis_server.url,
        env={"BROKER_PORT": str(free_port()), "BROKER_REDIS_URL": "redis://127.0.0.1:1/0"},
    ).start()
    try:
        _publish_and_read(process.url)  # on --port, with --redis-url's store
    finally:
        process.close()


@pytest.fixture
def unix_redis() -> Iterator[RedisServer]:
    socket_path = Path("/tmp") / f"redis-{new_topic()}.sock"  # short: sun_path is 108 bytes
    server = RedisServer(extra_args=["--unixsocket", str(socket_path), "--unixsocketperm", "700"])
    server.start()
    try:
        yield server
    finally:
        server.close()
        socket_path.unlink(missing_ok=True)


def test_a_unix_socket_redis_url(unix_redis: RedisServer) -> None:
    socket_path = unix_redis.extra_args[1]
    process = BrokerProcess(redis_url=f"unix://{socket_path}").start()
    try:
        _publish_and_read(process.url)
    finally:
        process.close()


def test_the_asgi_factory_under_plain_uvicorn(redis_server: RedisServer) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_REDIS_URL"] = redis_server.url
    uvicorn = Path(sys.executable).with_name("uvicorn")
    process = subprocess.Popen(
        [str(uvicorn), "--factory", "api.app:create_app", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parents[2],
    )
    base_url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, "uvicorn exited"
        try:
            return httpx.get(base_url + "/healthz", timeout=0.5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, timeout=20, what="uvicorn never became healthy")
        _publish_and_read(base_url)
        ready = httpx.get(base_url + "/readyz").json()
        assert "redis" in str(ready).lower(), ready  # the variable chose the store
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_several_workers_serve_one_deployment(redis_server: RedisServer) -> None:
    """``--workers 2``: every connection sees the same topics; /metrics sums the workers."""
    process = BrokerProcess(redis_url=redis_server.url, workers=2).start()
    topic = new_topic()
    try:
        ids = []
        for n in range(6):  # fresh connections, so both workers take some
            with httpx.Client(base_url=process.url, timeout=10) as client:
                answer = client.post(f"/topics/{topic}/events", json={"data": n})
                assert answer.status_code == 201, answer.text
                ids.append(answer.json()["id"])
        with httpx.Client(base_url=process.url, timeout=10) as client:
            page = client.get(f"/topics/{topic}/events", headers={"Accept": "application/json"})
            assert [e["id"] for e in page.json()["events"]] == ids

            def summed() -> bool:  # each worker flushes its counts within a second
                metrics = client.get("/metrics")
                assert metrics.status_code == 200
                answers = {"route": "publish", "status": "201"}
                return (
                    metric_value(metrics.text, "broker_published_events_total") == 6
                    and metric_value(metrics.text, "broker_http_responses_total", answers) == 6
                )

            what = "/metrics never summed both workers' publishes and their answers"
            wait_until(summed, timeout=5, what=what)
    finally:
        process.close()


# -- the supervisor and its workers (``--workers 2``) ---------------------------------
#
# Worker processes are found through /proc: the supervisor's children started by
# multiprocessing's spawn (not its resource tracker).

PROC = Path("/proc")
WORKER_DEADLINE = 10.0


def _worker_pids(supervisor: int) -> list[int]:
    children: list[int] = []
    for task in (PROC / str(supervisor) / "task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    return sorted(pid for pid in children if b"spawn_main" in _cmdline(pid))


def _cmdline(pid: int) -> bytes:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped yet."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def _two_workers(process: BrokerProcess) -> list[int]:
    assert process.process is not None
    supervisor = process.process.pid
    return wait_until(
        lambda: len(pids := _worker_pids(supervisor)) == 2 and pids,
        timeout=WORKER_DEADLINE,
        what="the supervisor never showed two workers",
    )


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _stop(process: BrokerProcess) -> None:
    """Stop the broker and, whatever the code under test does, every worker it has."""
    if process.process is None:
        return
    if process.process.poll() is not None:  # (stopped already, its workers with it)
        process.close()
        return
    workers = _worker_pids(process.process.pid)
    try:
        process.terminate()
    finally:
        _kill_all(workers)
        process.close()


def test_workers_exit_when_their_supervisor_is_killed(redis_server: RedisServer) -> None:
    """A killed supervisor must not leave workers serving its port (old code, via
    SO_REUSEPORT, beside whatever broker is started there next)."""
    process = BrokerProcess(redis_url=redis_server.url, workers=2).start()
    workers = _two_workers(process)
    try:
        process.kill()  # SIGKILL: no handler runs in the supervisor
        wait_until(
            lambda: all(_gone(pid) for pid in workers),
            timeout=WORKER_DEADLINE,
            what=f"workers {workers} outlived their supervisor",
        )
        assert _refuses(process.port), "the port still takes connections"
    finally:
        _kill_all(workers)
        process.close()


def test_a_draining_supervisor_takes_no_connection_it_cannot_answer(
    redis_server: RedisServer,
) -> None:
    """While a worker drains (a publish whose body is still coming holds it), a new
    connection must be refused, which a proxy retries on another broker. The
    supervisor kept its copies of the listening sockets open: the kernel accepted
    connections into them that nobody read, and reset them when it exited (502s)."""
    process = BrokerProcess(redis_url=redis_server.url, workers=2).start()
    workers = _two_workers(process)
    assert process.process is not None
    with socket.create_connection(("127.0.0.1", process.port), timeout=10) as held:
        try:
            held.sendall(
                b"POST /topics/held/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )
            holder = wait_until(
                lambda: next((p for p in workers if _established(p, process.port)), None),
                timeout=WORKER_DEADLINE,
                what="no worker took the publish",
            )
            process.process.send_signal(signal.SIGTERM)
            wait_until(
                lambda: _refuses(process.port) or _gone(holder),
                timeout=WORKER_DEADLINE,
                what="the broker neither refused connections nor ended its drain",
            )
            # Refused while the held publish still holds its worker's drain (5 s):
            assert not _gone(holder), "connections were taken until the drain ended"
        finally:
            _kill_all(workers)
            process.close()


def test_a_second_broker_with_workers_on_a_taken_port_stops(redis_server: RedisServer) -> None:
    """SO_REUSEPORT let a second ``--workers 2`` broker join the first one's port with
    no error: clients were split between two brokers (another code, another Redis)."""
    first = BrokerProcess(redis_url=redis_server.url, workers=2).start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        second = subprocess.run(
            [
                *(sys.executable, "-m", "api.cli", "serve", "--port", str(first.port)),
                *("--workers", "2", "--redis-url", redis_server.url),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert second.returncode != 0
        assert "is in use" in second.stderr, second.stderr
    finally:
        _stop(first)


def _open_stream(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        f"GET /topics/{new_topic()}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    received = b""
    while b"\n\n" not in received:  # the retry hint: the subscription is open
        chunk = sock.recv(4096)
        assert chunk, f"the stream ended early: {received!r}"
        received += chunk
    return sock


def _established(pid: int, port: int) -> int:
    """How many connections to ``port`` the process ``pid`` holds."""
    inodes = set()
    for fd in (PROC / str(pid) / "fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for line in (PROC / "net" / "tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        count += local_port == port and fields[3] == "01" and fields[9] in inodes
    return count


def test_a_killed_worker_is_replaced_and_its_streams_stop_counting(
    redis_server: RedisServer,
) -> None:
    process = BrokerProcess(redis_url=redis_server.url, workers=2).start()
    workers = _two_workers(process)
    streams: list[socket.socket] = []
    try:
        for _ in range(32):  # bounded: until the worker to kill holds some streams
            streams.append(_open_stream(process.port))
            if _established(workers[0], process.port) >= 2:
                break
        held = _established(workers[0], process.port)
        assert held >= 2, "the kernel sent no streams to the first worker"
        wait_until(
            lambda: read_metric(process.url, "broker_connected_subscribers") == len(streams),
            timeout=WORKER_DEADLINE,
            what="the gauge never counted every open stream",
        )
        os.kill(workers[0], signal.SIGKILL)
        supervisor = process.process.pid if process.process else 0
        wait_until(
            lambda: len(pids := _worker_pids(supervisor)) == 2 and workers[0] not in pids,
            timeout=WORKER_DEADLINE,
            what="the killed worker was not replaced",
        )
        _publish_and_read(process.url)
        wait_until(
            lambda: read_metric(process.url, "broker_connected_subscribers") == len(streams) - held,
            timeout=WORKER_DEADLINE,
            what="the dead worker's streams still count as connected",
        )
    finally:
        for stream in streams:
            stream.close()
        _stop(process)


def test_a_clean_stop_removes_the_metrics_directory(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The supervisor made a PROMETHEUS_MULTIPROC_DIR (in TMPDIR); it removes it on exit."""
    process = BrokerProcess(
        redis_url=redis_server.url, workers=2, env={"TMPDIR": str(tmp_path)}
    ).start()
    try:
        [made] = list(tmp_path.glob("broker-prom-*"))
        assert made.is_dir()
        assert process.terminate() == 0, process.log()
        assert not made.exists(), "the metrics directory outlived the broker"
    finally:
        _stop(process)


WATCHED_CHILD = """
import os, signal, sys, time
from api.workers import _watch_parent
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
_watch_parent(os.getppid())
print(os.getpid(), flush=True)
time.sleep(60)
"""
PARENT = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', sys.argv[1]]).wait()"


def test_without_prctl_the_watch_alone_ends_an_orphaned_worker() -> None:
    """The fallback for systems without PR_SET_PDEATHSIG: the parent-pid watch."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, WATCHED_CHILD],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait(timeout=10)
        wait_until(lambda: _gone(child), timeout=WORKER_DEADLINE, what="the orphan kept running")
    finally:
        parent.kill()
        parent.wait(timeout=10)
        if child:
            _kill_all([child])
        if parent.stdout is not None:
            parent.stdout.close()


def _evicting_once_both_serve(process: BrokerProcess, server: RedisServer) -> redis.Redis:
    """Redis made to evict (a worker cannot start on it) once both workers serve (one
    still starting would fail on it); a client of it, to make it right again."""
    wait_until(
        lambda: process.log().count("Application startup complete") == 2,
        timeout=WORKER_DEADLINE,
        what="the two workers did not both start",
    )
    admin = redis.Redis(port=server.port)
    admin.config_set("maxmemory", 100 * 1024 * 1024)
    admin.config_set("maxmemory-policy", "allkeys-lru")
    return admin


def test_a_worker_that_cannot_start_while_others_serve_does_not_stop_the_broker() -> None:
    """A worker restarted while Redis briefly refuses it (here: it may evict; in life, a
    primary endpoint answering READONLY during a failover) is tried again later, the
    other worker serving meanwhile: the whole broker stopped with it. Once Redis is
    right again, the worker starts."""
    server = RedisServer(appendonly=False).start()
    process = BrokerProcess(redis_url=server.url, workers=2).start()
    try:
        workers = _two_workers(process)
        admin = _evicting_once_both_serve(process, server)
        os.kill(workers[0], signal.SIGKILL)
        wait_until(
            lambda: "starting another in 1.0 s" in process.log(),
            timeout=WORKER_DEADLINE,
            what="the worker that could not start was not tried again",
        )
        assert process.process is not None and process.process.poll() is None, process.log()
        assert httpx.get(f"{process.url}/healthz", timeout=5).status_code == 200
        admin.config_set("maxmemory-policy", "noeviction")
        wait_until(
            lambda: (
                len(pids := _worker_pids(process.process.pid)) == 2
                and workers[0] not in pids
                and "Application startup complete" in process.log().rsplit("starting another", 1)[1]
            ),
            timeout=WORKER_DEADLINE * 3,
            what="the worker did not start once Redis was right again",
        )
        admin.close()
    finally:
        _stop(process)
        server.close()


def test_the_broker_stops_once_no_worker_serves_and_none_can_start() -> None:
    """Every worker gone while Redis refuses them: the supervisor waited, serving
    nothing, its port free for another broker to take (review). It stops, exit 3."""
    server = RedisServer(appendonly=False).start()
    process = BrokerProcess(redis_url=server.url, workers=2).start()
    try:
        workers = _two_workers(process)
        _evicting_once_both_serve(process, server).close()
        os.kill(workers[0], signal.SIGKILL)
        wait_until(
            lambda: "starting another in 1.0 s" in process.log(),
            timeout=WORKER_DEADLINE,
            what="the worker that could not start was not tried again",
        )
        os.kill(workers[1], signal.SIGKILL)
        assert process.process is not None
        assert process.process.wait(timeout=WORKER_DEADLINE * 2) == 3, process.log()
    finally:
        _stop(process)
        server.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_hangup_drains_as_a_sigterm_does(
    redis_server: RedisServer, tmp_path: Path, workers: int
) -> None:
    """SIGHUP (a terminal closed, a tool that means "reload") killed the broker at once:
    every stream cut without the end of its body, nothing logged, and (with workers)
    the metrics directory left behind. It drains and stops as on SIGTERM."""
    env = {"TMPDIR": str(tmp_path)}
    process = BrokerProcess(redis_url=redis_server.url, workers=workers, env=env).start()
    try:
        with _open_stream(process.port) as sock:
            received = b""
            assert process.process is not None
            process.process.send_signal(signal.SIGHUP)
            while not received.endswith(b"0\r\n\r\n"):  # the chunked body's clean end
                chunk = sock.recv(4096)
                assert chunk, f"the stream was cut without its end: {received[-200:]!r}"
                received += chunk
        assert process.process.wait(timeout=30) == 0, process.log()
        assert "SIGHUP" in process.log()
        assert not list(tmp_path.glob("broker-prom-*")), "the metrics directory outlived it"
    finally:
        _stop(process)


def _listeners_on(port: int) -> int:
    """Listening TCP sockets on ``port`` (IPv4), from /proc/net/tcp."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(
        1 for row in rows if row.split()[1].endswith(f":{port:04X}") and row.split()[3] == "0A"
    )


def test_workers_on_port_zero_share_the_port_the_log_names(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """``--port 0`` with workers: each worker bound a port of its own (connections split
    over ports nobody knew), and no line said where the broker listened."""
    log_path, url = tmp_path / "broker.log", redis_server.url
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [str(BROKER_BIN), "serve", "--port", "0", "--workers", "2", "--redis-url", url],
            env=env | {"TMPDIR": str(tmp_path)},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        said = wait_until(
            lambda: re.search(r"2 workers on http://127\.0\.0\.1:(\d+)", log_path.read_text()),
            timeout=30,
            what="the line naming where the workers listen",
        )
        port = int(said.group(1))
        wait_until(lambda: _listeners_on(port) == 2, timeout=30, what="both workers on the port")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _ignored_signals(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]


@pytest.mark.parametrize("workers", [1, 2])
def test_under_nohup_a_hangup_stays_ignored(redis_server: RedisServer, workers: int) -> None:
    """``nohup broker serve``: SIGHUP ignored, a closed terminal leaves it running. The
    drain on SIGHUP replaced that: a closed SSH session stopped a nohup'd broker."""
    hup = 1 << (signal.SIGHUP - 1)
    process = BrokerProcess(redis_url=redis_server.url, workers=workers, ignore_hangups=True)
    process.start()
    try:
        assert process.process is not None
        pids = [process.process.pid, *(_worker_pids(process.process.pid) if workers > 1 else [])]
        assert len(pids) == workers + (1 if workers > 1 else 0)
        for pid in pids:
            assert _ignored_signals(pid) & hup, f"process {pid} no longer ignores SIGHUP"
    finally:
        _stop(process)


def test_uvicorns_lines_carry_the_time_as_the_brokers_own_do(redis_server: RedisServer) -> None:
    """uvicorn's start, errors and access log had no time: an operator could not line
    them up with the broker's own."""
    process = BrokerProcess(redis_url=redis_server.url, env={"BROKER_ACCESS_LOG": "true"}).start()
    try:
        assert httpx.get(f"{process.url}/healthz", timeout=5).status_code == 200
        stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
        wait_until(
            lambda: re.search(rf"^{stamp}INFO: .*GET /healthz", process.log(), re.M),
            timeout=10,
            what="the access log line, with its time",
        )
        assert re.search(rf"^{stamp}INFO: .*Started server process", process.log(), re.M)
    finally:
        process.close()
