"""The layout's import direction (README, "Layout"): domain ← service ← adapters, worker ←
cli; what producers import (client.py, wire.py) needs none of the worker's code; and no
module grows past about 400 lines unless it is one idea."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "calls_worker"

# What each part of the package may import of the others.
ALLOWED: dict[str, set[str]] = {
    "domain": {"domain"},
    "service": {"domain", "service"},
    "adapters": {"domain", "service", "adapters", "config", "wire"},
    "worker": {"domain", "service", "adapters", "worker", "config", "wire"},
    "cli": {"domain", "service", "adapters", "worker", "cli", "config", "wire", "client"},
    "client": {"domain", "wire"},
    "wire": {"domain"},
    "config": {"domain", "wire"},
}
# Modules longer than LONG that are one idea (the reason in their docstring): none today;
# client.py and adapters/db/journal.py are the longest, at about 400 lines.
ONE_IDEA: set[str] = set()
LONG = 420


def _part(path: Path) -> str:
    relative = path.relative_to(SRC)
    return relative.parts[0].removesuffix(".py")


def _imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within its own part
                continue
            names = [node.module or ""]
        for name in names:
            if name.startswith("calls_worker."):
                parts.add(name.split(".")[1])
    return parts


MODULES = sorted(p for p in SRC.rglob("*.py") if _part(p) in ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_one_way(path: Path) -> None:
    wrong = _imported_parts(path) - ALLOWED[_part(path)]
    assert not wrong, f"{path.relative_to(SRC)} imports {sorted(wrong)}"


def test_no_module_is_long_unless_it_is_one_idea() -> None:
    long = {str(p.relative_to(SRC)): n for p in MODULES
            if (n := len(p.read_text().splitlines())) > LONG}  # fmt: skip
    assert set(long) <= ONE_IDEA, long


def test_the_producer_client_loads_no_worker_code() -> None:
    probe = (
        "import sys, calls_worker.client; "
        "bad = [m for m in sys.modules if m.startswith(('sqlalchemy', 'psycopg', "
        "'calls_worker.service', 'calls_worker.adapters', 'calls_worker.worker',"
        " 'calls_worker.cli.')) or m == 'calls_worker.cli']; "
        "print(bad)"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert run.stdout.strip() == "[]"
