"""Turn the shipped load-balancer configs into configs that run on loopback.

The tests (and the end-to-end suite) must exercise the configuration that is
shipped, not a look-alike. So nothing here writes proxy settings: each function
reads the shipped file (`nginx/nginx.conf`, `haproxy/haproxy.cfg`), replaces
only what differs between a Docker network and a test machine (upstream
addresses, the listen address, pid/log/temp paths, Docker's DNS resolver) and
keeps every other line. A replacement that no longer matches the shipped file
raises `ShippedConfigChanged`, so the two cannot drift apart silently.

Standard library only; usable as `python -m deploy.render nginx 8080 9001 9002 --workdir DIR`.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parent
NGINX_DIR = DEPLOY_DIR / "nginx"
NGINX_CONF = NGINX_DIR / "nginx.conf"
HAPROXY_CFG = DEPLOY_DIR / "haproxy" / "haproxy.cfg"
LOOPBACK = "127.0.0.1"

_NGINX_UPSTREAM_SERVER = re.compile(
    r"^(?P<indent>[ \t]*)server broker\d+:8000(?P<params>[^;]*;)\n", re.M
)
_HAPROXY_SERVER = re.compile(r"^(?P<indent>[ \t]*)server broker\d+ \S+:8000(?P<params>.*)\n", re.M)
_NGINX_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


class ShippedConfigChanged(ValueError):
    """The shipped config no longer has the shape this renderer replaces; update both."""


def _replace_once(text: str, pattern: str, replacement: str, *, where: Path) -> str:
    """Replace the single line matching `pattern` (a regex, multiline) or raise."""
    new_text, count = re.subn(pattern, lambda _: replacement, text, flags=re.M)
    if count != 1:
        raise ShippedConfigChanged(f"{where}: expected one match of {pattern!r}, found {count}")
    return new_text


def _swap_servers(
    text: str,
    pattern: re.Pattern[str],
    server_line: Callable[[int, int], str],
    upstream_ports: Sequence[int],
    *,
    where: Path,
) -> str:
    """Replace every block of shipped server lines with one line per upstream port.

    A block is a run of consecutive matching lines (one nginx upstream, one
    HAProxy backend); each is replaced on its own, so a file with several
    backends (HAProxy's `brokers` and `brokers_alive`) keeps all of them.
    `server_line(index, port)` writes the address part; the indentation and the
    parameters (max_fails, check, ...) are the block's shipped ones, which must
    agree within the block.
    """
    matches = list(pattern.finditer(text))
    if not matches:
        raise ShippedConfigChanged(f"{where}: no upstream server lines found")
    blocks: list[list[re.Match[str]]] = []
    for match in matches:
        if blocks and blocks[-1][-1].end() == match.start():
            blocks[-1].append(match)
        else:
            blocks.append([match])
    pieces, position = [], 0
    for block in blocks:
        if len({m.group("params") for m in block}) != 1:
            raise ShippedConfigChanged(f"{where}: upstream servers differ in parameters")
        indent, params = block[0].group("indent"), block[0].group("params")
        lines = "".join(
            f"{indent}{server_line(index, port)}{params}\n"
            for index, port in enumerate(upstream_ports, start=1)
        )
        pieces += [text[position : block[0].start()], lines]
        position = block[-1].end()
    return "".join(pieces) + text[position:]


def _check_ports(listen_port: int, upstream_ports: Sequence[int]) -> None:
    if not upstream_ports:
        raise ValueError("at least one upstream port is needed")
    for port in (listen_port, *upstream_ports):
        if not 0 < port < 65536:
            raise ValueError(f"not a TCP port: {port}")


def render_nginx(listen_port: int, upstream_ports: Sequence[int], workdir: Path | str) -> Path:
    """Write `workdir/nginx.conf`: the shipped nginx.conf on loopback, and return its path.

    Run it in the foreground, as root or not, with `nginx -c <path> -p <workdir>`.
    It includes the shipped `sse-http.conf` and `sse-proxy.conf` by absolute path;
    pid, logs (`error.log`, `access.log`) and temp files stay inside `workdir`.
    """
    _check_ports(listen_port, upstream_ports)
    work = Path(workdir).resolve()
    for name in ("logs", "tmp"):
        (work / name).mkdir(parents=True, exist_ok=True)
    text = NGINX_CONF.read_text()
    text = _swap_servers(
        text,
        _NGINX_UPSTREAM_SERVER,
        lambda _, port: f"server {LOOPBACK}:{port}",
        upstream_ports,
        where=NGINX_CONF,
    )
    text = _replace_once(text, r"^pid .*;$", _nginx_process_lines(work), where=NGINX_CONF)
    text = _replace_once(
        text, r"^error_log \S+", f"error_log {work / 'logs' / 'error.log'}", where=NGINX_CONF
    )
    text = _replace_once(
        text,
        r"access_log /dev/stdout",
        f"access_log {work / 'logs' / 'access.log'}",
        where=NGINX_CONF,
    )
    text = _replace_once(
        text, r"listen 8080;", f"listen {LOOPBACK}:{listen_port};", where=NGINX_CONF
    )
    text = _absolute_includes(text)
    temp_paths = "".join(
        f"    {kind}_temp_path {work / 'tmp' / kind};\n" for kind in _NGINX_TEMP_PATHS
    )
    text = _replace_once(text, r"^http \{\n", "http {\n" + temp_paths, where=NGINX_CONF)
    return _write(work / "nginx.conf", text)


def _nginx_process_lines(work: Path) -> str:
    """Foreground, pid in `work`; as root, workers stay root so they can use `work`.

    (Run by root without a `user` line, workers would drop to `nobody`, which
    cannot enter a private temporary directory.)
    """
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"{user}daemon off;\npid {work / 'nginx.pid'};"


def _absolute_includes(text: str) -> str:
    """Point `include name;` at the shipped file beside nginx.conf, wherever nginx runs."""

    def absolute(match: re.Match[str]) -> str:
        included = NGINX_DIR / match["name"]
        if not included.is_file():
            raise ShippedConfigChanged(f"{NGINX_CONF}: included file {included} is missing")
        return f"{match['indent']}include {included};"

    text, count = re.subn(
        r"^(?P<indent>[ \t]*)include (?P<name>[\w.-]+);", absolute, text, flags=re.M
    )
    if count == 0:
        raise ShippedConfigChanged(f"{NGINX_CONF}: no include lines found")
    return text


def render_haproxy(listen_port: int, upstream_ports: Sequence[int], workdir: Path | str) -> Path:
    """Write `workdir/haproxy.cfg`: the shipped haproxy.cfg on loopback, and return its path.

    Run it in the foreground with `haproxy -f <path>` (it logs to stdout). Docker's
    DNS resolver section is dropped; every other line is the shipped one.
    """
    _check_ports(listen_port, upstream_ports)
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    text = HAPROXY_CFG.read_text()
    text = _replace_once(
        text, r"^(?:#.*\n)?resolvers docker\n(?:[ \t]+\S.*\n)*\n?", "", where=HAPROXY_CFG
    )
    text = _replace_once(text, r" resolvers docker$", "", where=HAPROXY_CFG)
    text = _replace_once(text, r"bind :8080$", f"bind {LOOPBACK}:{listen_port}", where=HAPROXY_CFG)
    text = _swap_servers(
        text,
        _HAPROXY_SERVER,
        lambda index, port: f"server broker{index} {LOOPBACK}:{port}",
        upstream_ports,
        where=HAPROXY_CFG,
    )
    return _write(work / "haproxy.cfg", text)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Render one config and print its path (for trying a load balancer by hand)."""
    parser = argparse.ArgumentParser(prog="python -m deploy.render", description=__doc__)
    parser.add_argument("balancer", choices=["nginx", "haproxy"])
    parser.add_argument("listen_port", type=int)
    parser.add_argument("upstream_ports", type=int, nargs="+")
    parser.add_argument("--workdir", default=os.getcwd())
    args = parser.parse_args(argv)
    render = render_nginx if args.balancer == "nginx" else render_haproxy
    print(render(args.listen_port, args.upstream_ports, args.workdir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
