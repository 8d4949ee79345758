"""`python -m bench.delivery`: what delivering one event costs a broker process.

Every mode of the `sessions` bench pays the same delivery of each token to its viewer
(the live reader's `XREAD`, the hub, the framing, the write to the socket); the direct
mode pays nothing else. This measures that path alone, reproducibly:

- a private redis-server and one broker process (``broker serve``, one worker) on the
  ports given (``--port``: Redis there, the broker on the next);
- ``--topics`` topics, each with one SSE subscriber: a raw socket that only counts
  the events it reads (the cost of a client is not the broker's);
- rounds of one token to every topic, appended straight to Redis through the broker's
  own append script (``DirectPublisher``, as the bench's direct mode), pipelined in
  one write; a round ends once every subscriber has its token. So each round is the
  same work for the broker: a read that wakes with the first token, a 10 ms linger,
  a read that returns the rest, each subscriber written to once.

Two measures of the window after ``--warmup`` rounds:

- ``--callgrind``: the broker runs under ``valgrind --tool=callgrind`` with its
  instrumentation off until the window (``callgrind_control -i on``), dumped after it:
  instructions per delivered event, user space only (no syscall), which a machine
  shared with other work does not move. Always: the broker's CPU time (user and
  system, from /proc) per event, which it does.
- ``--broker-path``: the code the broker runs (a git worktree of another commit), so
  two builds are compared alternately against the same driver.

Run from the repository, e.g.:
``python -m bench.delivery --callgrind --runs 2 --broker-path /tmp/old --broker-path .``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx

from brokerclient.direct import DirectPublisher

EVENT_MARK = b"data: "
TOKEN = "tok"  # (one short token, as an LLM's)


class CountingReader(asyncio.Protocol):
    """An SSE subscriber that only counts the events it reads."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.events = 0
        self.live = False  # its stream's cursor came: caught up, nothing published is missed
        self._tail = b""  # a mark split between two reads is still counted once
        self.changed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        joined = self._tail + data
        self.events += joined.count(EVENT_MARK)
        self.live = self.live or b"id: " in joined
        # Keep what could start a mark, but never a whole one (counted already).
        self._tail = joined[-(len(EVENT_MARK) - 1) :]
        self.changed.set()


def topic_name(index: int) -> str:
    return f"deliver-{index}"


async def subscribe_all(port: int, topics: int) -> list[CountingReader]:
    loop = asyncio.get_running_loop()
    readers = []
    for index in range(topics):
        request = (
            f"GET /topics/{topic_name(index)}/events HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
        reader = CountingReader(request)
        await loop.create_connection(lambda r=reader: r, "127.0.0.1", port)  # type: ignore[misc]
        readers.append(reader)
    return readers


async def wait_for(readers: list[CountingReader], each: int, timeout: float) -> None:
    """Until every reader is live and has counted ``each`` events (or raise after
    ``timeout``)."""
    deadline = asyncio.get_running_loop().time() + timeout
    for reader in readers:
        while reader.events < each or not reader.live:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"a subscriber has {reader.events} events of {each}")
            reader.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.changed.wait(), left)


async def publish_round(publisher: DirectPublisher, topics: int) -> None:
    await asyncio.gather(*(publisher.publish_text(topic_name(i), TOKEN) for i in range(topics)))


def xread_calls(redis_port: int) -> int:
    """How many XREADs the redis-server ran so far (``INFO commandstats``): the broker's
    live reads, whose number per round moves the cost per event a little."""
    done = subprocess.run(
        ["redis-cli", "-p", str(redis_port), "info", "commandstats"],
        capture_output=True,
        check=True,
        timeout=10,
    )
    match = re.search(rb"cmdstat_xread:calls=(\d+)", done.stdout)
    return int(match.group(1)) if match else 0


def cpu_seconds(pid: int) -> float:
    """The process's user and system CPU so far, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def callgrind_control(pid: int, *args: str) -> None:
    subprocess.run(
        ["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120
    )


def py_spy(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the broker (collapsed stacks, ``--format raw``) until SIGINT."""
    binary = Path(sys.executable).with_name("py-spy")
    command = [str(binary), "record", "-p", str(pid), "-r", "500", "--format", "raw"]
    sampler = subprocess.Popen(
        [*command, "-o", str(output), "--nonblocking"], stdout=subprocess.DEVNULL
    )
    time.sleep(1)  # (it attaches)
    return sampler


def instructions_of(dump: Path) -> int:
    """The total of a callgrind dump (its ``summary:`` or ``totals:`` line: Ir)."""
    text = dump.read_text(errors="replace")
    match = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no total in {dump}")
    return int(match.group(1))


@contextlib.contextmanager
def redis_server(port: int) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="deliver-redis-") as directory:
        options = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory]
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), *options], stdout=subprocess.DEVNULL
        )
        try:
            for _ in range(200):  # bounded: 10 s
                done = subprocess.run(
                    ["redis-cli", "-p", str(port), "ping"], capture_output=True, check=False
                )
                if done.stdout.strip() == b"PONG":
                    break
                time.sleep(0.05)
            if process.poll() is not None:  # (the PONG was another server's)
                raise RuntimeError(f"redis-server exited: is port {port} taken?")
            yield f"redis://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=10)


