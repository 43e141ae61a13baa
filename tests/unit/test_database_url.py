"""The database URLs the worker accepts, as the engine will use them."""

from __future__ import annotations

import pytest

from calls_worker.adapters.db.engine import sqlalchemy_url


@pytest.mark.parametrize(
    ("given", "hosts", "query"),
    [
        ("postgres://u@db:5432/calls", None, {}),
        ("postgresql+psycopg://u:p@db/calls?sslmode=require", None, {"sslmode": "require"}),
        # libpq's list of hosts, as a deployment with a standby writes it
        ("postgresql://u:p@db1:5432,db2:5433/calls?target_session_attrs=read-write",
         ("db1:5432", "db2:5433"), {"target_session_attrs": "read-write"}),
        ("postgresql://db1,db2:6432/calls", ("db1", "db2:6432"), {}),
        # SQLAlchemy's own spelling of the same
        ("postgresql://u@/calls?host=db1:5432&host=db2:5433",
         ("db1:5432", "db2:5433"), {}),
    ],
)  # fmt: skip
def test_hosts(given: str, hosts: tuple[str, ...] | None, query: dict[str, str]) -> None:
    url = sqlalchemy_url(given)
    assert url.drivername == "postgresql+psycopg"
    assert url.database == "calls"
    assert url.query.get("host") == hosts
    assert {k: v for k, v in url.query.items() if k != "host"} == query


def test_a_list_of_hosts_keeps_the_user_and_password() -> None:
    url = sqlalchemy_url("postgresql://calls:s%40cret@db1:5432,db2:5432/calls")
    assert (url.username, url.password) == ("calls", "s@cret")
    assert "s@cret" not in url.render_as_string(hide_password=True)
