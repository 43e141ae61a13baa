"""What a worker process needs at run time, built lazily in the process that uses it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.listing import SqlCallReader
from calls_worker.adapters.db.unit_of_work import SqlUnitOfWork
from calls_worker.config import Settings, signing_of
from calls_worker.domain.access import AccessPolicy
from calls_worker.worker.outage import DatabaseWatch


@dataclass
class Runtime:
    """The database of this worker, with one engine per process.

    Celery's prefork pool forks children from the parent: an engine (and its pooled
    connections) must never be shared across that fork, so each process builds its own
    on first use, and a child drops what it inherited without closing the parent's sockets.
    """

    database_url: str
    settings: Settings
    _engine: Engine | None = field(default=None, repr=False)
    _engine_pid: int = 0
    _reader: SqlCallReader | None = field(default=None, repr=False)
    # Made with the app, in the main process, so the pool's processes share it (outage.py).
    database_watch: DatabaseWatch = field(default_factory=DatabaseWatch, repr=False)

    def engine(self) -> Engine:
        """This process's engine (pool of 2: a task and a sweep lock at most)."""
        if self._engine is not None and self._engine_pid != os.getpid():
            self._engine.dispose(close=False)
            self._engine = None
        if self._engine is None:
            # No pre-ping: it would cost every command a round trip, and a command that
            # meets a dead connection is retried (settling.TRANSIENT_ERRORS) on a fresh one.
            self._engine = build_engine(self.database_url, pool_size=2, pre_ping=False)
            self._engine_pid = os.getpid()
        return self._engine

    @property
    def signed(self) -> bool:
        """Whether messages are signed (then a command must name its id and task)."""
        return signing_of(self.settings) is not None

    @property
    def access_policy(self) -> AccessPolicy:
        """What this deployment demands of the service accounts commands name."""
        return AccessPolicy(
            require_service_account=self.settings.require_service_account, signed=self.signed
        )

    def call_reader(self) -> SqlCallReader:
        """This process's reader for listings (it keeps the cursor key once read)."""
        engine = self.engine()
        if self._reader is None or self._reader.engine is not engine:
            self._reader = SqlCallReader(engine)
        return self._reader

    def unit_of_work(self) -> SqlUnitOfWork:
        """A unit of work on this process's engine, writing call events unless they are off."""
        return SqlUnitOfWork(self.engine(), events=self.settings.events)

    def unpooled_engine(self) -> Engine:
        """An engine that keeps no connection open, for the rare writes of a pool's parent."""
        return build_engine(self.database_url, pool_size=None)

    def dispose(self) -> None:
        if self._engine is not None and self._engine_pid == os.getpid():
            self._engine.dispose()
        self._engine = None


def runtime_of(app: Any) -> Runtime:
    """The Runtime that ``celery_app.create_app`` attached to this app."""
    runtime: Runtime = app.calls_runtime
    return runtime