@contextlib.contextmanager
def broker_process(
    code: Path,
    port: int,
    redis_url: str,
    callgrind_out: Path | None,
    settings: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``broker serve`` of ``code``, healthy; ``settings``: its ``BROKER_*`` variables
    (none of the caller's)."""
    command = [sys.executable, "-c", "from api.cli import main; main()", "serve"]
    command += ["--port", str(port), "--redis-url", redis_url, "--workers", "1"]
    if callgrind_out is not None:
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
        command = [*valgrind, f"--callgrind-out-file={callgrind_out}", *command]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["PYTHONPATH"] = str(code)
    env["BROKER_LOG_LEVEL"] = "warning"
    env.update(settings or {})
    process = subprocess.Popen(
        command, env=env, cwd=code, start_new_session=True, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("the broker exited before it was healthy")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise TimeoutError("the broker was not healthy in 180 s")
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


async def drive(
    port: int, redis_url: str, args: argparse.Namespace, broker: subprocess.Popen[bytes]
) -> dict[str, float]:
    """Warm up, then measure ``args.rounds`` rounds; the figures per delivered event."""
    publisher = DirectPublisher(redis_url, topic_ttl_seconds=None)
    timeout = 600.0 if args.callgrind else 30.0
    try:
        await publish_round(publisher, args.topics)  # every topic's log exists
        readers = await subscribe_all(port, args.topics)
        await wait_for(readers, 0, timeout)
        for done in range(1, args.warmup + 1):
            await publish_round(publisher, args.topics)
            await wait_for(readers, done, timeout)
        before, reads_before = cpu_seconds(broker.pid), xread_calls(args.port)
        if args.callgrind:
            callgrind_control(broker.pid, "--instr=on")
        sampler = py_spy(broker.pid, args.py_spy) if args.py_spy else None
        for done in range(args.warmup + 1, args.warmup + args.rounds + 1):
            await publish_round(publisher, args.topics)
            await wait_for(readers, done, timeout)
        if sampler is not None:
            sampler.send_signal(signal.SIGINT)  # (py-spy writes its file on SIGINT)
            sampler.wait(timeout=60)
        if args.callgrind:
            callgrind_control(broker.pid, "--dump=window")
            callgrind_control(broker.pid, "--instr=off")
        cpu = cpu_seconds(broker.pid) - before
        reads = xread_calls(args.port) - reads_before
    finally:
        await publisher.aclose()
    events = args.rounds * args.topics
    return {
        "events": events,
        "reads_per_round": reads / args.rounds,
        "cpu_us_per_event": cpu * 1e6 / events,
    }


def run_once(code: Path, args: argparse.Namespace) -> dict[str, float]:
    async def window(redis_url: str, broker: subprocess.Popen[bytes]) -> dict[str, float]:
        return await drive(args.port + 1, redis_url, args, broker)

    return counted_run(code, args, window, "event")


Drive = Callable[[str, "subprocess.Popen[bytes]"], Coroutine[Any, Any, dict[str, float]]]


def counted_run(
    code: Path,
    args: argparse.Namespace,
    window: Drive,
    unit: str,
    settings: dict[str, str] | None = None,
) -> dict[str, float]:
    """One run of a driver's ``window`` (given the Redis URL and the broker process, it
    returns its figures, ``{unit}s`` among them) against a private redis-server and a
    broker running ``code``; with ``--callgrind``, the instructions per ``unit`` too
    (and the dump kept with ``--keep``). Shared by this driver and bench.publishing."""
    with tempfile.TemporaryDirectory(prefix="broker-cg-") as directory:
        out = Path(directory) / "callgrind.out" if args.callgrind else None
        with redis_server(args.port) as redis_url:
            with broker_process(code, args.port + 1, redis_url, out, settings) as broker:
                figures = asyncio.run(window(redis_url, broker))
        if out is not None:
            dumps = [p for p in Path(directory).iterdir() if p.name != out.name]
            figures[f"ir_per_{unit}"] = instructions_of(dumps[0]) / figures[f"{unit}s"]
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                target = args.keep / f"{code.resolve().name}-{time.time_ns()}.callgrind"
                target.write_bytes(dumps[0].read_bytes())
                figures["dump"] = str(target)  # type: ignore[assignment]
    return figures


def add_run_options(parser: argparse.ArgumentParser, *, py_spy: bool = True) -> None:
    """The options every driver shares: how many runs, of which builds, measured how."""
    parser.add_argument("--runs", type=int, default=1, help="runs of each build, alternating")
    parser.add_argument("--callgrind", action="store_true", help="count instructions")
    if py_spy:
        parser.add_argument("--py-spy", type=Path, help="sample the window with py-spy into this")
    parser.add_argument("--keep", type=Path, help="keep each callgrind dump in this directory")
    parser.add_argument(
        "--broker-path", type=Path, action="append", help="the code the broker runs (repeatable)"
    )


def alternate(
    args: argparse.Namespace, run: Callable[[Path], dict[str, float]], label: str = ""
) -> None:
    """``--runs`` runs of each ``--broker-path`` build (the working tree's if none),
    alternating (a shared machine drifts: alternated, both see its drift), each printed."""
    builds = args.broker_path or [Path.cwd()]
    for number in range(args.runs):
        for code in builds:
            figures = run(code)
            shown = ", ".join(
                # (a ratio, under 10, to three places; the rest to one)
                (f"{k} {v:,.3f}" if abs(v) < 10 else f"{k} {v:,.1f}")
                if isinstance(v, float)
                else f"{k} {v}"
                for k, v in figures.items()
            )
            print(f"run {number + 1} {code}{label}: {shown}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=47900, help="Redis; the broker the next")
    parser.add_argument("--topics", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    add_run_options(parser)
    args = parser.parse_args()
    alternate(args, lambda code: run_once(code, args))


if __name__ == "__main__":
    main()
