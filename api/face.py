"""The broker's face: the live page (``/``), the API reference (``/docs``), the
browser helper (``/client.js``), their static files, and the page's ``/stats``.

Everything is served from the installed packages, nothing from a CDN: the
page's files from ``api/static``, Swagger UI's from the ``swagger-ui-bundle-v2``
distribution (Apache-2.0, its license in that distribution). Only files named
here are served; the pages use relative URLs, so they work under any path a
load balancer mounts the broker at.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import os
import secrets
import socket
from functools import cache
from pathlib import Path
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from api.problems import NOT_SNIFFED
from api.routes import check_listing_caller, may_subscribe
from broker import Broker, InvalidInput
from broker.fanout import Hub
from broker.model import LogPage
from broker.validation import check_topic

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE_FILES = {
    "page.js": "text/javascript; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
    "docs.js": "text/javascript; charset=utf-8",
}
SWAGGER_UI_FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
# Pages change with the installed version: revalidate each time, it is cheap.
NO_CACHE = {"Cache-Control": "no-cache"}
RATE_WINDOW_SECONDS = 30
RATE_SAMPLE = 100  # events read at most per topic for its rate
MAX_STATS_TOPICS = 100  # topics a caller may ask for by ?topic=
MAX_STREAMED_STATS_TOPICS = 100  # besides them, those this instance streams


def _static(name: str, media_type: str, headers: dict[str, str] | None = None) -> FileResponse:
    all_headers = {**NO_CACHE, **NOT_SNIFFED, **(headers or {})}
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=all_headers)


# Both pages act with the visitor's broker_token cookie (the live page's publish form,
# Swagger UI's "Try it out", whose requests come from the broker's own origin, so no
# Origin check stops them): no other page, not even one of the same site, may frame
# them and have a visitor click them (clickjacking). Scripts need no such header.
PAGE_POLICY = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        # The live page's files and requests are all the broker's own: the browser
        # refuses anything else, an injected script's request included.
        "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
}
DOCS_POLICY = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        # Swagger UI draws some icons from data: URLs (it sets styles through the DOM,
        # which needs no 'unsafe-inline': Chromium shows it whole under this policy).
        "default-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
}


async def index(request: Request) -> Response:
    """The live page: topics, their rates and subscribers, a live tail, a publish form."""
    return _static("index.html", "text/html; charset=utf-8", PAGE_POLICY)


async def docs(request: Request) -> Response:
    """The API reference (Swagger UI over /openapi.json), rendered offline."""
    return _static("docs.html", "text/html; charset=utf-8", DOCS_POLICY)


async def client_js(request: Request) -> Response:
    """The browser helper: ``window.BrokerClient.subscribe(url, {...})``."""
    return _static("client.js", "text/javascript; charset=utf-8")


async def page_file(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in PAGE_FILES:
        raise HTTPException(404)
    return _static(name, PAGE_FILES[name])


async def swagger_ui_file(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in SWAGGER_UI_FILES:
        raise HTTPException(404)
    path = swagger_ui_dir() / name
    # The bundle is versioned by the installed distribution: a day of caching is safe.
    headers = {"Cache-Control": "public, max-age=86400", **NOT_SNIFFED}
    return FileResponse(path, media_type=SWAGGER_UI_FILES[name], headers=headers)


@cache
def swagger_ui_dir() -> Path:
    """Swagger UI's files in the installed ``swagger_ui_bundle`` package (without importing it)."""
    spec = importlib.util.find_spec("swagger_ui_bundle")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-bundle-v2 is not installed: /docs needs it")
    vendor = Path(next(iter(spec.submodule_search_locations))) / "vendor"
    versions = sorted(vendor.glob("swagger-ui-*"), key=_version_key)
    if not versions:
        raise RuntimeError(f"no Swagger UI files under {vendor}")
    return versions[-1]


def _version_key(path: Path) -> tuple[int, ...]:
    parts = path.name.removeprefix("swagger-ui-").split(".")
    return tuple(int(p) if p.isdigit() else 0 for p in parts)


# -- /stats ---------------------------------------------------------------------


def instance_name(authorization_on: bool) -> str:
    """What ``/stats`` names this process by (its subscribers are the process's): its
    host and pid, or with authorization on an opaque id, random, this process's for its
    life, which the log maps to them. ``/stats`` answers anyone, and the host name gave
    every anonymous caller a piece of the network's map (as ``/readyz`` gave the Redis
    host); telling the instances apart needs no more than an id. Call it in the process
    that serves (each worker its own)."""
    own = f"{socket.gethostname()}:{os.getpid()}"
    if not authorization_on:
        return own  # (anyone who reaches an open broker may publish and delete anyway)
    opaque = secrets.token_hex(6)
    log.info("instance: this process (%s) is %s in /stats", own, opaque)
    return opaque


