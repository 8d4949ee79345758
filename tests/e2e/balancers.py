"""Real nginx and HAProxy processes in front of the broker instances.

The configurations are the ones the project ships: `deploy/render.py` renders
them for a listen port and the instances' ports. Until that module exists, a
minimal configuration kept here stands in for it.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

from tests.support.broker_process import BrokerProcess
from tests.support.polling import wait_until
from tests.support.procs import ManagedProcess, http_status, tail
from tests.support.redis_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
RENDER_MODULE = REPO_ROOT / "deploy" / "render.py"
Renderer = Callable[[int, Sequence[int], Path], Path]

FALLBACK_NGINX = """\
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    upstream brokers {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{listen_port};
        location / {{
            proxy_pass http://brokers;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 1h;
            proxy_connect_timeout 1s;
            proxy_next_upstream error timeout http_502;
        }}
    }}
}}
"""

FALLBACK_HAPROXY = """\
global
    maxconn 1000
defaults
    mode http
    timeout connect 1s
    timeout client 1h
    timeout server 1h
    timeout http-request 10s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
frontend brokers_in
    bind 127.0.0.1:{listen_port}
    default_backend brokers
backend brokers
    balance roundrobin
    option httpchk GET /healthz
    default-server check inter 500ms fall 1 rise 2
{servers}
"""


def fallback_nginx(listen_port: int, upstream_ports: Sequence[int], workdir: Path) -> Path:
    servers = "\n".join(
        f"        server 127.0.0.1:{port} max_fails=1 fail_timeout=2s;" for port in upstream_ports
    )
    path = workdir / "nginx.conf"
    path.write_text(
        FALLBACK_NGINX.format(workdir=workdir, servers=servers, listen_port=listen_port)
    )
    return path


def fallback_haproxy(listen_port: int, upstream_ports: Sequence[int], workdir: Path) -> Path:
    servers = "\n".join(
        f"    server broker{i} 127.0.0.1:{port}" for i, port in enumerate(upstream_ports)
    )
    path = workdir / "haproxy.cfg"
    path.write_text(FALLBACK_HAPROXY.format(servers=servers, listen_port=listen_port))
    return path


def shipped_render_module() -> ModuleType | None:
    """deploy/render.py when another part of the project has shipped it, else None."""
    if not RENDER_MODULE.exists():
        return None
    spec = importlib.util.spec_from_file_location("deploy_render", RENDER_MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def renderer(kind: str) -> tuple[Renderer, str]:
    """The function that writes `kind`'s configuration, and where it comes from."""
    module = shipped_render_module()
    if module is not None:
        return getattr(module, f"render_{kind}"), "deploy/render.py"
    fallbacks: dict[str, Renderer] = {"nginx": fallback_nginx, "haproxy": fallback_haproxy}
    return fallbacks[kind], "tests/e2e fallback"


def executable(kind: str) -> str:
    found = shutil.which(kind) or shutil.which(kind, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise RuntimeError(f"{kind} is missing: run `make test` (it installs it)")
    return found


def command(kind: str, config: Path, workdir: Path) -> list[str]:
    if kind == "haproxy":
        # -db: stay in the foreground whatever the configuration says.
        return [executable(kind), "-db", "-f", str(config)]
    args = [executable(kind), "-e", str(workdir / "nginx-startup.log")]
    args += ["-c", str(config), "-p", str(workdir)]
    if "daemon off" not in config.read_text():
        args += ["-g", "daemon off;"]
    return args


class LoadBalancer:
    """nginx or HAProxy on a loopback port, spreading requests over the instances."""

    def __init__(self, kind: str, upstream_ports: Sequence[int], workdir: Path) -> None:
        self.kind = kind
        self.port = free_port()
        self.workdir = workdir / kind
        self.workdir.mkdir(parents=True, exist_ok=True)
        render, self.config_source = renderer(kind)
        self.config = render(self.port, list(upstream_ports), self.workdir)
        args = command(kind, self.config, self.workdir)
        self.process = ManagedProcess(kind, args, self.workdir / f"{kind}.log", cwd=self.workdir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process.start()

        def healthy() -> bool:
            if not self.process.running:
                raise AssertionError(f"{self.kind} exited\n{tail(self.process.log_path)}")
            return http_status(f"{self.url}/healthz") == 200

        wait_until(healthy, timeout=15, what=f"{self.kind} to proxy /healthz")

    def close(self) -> None:
        self.process.close()


def nginx_before(broker: BrokerProcess, workdir: Path) -> Iterator[LoadBalancer]:
    """A real nginx (the shipped configuration) before ``broker``, closed after (a
    fixture's body: ``yield from nginx_before(broker, tmp_path)``)."""
    nginx = LoadBalancer("nginx", [broker.port], workdir)
    try:
        nginx.start()
        yield nginx
    finally:
        nginx.close()
