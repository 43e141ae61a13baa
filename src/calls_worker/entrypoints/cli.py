"""The ``calls-worker`` command line."""

from __future__ import annotations

import json
from pathlib import Path

import click

from calls_worker.config import get_settings


def _database_url() -> str:
    settings = get_settings()
    if settings.database_url:
        return settings.database_url
    from calls_worker.adapters.embedded import start_postgres

    server = start_postgres(settings.data_dir / "postgres")
    click.echo(f"using the embedded PostgreSQL in {server.pgdata}", err=True)
    return server.url


@click.group()
def main() -> None:
    """Consumes call commands and expires calls whose attempts are exhausted."""


@main.command()
def migrate() -> None:
    """Upgrade the database schema to the newest revision (safe to run again)."""
    from calls_worker.adapters.db.engine import build_engine
    from calls_worker.adapters.db.migrate import current_revision, upgrade

    engine = build_engine(_database_url(), pool_size=1)
    try:
        upgrade(engine)
        click.echo(f"schema at revision {current_revision(engine)}")
    finally:
        engine.dispose()


@main.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write one <kind>.schema.json per command here instead of printing them all.",
)
def schema(out: Path | None) -> None:
    """The JSON Schema of every command, for producers in other languages."""
    from calls_worker.domain.commands import COMMANDS

    schemas = {kind: model.model_json_schema(by_alias=True) for kind, model in COMMANDS.items()}
    if out is None:
        click.echo(json.dumps(schemas, indent=2))
        return
    out.mkdir(parents=True, exist_ok=True)
    for kind, document in schemas.items():
        (out / f"{kind}.schema.json").write_text(json.dumps(document, indent=2) + "\n")
    click.echo(f"wrote {len(schemas)} schemas to {out}")
