"""Engines are built when a process asks for one (after fork), never at import."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool


def sqlalchemy_url(database_url: str) -> URL:
    """Accept ``postgres://``, ``postgresql://`` or ``postgresql+psycopg://``; drive psycopg 3."""
    url = make_url(database_url.replace("postgres://", "postgresql://", 1))
    if url.get_backend_name() != "postgresql":
        raise ValueError(f"not a PostgreSQL URL: {url.render_as_string(hide_password=True)}")
    return url.set(drivername="postgresql+psycopg")


def build_engine(database_url: str, *, pool_size: int | None = 5, pre_ping: bool = True) -> Engine:
    """An engine whose sessions speak UTC, so timestamps round-trip unchanged.

    ``pool_size=None``: keep no connection open between uses (for rare writers).
    ``pre_ping=False``: no test query before each use; a dead connection then fails the
    statement instead (the pool drops it), which suits callers that retry anyway.
    """
    pooling: dict[str, Any] = (
        {"poolclass": NullPool}
        if pool_size is None
        else {"pool_size": pool_size, "pool_pre_ping": pre_ping}
    )
    return create_engine(
        sqlalchemy_url(database_url),
        connect_args={"options": "-c timezone=UTC", "application_name": "calls-worker"},
        **pooling,
    )
