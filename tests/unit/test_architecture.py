"""The shape of the house: the core knows no web framework, and one module imports redis."""

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


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_redis_store_imports_redis() -> None:
    importers = {p.name for p in CORE.glob("*.py") if {"redis", "fakeredis"} & imported_modules(p)}
    assert importers == {"redis_store.py", "redis_live.py"}
