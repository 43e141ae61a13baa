"""Schema upgrades with alembic, safe to run twice and from two processes at once."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

# The Calls API shares this database and may use alembic itself: keep our own version table.
VERSION_TABLE = "calls_worker_alembic_version"
# Any constant will do; two migrating processes take turns on it.
_MIGRATION_LOCK = 7_304_118_001


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; a no-op when it is there already."""
    _run(engine, lambda config: command.upgrade(config, revision))


def downgrade(engine: Engine, revision: str) -> None:
    """Take the schema back to ``revision`` (``base``: nothing of ours left)."""
    _run(engine, lambda config: command.downgrade(config, revision))


GRANTS = Path(__file__).parent / "grants.sql"
_GRANTEE = "calls_worker_app"
_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def grant_to(engine: Engine, role: str) -> None:
    """Grant ``role`` what the worker, beat and Flower need, and nothing more (grants.sql).

    Idempotent; run after every upgrade, as the owner of the worker's objects. Raises
    ValueError for a role name that is not a plain lower-case identifier.
    """
    if not _ROLE_NAME.fullmatch(role):
        raise ValueError(f"not a plain role name: {role!r}")
    with engine.begin() as connection:
        connection.exec_driver_sql(GRANTS.read_text().replace(_GRANTEE, role))


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_config()).get_current_head()


def _run(engine: Engine, action: Callable[[Config], object]) -> None:
    config = _config()
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK})
        connection.commit()
        try:
            config.attributes["connection"] = connection
            action(config)
            connection.commit()
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK})
            connection.commit()
