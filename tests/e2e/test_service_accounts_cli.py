"""`calls-worker service-accounts` and `calls list|show --as`, as a shell uses them."""

from __future__ import annotations

import json
import re
from uuid import UUID, uuid4

from tests.db_world import Db
from tests.e2e.test_directory import cli


def test_service_accounts_are_added_listed_and_disabled(db: Db, database_url: str) -> None:
    organization = db.organization(3)
    added = cli(database_url, "service-accounts", "add", "--name", "crm", "--organization",
                str(organization), "--scope", "calls:read", "--scope", "calls:create")  # fmt: skip
    assert added.returncode == 0, added.stderr
    account = UUID(added.stdout.strip())
    listed = json.loads(cli(database_url, "service-accounts", "list").stdout)
    mine = next(a for a in listed if a["uuid"] == str(account))
    assert mine["organizationUuid"] == str(organization)
    assert sorted(mine["scopes"]) == ["calls:create", "calls:read"]
    assert mine["disabledAt"] is None
    assert cli(database_url, "service-accounts", "disable", str(account)).returncode == 0
    listed = json.loads(cli(database_url, "service-accounts", "list").stdout)
    assert next(a for a in listed if a["uuid"] == str(account))["disabledAt"] is not None
    missing = cli(database_url, "service-accounts", "disable", str(uuid4()))
    assert missing.returncode == 1
    assert "no service account" in missing.stderr
    bad = cli(database_url, "service-accounts", "add", "--name", "x", "--organization",
              str(organization), "--scope", "calls:everything")  # fmt: skip
    assert bad.returncode == 2
    nowhere = cli(database_url, "service-accounts", "add", "--name", "x", "--organization",
                  str(uuid4()), "--scope", "calls:read")  # fmt: skip
    assert nowhere.returncode == 1
    assert "no organization" in nowhere.stderr


def test_calls_list_and_show_as_a_service_account(db: Db, database_url: str) -> None:
    mine, theirs = db.organization(3), db.organization(3)
    reached = [db.call(db.person(mine), theirs), db.call(db.person(theirs), mine)]
    hidden = db.call(db.person(theirs), theirs)
    account = _add_account(database_url, "reader", mine, "calls:read")

    lines = cli(database_url, "calls", "list", "--as", str(account), "--json", "--limit", "100")
    assert lines.returncode == 0, lines.stderr
    listed = [json.loads(line) for line in lines.stdout.splitlines()]
    assert {c["uuid"] for c in listed} == {str(c) for c in reached}
    assert all("attempts" in c for c in listed)

    table = cli(database_url, "calls", "list", "--as", str(account), "--limit", "1", "--table")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:3] == ["createdAt", "uuid", "status"]
    starts = [[m.start() for m in re.finditer(r"\S+", line)] for line in (header, row)]
    assert starts[0] == starts[1], (header, row)  # each value under its heading
    assert row.split()[1] in {str(c) for c in reached}
    cursor = table.stderr.split("--cursor ")[1].strip()
    second = cli(database_url, "calls", "list", "--as", str(account), "--limit", "1",
                 "--cursor", cursor, "--json")  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["uuid"] in {str(c) for c in reached} - {row.split()[1]}
    tampered = cli(database_url, "calls", "list", "--as", str(account), "--cursor", cursor[1:])
    assert tampered.returncode == 2  # a bad argument
    assert "cursor" in tampered.stderr

    assert cli(database_url, "calls", "show", str(reached[0]), "--as", str(account)).returncode == 0
    out_of_reach = cli(database_url, "calls", "show", str(hidden), "--as", str(account))
    assert out_of_reach.returncode == 1
    assert f"no call {hidden}" in out_of_reach.stderr  # as if it did not exist

    writer = _add_account(database_url, "writer", mine, "calls:create")
    refused = cli(database_url, "calls", "list", "--as", str(writer))
    assert refused.returncode == 1
    assert "calls:read" in refused.stderr


def _add_account(database_url: str, name: str, organization: UUID, scope: str) -> UUID:
    added = cli(database_url, "service-accounts", "add", "--name", name, "--organization",
                str(organization), "--scope", scope)  # fmt: skip
    return UUID(added.stdout.strip())
