"""``broker serve``: run the service under uvicorn (uvloop, httptools, lean streams).

A flag beats its ``BROKER_*`` variable: flags are written into the environment
before uvicorn starts, so every worker process builds the same Settings. Imported
by ``api.cli`` for ``serve`` alone: the client commands never load the server side.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
from typing import Any

import uvicorn

from api.lifecycle import drain_on_hangup
from api.settings import Settings, settings_from_environment
from api.workers import PortTaken, Supervisor

log = logging.getLogger("api.cli")  # (the name its lines had before serve.py was split out)


def run_serve(args: argparse.Namespace) -> None:
    """``broker serve``, its flags parsed: runs until the service stops."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = _apply_flags(args)
    _announce_store(settings)
    serve(settings)


def _apply_flags(args: argparse.Namespace) -> Settings:
    """The settings, flags written over their variables; exits (``SettingsRefused``) on
    a mistyped or unusable one, naming it: never start open."""
    for name in ("host", "port", "redis_url", "workers"):
        value = getattr(args, name)
        if value is not None:
            os.environ[f"BROKER_{name.upper()}"] = str(value)
    return settings_from_environment()


def _announce_store(settings: Settings) -> None:
    if settings.redis_url:
        log.info("broker: store on Redis; %d worker(s)", settings.workers)
    else:
        log.warning(
            "broker: embedded store (in-process, no Redis): single instance, NOT durable; "
            "set BROKER_REDIS_URL for production"
        )


def log_config_with_times() -> dict[str, Any]:
    """uvicorn's logging, its lines stamped with the time as the broker's own are (its
    start, its errors and its access log had none)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    for formatter in config["formatters"].values():
        formatter["fmt"] = "%(asctime)s " + formatter["fmt"]
    return config


def serve(settings: Settings) -> None:
    if settings.workers > 1 and not settings.redis_url:
        sys.exit("broker: --workers > 1 needs --redis-url (the embedded store is per process)")
    if os.environ.get("WEB_CONCURRENCY", "1").strip() not in ("", "1"):
        # uvicorn.run would start that many workers itself (a PaaS sets it): each with
        # its own embedded store (one topic split in two), or, on Redis, without the
        # supervisor (metrics not summed). The workers are BROKER_WORKERS (--workers).
        log.warning("broker: WEB_CONCURRENCY is ignored; set BROKER_WORKERS (--workers)")
    config: dict[str, Any] = {
        "app": "api.app:create_app",
        "factory": True,
        "loop": "uvloop",
        "http": "api.connections:BrokerHttpProtocol",  # httptools, streams served lean
        "ws": "none",  # (no WebSocket route: an upgrade is a plain request, answered 404)
        "lifespan": "on",
        "log_level": settings.log_level,
        "log_config": log_config_with_times(),
        "access_log": settings.access_log,
        # (uvicorn's type says int; a fraction must not become 0: no grace at all)
        "timeout_graceful_shutdown": math.ceil(settings.shutdown_grace_seconds),
        "proxy_headers": True,
        # One process per uvicorn: else uvicorn reads WEB_CONCURRENCY (which a PaaS
        # sets) and starts workers of its own, or fails on a value that is no number.
        "workers": 1,
    }
    if settings.workers > 1:
        _supervise(settings, config)
        return
    # uvicorn re-raises SIGTERM once it has shut down; a no-op handler here makes
    # that a clean return, so a drained instance exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    drain_on_hangup()
    uvicorn.run(host=settings.host, port=settings.port, **config)


def _supervise(settings: Settings, config: dict[str, Any]) -> None:
    """Run the workers, their metrics summed in a directory made here (unless one is
    given) and removed on exit: each worker leaves files there, every run new ones."""
    made = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        made = tempfile.mkdtemp(prefix="broker-prom-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    try:
        try:
            supervisor = Supervisor(settings.workers, settings.host, settings.port, config)
        except PortTaken as taken:
            sys.exit(f"broker: {taken}")
        code = supervisor.run()
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    if code:
        sys.exit(code)
