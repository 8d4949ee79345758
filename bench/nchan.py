"""Nchan (nginx + Debian's libnginx-mod-nchan), the peer the broker is measured against.

`servers.start` runs it like the other targets: `command()` writes `nchan/nginx.conf`
with this run's port, Redis and prefix into a fresh directory and returns an nginx
command line that stays in the foreground (2 workers, loopback, the same fresh
redis-server the broker gets). nginx answers `GET /readyz` itself, and the harness stops
the master's session with SIGTERM, as it does uvicorn's.

Nchan speaks the broker's URL shape (`/topics/<topic>/events`, see the config) but not
its publish body: a POST body is the message itself, one message per request
(`envelope=False`), and the answer is channel info (`last message id: <seconds>:<n>`),
not the broker's JSON (`published_id` below). Ids are `<unix seconds>:<n-th message in that
second>`, sent as `id:` lines, and a `Last-Event-ID` header with one of them resumes
after it (checked by hand with curl and by the storm scenario, which resumes 100 behind).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.servers import HOST, Target

CONFIG_TEMPLATE = Path(__file__).resolve().parent / "nchan" / "nginx.conf"
MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
LAST_ID = re.compile(rb"last message id: *(\S+)")


def missing() -> str | None:
    """Why Nchan cannot run here, or None."""
    if not Path(NGINX).exists():
        return "nginx is not installed (bash scripts/ensure-system-tools.sh nginx nchan)"
    if not MODULE.exists():
        return f"{MODULE} is missing (bash scripts/ensure-system-tools.sh nchan)"
    return None


def render_config(port: int, redis_url: str, prefix: Path) -> str:
    # The template uses @NAME@ placeholders: nginx's own `$1` rules out string.Template.
    text = CONFIG_TEMPLATE.read_text()
    for name, value in {"PORT": str(port), "REDIS_URL": redis_url, "PREFIX": str(prefix)}.items():
        text = text.replace(f"@{name}@", value)
    return text


@dataclass(frozen=True)
class NchanTarget(Target):
    """nginx with the Nchan module, configured from `bench/nchan/nginx.conf`."""

    def command(self, port: int, redis_url: str) -> list[str]:
        prefix = Path(tempfile.mkdtemp(prefix="bench-nchan-"))
        prefix.chmod(0o755)  # nginx's workers (user nobody when run as root) use its temp dirs
        config = prefix / "nginx.conf"
        config.write_text(render_config(port, redis_url, prefix))
        # -e: errors before the config is read go to stderr too, not to /var/log/nginx.
        return [NGINX, "-p", str(prefix), "-c", str(config), "-e", "stderr"]

    def ready(self, port: int) -> bool:
        """nginx answers /readyz itself, before Nchan's link to Redis is up: a publish
        then got 503 (the scenario failed, now and then). Ready once a probe message is
        published (201/202), and its channel deleted again (no key left behind)."""
        if not super().ready(port):
            return False
        url = f"http://{HOST}:{port}/topics/bench.ready/events"
        probe = urllib.request.Request(url, data=b"ready", method="POST")
        try:
            with urllib.request.urlopen(probe, timeout=1):
                pass
        except urllib.error.HTTPError:
            return False  # (503 until Redis is linked)
        delete = urllib.request.Request(url, method="DELETE")
        with contextlib.suppress(urllib.error.HTTPError), urllib.request.urlopen(delete, timeout=1):
            pass
        return True

    def published_id(self, body: bytes) -> str:
        found = LAST_ID.search(body)
        if found is None:
            raise RuntimeError(f"no message id in Nchan's answer: {body[:300]!r}")
        return found.group(1).decode()


# A POST body is the message itself, one per request (no `{"data": ...}` envelope).
NCHAN = NchanTarget("nchan", "Nchan (nginx + libnginx-mod-nchan, Redis storage)", envelope=False)
