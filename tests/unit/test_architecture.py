"""The shape of the house: the core knows no web framework, only the redis_* modules import
redis, and the store's imports run one way (the store never imports its live reader's helpers)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "broker"


def test_the_core_imports_no_web_framework() -> None:
    code = "import sys, broker; print(sorted(m for m in sys.modules if m.split('.')[0] in "
    code += "('starlette', 'uvicorn', 'api', 'fastapi')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_command_line_client_imports_no_server_side() -> None:
    """``broker``'s entry point and the client it runs (its commands, publisher and
    subscriber) import neither the server side nor the core's store: they did (uvicorn,
    Starlette, pydantic, redis-py), most of each ``broker publish``'s start."""
    code = "import sys, api.cli, brokerclient.cli, brokerclient.publisher, brokerclient.subscriber;"
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn', "
    code += "'redis', 'fakeredis', 'pydantic', 'orjson') or m in ('api.serve', 'broker.core')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_packages_names_are_all_there() -> None:
    """``broker`` and ``brokerclient`` import their public names when first used: each
    of them is found (a name listed but not mapped would fail only when first used)."""
    code = "from broker import *\nfrom brokerclient import *"
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)


def test_the_packages_names_are_listed_before_their_first_use() -> None:
    """``dir()`` of either package lists its public names before they are first used, as
    it did when they were imported eagerly: ``help()`` (pydoc) and the completion of a
    REPL or a notebook find names through it, and listed none of them."""
    code = "import broker, brokerclient\nfor p in (broker, brokerclient):"
    code += "\n    print(sorted(set(p.__all__) - set(dir(p))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "[]"], out.stdout


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


REDIS_MODULES = {
    "redis_store.py",
    "redis_listing.py",
    "redis_append_pipeline.py",
    "redis_scripts.py",
    "redis_raw.py",
    "redis_live.py",
    "redis_live_cluster.py",
    "redis_live_links.py",
    "redis_pools.py",
    "redis_options.py",
    "redis_open.py",
    "redis_primary.py",
    "redis_checks.py",
    "redis_slots.py",
}


def test_only_the_redis_modules_import_redis() -> None:
    importers = {p.name for p in CORE.glob("*.py") if {"redis", "fakeredis"} & imported_modules(p)}
    assert importers == REDIS_MODULES


def broker_imports(path: Path) -> dict[str, set[str]]:
    """``broker.x`` module -> the names imported from it (``from broker.x import a, b``)."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("broker."):
            found.setdefault(node.module or "", set()).update(a.name for a in node.names)
    return found


def test_the_store_and_its_live_reader_import_one_way() -> None:
    """The store takes its reader's types only; the reader knows nothing of the store."""
    store = broker_imports(CORE / "redis_store.py")
    assert store.get("broker.redis_live", set()) <= {"AnyLiveReader", "LiveReader"}
    assert store.get("broker.redis_live_links", set()) <= {"LocalWrites"}
    for reader in ("redis_live.py", "redis_live_cluster.py", "redis_live_links.py"):
        assert "broker.redis_store" not in broker_imports(CORE / reader), reader
    assert "broker.redis_open" not in store, "the URL parser builds the store, not the reverse"


def test_the_stores_parts_do_not_import_the_store() -> None:
    """The store imports its parts (its listing, append pipeline, scripts, replies read);
    none of them imports it: only the URL parser, which builds it, does."""
    importers = {p.name for p in CORE.glob("*.py") if "broker.redis_store" in broker_imports(p)}
    assert importers <= {"redis_open.py"}
