"""The operator commands for the rows a call points at, and `calls show`, as a shell uses
them: each `add` prints the uuid alone, each `list` JSON in the API's camelCase."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from uuid import UUID, uuid4

from tests.db_world import Db


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLS_WORKER_")}
    env["CALLS_WORKER_DATABASE_URL"] = database_url
    return subprocess.run([sys.executable, "-m", "calls_worker", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


def test_organizations_persons_and_pledge_cases_are_added_and_listed(
    db: Db, database_url: str
) -> None:
    added = cli(database_url, "organizations", "add", "--name", "Acme", "--max-attempts", "2")
    assert added.returncode == 0, added.stderr
    organization = UUID(added.stdout.strip())
    person = UUID(cli(database_url, "persons", "add", "--organization", str(organization))
                  .stdout.strip())  # fmt: skip
    pledge_case = UUID(cli(database_url, "pledge-cases", "add", "--person", str(person))
                       .stdout.strip())  # fmt: skip

    organizations = json.loads(cli(database_url, "organizations", "list").stdout)
    assert {"uuid": str(organization), "name": "Acme", "maxCallAttempts": 2} in organizations
    table = cli(database_url, "organizations", "list", "--table").stdout.splitlines()
    assert table[0].split() == ["uuid", "name", "maxCallAttempts"]
    assert f"{organization}  Acme" in "\n".join(table)
    persons = json.loads(cli(database_url, "persons", "list", "--organization",
                             str(organization)).stdout)  # fmt: skip
    assert persons == [{"uuid": str(person), "owningOrganizationUuid": str(organization)}]
    cases = json.loads(cli(database_url, "pledge-cases", "list", "--person", str(person)).stdout)
    assert cases == [{"uuid": str(pledge_case), "personUuid": str(person)}]

    nobody = uuid4()
    refused = cli(database_url, "persons", "add", "--organization", str(nobody))
    assert refused.returncode == 1
    assert f"no organization {nobody}" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_calls_show_says_which_maximum_applies_and_since_when_a_call_is_due(
    db: Db, database_url: str
) -> None:
    owner = db.organization(2)
    performer = db.organization(None)
    call = db.call(db.person(owner), performer, attempts=2)

    shown = cli(database_url, "calls", "show", str(call))

    assert shown.returncode == 0, shown.stderr
    found = json.loads(shown.stdout)
    assert found["attemptCount"] == 2
    assert len(found["attempts"]) == 2
    assert found["organizationUuid"] == str(performer)
    assert found["owningOrganizationUuid"] == str(owner)
    assert found["maxCallAttempts"] == 2  # the owner's, not the performer's
    assert found["dueSince"] is not None
    missing = cli(database_url, "calls", "show", str(uuid4()))
    assert missing.returncode == 1
    assert "no call" in missing.stderr


def test_a_cursor_not_made_for_the_query_is_a_bad_argument(database_url: str) -> None:
    refused = cli(database_url, "calls", "list", "--cursor", "garbage")
    assert refused.returncode == 2, refused.stderr
    assert "the cursor" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_database_without_the_schema_is_said_not_a_traceback(empty_database_url: str) -> None:
    shown = cli(empty_database_url, "events", "tail")
    assert shown.returncode == 1, shown.stderr
    assert "schema is missing or older than this release" in shown.stderr
    assert "calls-worker migrate" in shown.stderr
    assert "Traceback" not in shown.stderr
    nowhere = cli("postgresql://nobody@127.0.0.1:9/none", "organizations", "list")
    assert nowhere.returncode == 1, nowhere.stderr
    assert "the database does not answer" in nowhere.stderr
    assert "Traceback" not in nowhere.stderr
