"""Outcomes in PostgreSQL: a Celery result backend on the worker's table ``worker_results``.

For deployments with no Redis at all (a RabbitMQ broker): ``CALLS_WORKER_RESULT_BACKEND_URL``
(or the producer client's ``result_backend_url``) set to a ``postgresql://`` URL. It is a
key/value store, as Celery's Redis backend is: Celery encodes each outcome (JSON) under
its key, ``celery-task-meta-<command id>``; this class only keeps the pairs.

Why not Celery's own database backend (``db+postgresql://``): it stores results with
``PickleType``, so whoever can write its table runs code in every producer that reads an
outcome; its engine keeps no connection between uses outside a forked worker (a producer
connects for every poll); and it writes each result with a query, a merge and a commit.
Here the value is JSON text, a producer keeps a small pool, a write is one upsert and a
batch's outcomes are one statement.

The table is UNLOGGED (migration 0009): no WAL, so an outcome costs the database little;
after a crash of PostgreSQL the table is empty, and a producer asking for an outcome then
gets it from the processed-command record (``calls.outcome``), which is logged and kept
PROCESSED_RETENTION_HOURS. Rows past their expiry are invisible at once and deleted by the
hourly ``calls.prune``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

from celery.backends.base import KeyValueStoreBackend
from sqlalchemy import Engine, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.types import Text

from calls_worker.adapters.db.engine import build_engine

TABLE = "worker_results"

_UPSERT = (
    f"INSERT INTO {TABLE} (key, value, expires_at)"
    " SELECT k, v, now() + make_interval(secs => :ttl)"
    " FROM unnest(CAST(:keys AS text[]), CAST(:values AS text[])) AS pair (k, v)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at"
)


def _text(key: bytes | str) -> str:
    return key.decode() if isinstance(key, bytes) else key


class PostgresResults(KeyValueStoreBackend):
    """Celery's key/value result backend with the pairs in ``worker_results``."""

    # Expiry is kept here (expires_at; calls.prune deletes): beat need not schedule
    # Celery's backend_cleanup.
    supports_autoexpire = True
    supports_native_join = False

    def __init__(self, url: str | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One instance for all of a process's threads (its engine is thread-safe), not one
        # per thread with a pool each, as Celery does for a backend that is not.
        self.thread_safe = True
        if not url:
            raise ValueError("PostgresResults needs the postgresql:// URL of the database")
        self.url = url
        self._engine: Engine | None = None
        self._pid = 0

    def engine(self) -> Engine:
        """This process's engine (a forked pool process builds its own)."""
        if self._engine is not None and self._pid != os.getpid():
            self._engine.dispose(close=False)
            self._engine = None
        if self._engine is None:
            self._engine = build_engine(self.url, pool_size=2)
            self._pid = os.getpid()
        return self._engine

    def dispose(self) -> None:
        """Close this process's connections (the producer client's ``close``)."""
        if self._engine is not None and self._pid == os.getpid():
            self._engine.dispose()
        self._engine = None

    def _ttl(self) -> float:
        expires = getattr(self, "expires", None)
        if isinstance(expires, timedelta):
            return expires.total_seconds()
        return float(expires or 86400)

    def get(self, key: bytes | str) -> str | None:
        with self.engine().connect() as connection:
            value: str | None = connection.execute(
                text(f"SELECT value FROM {TABLE} WHERE key = :key AND expires_at > now()"),
                {"key": _text(key)},
            ).scalar()
        return value

    def mget(self, keys: Sequence[bytes | str]) -> list[str | None]:
        wanted = [_text(k) for k in keys]
        with self.engine().connect() as connection:
            rows = connection.execute(
                text(f"SELECT key, value FROM {TABLE}"
                     " WHERE key = ANY(:keys) AND expires_at > now()").bindparams(
                    bindparam("keys", type_=ARRAY(Text))),
                {"keys": wanted},
            ).all()  # fmt: skip
        found = {k: v for k, v in rows}
        return [found.get(k) for k in wanted]

    def set(self, key: bytes | str, value: str | bytes) -> None:
        self.set_many([(key, value)])

    def set_many(self, pairs: Iterable[tuple[bytes | str, str | bytes]]) -> None:
        """Keep several pairs in one statement (a batch's outcomes). A key given twice (two
        deliveries of one command in a batch) keeps its last value: one statement may not
        write a row twice."""
        latest = {_text(key): _text(value) for key, value in pairs}
        if not latest:
            return
        keys, values = list(latest), list(latest.values())
        with self.engine().begin() as connection:
            connection.execute(
                text(_UPSERT), {"keys": keys, "values": values, "ttl": self._ttl()}
            )

    def delete(self, key: bytes | str) -> None:
        with self.engine().begin() as connection:
            connection.execute(text(f"DELETE FROM {TABLE} WHERE key = :key"), {"key": _text(key)})

    def expire(self, key: bytes | str, value: int) -> None:
        """Nothing to do: ``set`` gives every pair its expiry."""

    def incr(self, key: bytes | str) -> int:
        raise NotImplementedError("chords are not used by calls-worker")

    def as_uri(self, include_password: bool = False) -> str:
        from calls_worker.adapters.db.engine import sqlalchemy_url

        return str(sqlalchemy_url(self.url).render_as_string(hide_password=not include_password))

    def __reduce__(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                   ) -> Any:  # fmt: skip
        return super().__reduce__(args, dict(kwargs or {}, url=self.url))  # type: ignore[call-arg]

