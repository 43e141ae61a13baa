"""Engines are built when a process asks for one (after fork), never at import."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool


def sqlalchemy_url(database_url: str) -> URL:
    """Accept ``postgres://``, ``postgresql://`` or ``postgresql+psycopg://``; drive psycopg 3.

    Several hosts are accepted as libpq writes them, ``postgresql://u@h1:5432,h2:5432/db``
    (with ``target_session_attrs=read-write``: whichever is the primary), or as SQLAlchemy
    does, ``postgresql://u@/db?host=h1:5432&host=h2:5432``.
    """
    url = make_url(_hosts_in_query(database_url.replace("postgres://", "postgresql://", 1)))
    if url.get_backend_name() != "postgresql":
        raise ValueError(f"not a PostgreSQL URL: {url.render_as_string(hide_password=True)}")
    return url.set(drivername="postgresql+psycopg")


def _hosts_in_query(database_url: str) -> str:
    """libpq's list of hosts (``h1:p1,h2:p2``), which SQLAlchemy cannot parse, as its own
    repeated ``host`` parameters, in the same order."""
    parts = urlsplit(database_url)
    user, at, hosts = parts.netloc.rpartition("@")
    if "," not in hosts:
        return database_url
    query = [("host", host) for host in hosts.split(",")]
    query += parse_qsl(parts.query, keep_blank_values=True)
    fragment = f"#{parts.fragment}" if parts.fragment else ""
    return f"{parts.scheme}://{user}{at}{parts.path}?{urlencode(query)}{fragment}"


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
