"""Where the database and the broker are: the configured URLs, else the embedded servers.

With nothing configured, ``run`` starts an embedded PostgreSQL and Redis under the data
folder; every other command finds them there, so a second terminal can send commands to
the worker the first one runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import click

from calls_worker.adapters.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    running_redis,
    start_postgres,
    start_redis,
)
from calls_worker.config import LogFormat, Settings, get_settings
from calls_worker.wire import is_amqp


class NoBroker(click.ClickException):
    """No broker is configured and none runs: nothing can be sent (exit status 2)."""

    exit_code = 2


@dataclass
class Servers:
    """Resolved URLs, and the embedded servers this process started or attached to."""

    settings: Settings
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    started_redis: bool = field(default=False)

    def database_url(self) -> str:
        if self.settings.database_url:
            return self.settings.database_url
        if self.postgres is None:
            self.postgres = start_postgres(self.settings.data_dir / "postgres")
        return self.postgres.url

    def broker_url(self, *, start: bool) -> str:
        """The broker; with ``start`` false, only an embedded Redis that is already running."""
        if self.settings.broker_url:
            return self.settings.broker_url
        if self.redis is None:
            self.redis = running_redis(self.settings.data_dir / "redis")
            if self.redis is None:
                if not start:
                    raise NoBroker(
                        "no broker: set CALLS_WORKER_BROKER_URL, or start the worker with "
                        "`calls-worker run` (it starts an embedded Redis) in another terminal"
                    )
                self.redis = start_redis(self.settings.data_dir / "redis")
                self.started_redis = True
        return self.redis.url

    def result_backend_url(self, *, start: bool) -> str:
        """Where outcomes go: the configured URL; else the broker when it is Redis, the
        database when it is RabbitMQ (worker_results, adapters/results.py)."""
        if self.settings.result_backend_url:
            return self.settings.result_backend_url
        broker = self.broker_url(start=start)
        return self.database_url() if is_amqp(broker) else broker

    def describe(self) -> list[str]:
        lines = []
        if self.postgres is not None:
            lines.append(
                f"embedded PostgreSQL: {self.postgres.url} (data in {self.postgres.pgdata})"
            )
        if self.redis is not None:
            lines.append(f"embedded Redis: {self.redis.shown_url} (data in {self.redis.data_dir})")
        return lines

    def stop(self) -> None:
        """Stop what this process started (PostgreSQL stops when its last user lets go)."""
        if self.redis is not None and self.started_redis:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.stop()


def configured() -> Servers:
    """The servers the settings name (or the embedded ones)."""
    return Servers(get_settings())


def celery_app(servers: Servers, log_format: LogFormat = "text") -> Any:
    from calls_worker.worker.celery_app import create_app

    return create_app(
        database_url=servers.database_url(),
        broker_url=servers.broker_url(start=True),
        result_backend_url=servers.result_backend_url(start=True),
        settings=servers.settings,
        log_format=log_format,
    )


def engine_of(servers: Servers) -> Any:
    from calls_worker.adapters.db.engine import build_engine

    return build_engine(servers.database_url(), pool_size=1)
