"""What every benchmark shares: a PostgreSQL server, data sets kept as template databases,
and the results table.

The server is ``CALLS_WORKER_BENCH_DATABASE_URL`` (any database on it; the benchmarks
create and drop their own), else the embedded PostgreSQL under .calls-worker/bench.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from calls_worker.adapters.db.engine import build_engine, sqlalchemy_url
from calls_worker.adapters.db.migrate import head_revision, upgrade

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.json"


def server_url() -> str:
    configured = os.environ.get("CALLS_WORKER_BENCH_DATABASE_URL")
    if configured:
        return configured
    from calls_worker.adapters.embedded import start_postgres

    return start_postgres(ROOT / ".calls-worker" / "bench" / "postgres").url


def database_url(server: str, name: str) -> str:
    return sqlalchemy_url(server).set(database=name).render_as_string(hide_password=False)


def _admin(server: str, *statements: str) -> None:
    engine = build_engine(server, pool_size=1).execution_options(isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        for statement in statements:
            connection.execute(text(statement))
    engine.dispose()


def template(server: str, calls: int) -> str:
    """The name of a template database holding the data set of ``calls`` calls (made once)."""
    from bench.generate import generate

    name = f"calls_worker_bench_{calls}_r{head_revision()}"  # a new schema, a new data set
    engine = build_engine(server, pool_size=1)
    with engine.connect() as connection:
        exists = connection.execute(
            text("SELECT 1 FROM pg_database WHERE datname = :n AND datistemplate"), {"n": name}
        ).scalar()
    engine.dispose()
    if exists:
        return name
    _admin(server, f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"')
    engine = build_engine(database_url(server, name), pool_size=1)
    upgrade(engine)
    print(f"  generating {calls:,} calls: {generate(engine, calls)}", flush=True)
    engine.dispose()
    _admin(server, f'ALTER DATABASE "{name}" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false')
    return name


@contextmanager
def copy_of(server: str, template_name: str) -> Iterator[Engine]:
    """A fresh copy of a data set, dropped afterwards."""
    name = f"{template_name}_run_{os.getpid()}"
    _admin(
        server,
        f'DROP DATABASE IF EXISTS "{name}"',
        f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"',
    )
    engine = build_engine(database_url(server, name), pool_size=2)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE"))  # warm, as a running database is
        yield engine
    finally:
        engine.dispose()
        _admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def on_filled_database(name: str, fill: Callable[[Engine], None],
                       measure: Callable[[Engine], list[Row]], keep: bool) -> list[Row]:
    """``measure`` on database ``name`` of the server, ``fill``ed first unless an earlier
    run left it filled (marked by a table ``bench_filled``), then dropped. ``keep``: only
    fill it, and leave it for a later run (filling ten million rows takes half an hour)."""
    server = server_url()
    state = _state(server, name)
    if state == "filling":
        raise RuntimeError(
            f"database {name} exists but is not marked filled: a fill is running, or was"
            f" cut short (then drop it to start again); left as it is")
    if state == "absent":
        _admin(server, f'CREATE DATABASE "{name}"')
    engine = build_engine(database_url(server, name), pool_size=2)
    try:
        if state == "absent":
            fill(engine)
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                c.execute(text("VACUUM ANALYZE"))
                c.execute(text("CREATE TABLE bench_filled ()"))
        return [] if keep else measure(engine)
    finally:
        engine.dispose()
        if not keep:  # measured: changed by it, so never measured again
            _admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _state(server: str, name: str) -> str:
    """"absent", "filled" (marked by a table ``bench_filled``) or "filling"."""
    admin = build_engine(server, pool_size=1)
    try:
        with admin.connect() as connection:
            exists = connection.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).scalar()
    finally:
        admin.dispose()
    if not exists:
        return "absent"
    engine = build_engine(database_url(server, name), pool_size=1)
    try:
        with engine.connect() as connection:
            marked = connection.execute(text("SELECT to_regclass('bench_filled')")).scalar()
    finally:
        engine.dispose()
    return "filled" if marked is not None else "filling"


def timed(action: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = action()
    return time.perf_counter() - started, value


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Row:
    """One line of the results table: a figure, its baseline, and the goal on their ratio."""

    benchmark: str
    figure: str
    value: float
    unit: str
    baseline: str
    baseline_value: float | None
    goal: str
    passed: bool
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if not self.baseline_value:
            return None
        return self.value / self.baseline_value


def machine() -> dict[str, Any]:
    def first_line(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return "?"

    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor())  # fmt: skip
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "postgresql": first_line("psql", "--version"),
        "redis": first_line("redis-server", "--version"),
    }


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'benchmark':<10} {'figure':<44} {'value':>12} {'baseline':>12} {'ratio':>7}  "
        f"{'goal':<22} result"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}"
        baseline = "" if row.baseline_value is None else f"{row.baseline_value:.4g}"
        print(
            f"{row.benchmark:<10} {row.figure:<44} {row.value:>10.4g} {row.unit:<1} {baseline:>12} "
            f"{ratio:>7}  {row.goal:<22} {'PASS' if row.passed else 'FAIL'}"
        )


def write_results(rows: list[Row], path: Path = RESULTS) -> None:
    existing: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    figures = {f"{r.benchmark}:{r.figure}": asdict(r) | {"ratio": r.ratio} for r in rows}
    existing.setdefault("figures", {}).update(figures)
    existing["machine"] = machine()
    existing["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path.write_text(json.dumps(existing, indent=2) + "\n")