def live_subscribers(hub: Hub) -> dict[str, int]:
    """Streams following each topic live in this process (a read of the hub's feeds).

    A multi-topic stream counts once for each of its topics; a stream still
    replaying history joins the count when it catches up.
    """
    return {topic: len(feed.subscribers) for topic, feed in hub._feeds.items()}


async def stats(request: Request) -> Response:
    """Per topic: events per second over the last 30 s, and subscribers.

    The rate is read from the topic's log in the store, so it counts every
    instance; subscribers are those of the instance (process) that answers,
    named in ``instance`` (``instance_name``). The topics: those named by ``?topic=``,
    then (by name, at most MAX_STREAMED_STATS_TOPICS) the others this instance streams
    now (a topic with subscribers but no event yet is in no listing).
    """
    broker: Broker = request.app.state.broker
    subscribers = live_subscribers(broker.hub)
    requested = _stats_topics(request)
    await check_listing_caller(request)
    names = _readable_stats_topics(request, requested, subscribers)
    now_ms = await broker.store.clock_ms()  # (ids are of Redis's clock, not this host's)
    rates = await asyncio.gather(*(_rate(broker, name, now_ms) for name in names))
    topics = [
        {"topic": name, "events_per_second": rate, "subscribers": subscribers.get(name, 0)}
        for name, rate in zip(names, rates, strict=True)
    ]
    content: dict[str, Any] = {
        "instance": request.app.state.instance,
        "subscribers_scope": "instance",
        "rate_scope": "cluster",
        "rate_window_seconds": RATE_WINDOW_SECONDS,
        "topics": topics,
    }
    headers = {**NO_CACHE, **NOT_SNIFFED}
    return Response(orjson.dumps(content), media_type="application/json", headers=headers)


def _stats_topics(request: Request) -> list[str]:
    names = list(dict.fromkeys(request.query_params.getlist("topic")))
    if len(names) > MAX_STATS_TOPICS:
        raise InvalidInput(f"at most {MAX_STATS_TOPICS} topics", field="topic")
    return [check_topic(name) for name in names]


def _readable_stats_topics(
    request: Request, requested: list[str], subscribers: dict[str, int]
) -> list[str]:
    """The requested topics the caller may read, then the streamed ones, each list under
    its own cap: an instance streaming many topics must not crowd out those asked for
    (it did: past 100 streamed topics, none asked for was answered), nor they it."""
    names = [name for name in requested if may_subscribe(request, name)]
    asked = set(requested)
    streamed = (
        name for name in sorted(subscribers) if name not in asked and may_subscribe(request, name)
    )
    return names + list(itertools.islice(streamed, MAX_STREAMED_STATS_TOPICS))


async def _rate(broker: Broker, topic: str, now_ms: float) -> float:
    """Events per second in the window: how many entries it holds over its length.

    Counted by the numbers entries carry (1, 2, ... in their log): the newest issued
    less the window's first, plus one; two small reads, however busy the topic. It was
    a sample's count (100 at most) over the time from the window's start to the
    sample's last entry: a 1000-event batch showed 4.2/s for its 33.3/s, and a new
    topic's empty stretch before its first event counted as time.
    """
    window_start = int(now_ms) - RATE_WINDOW_SECONDS * 1000
    first = await broker.store.read_range(topic, (window_start, 0), 1)
    if not first.entries:
        return 0.0
    numbered = await _count_by_numbers(broker, topic, first)
    if numbered is not None:
        return _per_second(numbered)
    return await _sampled_rate(broker, topic, window_start)


async def _count_by_numbers(broker: Broker, topic: str, first: LogPage) -> int | None:
    """Entries from the window's first to the log's newest, by their numbers; None when
    the first has none, or the log changed (deleted, made anew) between the two reads."""
    number = first.entries[0].number
    state = await broker.store.state(topic)
    if number is None or state.issued is None or state.epoch != first.epoch:
        return None
    return max(state.issued - number + 1, 1)


async def _sampled_rate(broker: Broker, topic: str, window_start: int) -> float:
    """The rate from at most RATE_SAMPLE entries, for a log whose entries in the window
    came before numbers (an upgrade's first 30 s): past the sample, its count over the
    time it spans from the window's start (low for a burst)."""
    page = await broker.store.read_range(topic, (window_start, 0), RATE_SAMPLE)
    count = len(page.entries)
    if not count or (count < RATE_SAMPLE and not page.cut_short):
        return _per_second(count)
    spanned_ms = max(page.entries[-1].position[0] - window_start, 1)
    return round(count * 1000 / spanned_ms, 3)


def _per_second(count: int) -> float:
    return round(count / RATE_WINDOW_SECONDS, 3)
