"""Every option and argument of every command, given a bad value: a message naming what is
wrong and exit status 2, before anything is started or sent; never a traceback.

The table must hold a row for each parameter that takes a value (flags take none): a
command or option added without one fails ``test_the_table_covers_every_parameter``.
"""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from calls_worker.cli import main as cli_main
from calls_worker.cli.main import main

NOT_PEM = "not-a-certificate.pem"
MISSING = "no/such/file.json"
SA = ["--name", "n", "--organization", "11111111-1111-4111-8111-111111111111",
      "--scope", "calls:read"]  # fmt: skip

# (command, parameter) -> [(arguments after the command, what the message says)]
TABLE: dict[tuple[str, str], list[tuple[list[str], str]]] = {
    ("run", "log_format"): [(["--log-format", "xml"], "'xml' is not one of")],
    ("run", "flower_port"): [(["--flower-port", "0"], "not in the range 1<=x<=65535"),
                             (["--flower-port", "x"], "'x' is not a valid integer")],
    ("worker", "log_format"): [(["--log-format", ""], "'' is not one of")],
    ("worker", "queues"): [(["-Q", "calls.commands,"], "none of them empty"),
                           (["-Q", ""], "'': give queue names")],
    ("worker", "concurrency"): [(["-c", "0"], "0 is not in the range x>=1"),
                                (["-c", "-1"], "-1 is not in the range x>=1")],
    ("worker", "hostname"): [(["-n", " "], "must not be empty")],
    ("worker", "include"): [(["-I", "no_such_module_here"], "no module named")],
    ("beat", "log_format"): [(["--log-format", "yaml"], "'yaml' is not one of")],
    ("run", "log_level"): [(["--loglevel", "loud"], "'loud' is not one of")],
    ("worker", "log_level"): [(["-l", "trace"], "'trace' is not one of")],
    ("beat", "log_level"): [(["-l", ""], "'' is not one of")],
    ("flower", "address"): [(["--address", "example"], "is not an IP address")],
    ("flower", "port"): [(["--port", "70000"], "not in the range 1<=x<=65535")],
    ("ping", "hostname"): [(["-n", ""], "must not be empty")],
    ("ping", "timeout"): [(["-n", "w@h", "--timeout", "-1"], "not in the range x>0"),
                          (["-n", "w@h", "--timeout", "nan"], "not a number of seconds")],
    ("migrate", "grantee"): [(["--grant-to", ""], "must not be empty")],
    ("migrate", "batch_size"): [(["--batch-size", "0"], "not in the range x>=1")],
    ("send", "kind"): [(["attempt"], "'attempt' is not one of")],
    ("send", "file"): [(["create", MISSING], "No such file or directory")],
    ("send", "command_id"): [(["create", "--command-id", ""], "must not be empty"),
                             (["create", "--command-id", "x" * 201], "at most 200")],
    ("send", "timeout"): [(["create", "--timeout", "0"], "not in the range x>0")],
    ("send", "account"): [(["create", "--as", "me"], "'me' is not a valid UUID")],
    ("outcome", "command_id"): [(["\t"], "must not be empty")],
    ("schema", "out"): [(["--out", "/proc/nope"], "cannot write there")],
    ("organizations add", "name"): [(["--name", ""], "must not be empty")],
    ("organizations add", "max_attempts"): [
        (["--name", "n", "--max-attempts", "0"], "0: a maximum is 1 attempt or more"),
        (["--name", "n", "--max-attempts", "-1"], "for no limit, leave --max-attempts out"),
        (["--name", "n", "--max-attempts", "two"], "'two' is not a valid integer")],
    ("persons add", "organization"): [(["--organization", "x"], "not a valid UUID")],
    ("persons list", "organization"): [(["--organization", "x"], "not a valid UUID")],
    ("pledge-cases add", "person"): [(["--person", "x"], "not a valid UUID")],
    ("pledge-cases list", "person"): [(["--person", "x"], "not a valid UUID")],
    ("calls show", "call"): [(["x"], "not a valid UUID")],
    ("calls show", "account"): [(["11111111-1111-4111-8111-111111111111", "--as", "x"],
                                 "not a valid UUID")],
    ("calls list", "organization"): [(["--organization", "x"], "not a valid UUID")],
    ("calls list", "person"): [(["--person", "x"], "not a valid UUID")],
    ("calls list", "status"): [(["--status", "done"], "'done' is not one of")],
    ("calls list", "call_type"): [(["--type", "cold"], "'cold' is not one of")],
    ("calls list", "limit"): [(["--limit", "101"], "not in the range 1<=x<=100")],
    ("calls list", "cursor"): [(["--cursor", ""], "must not be empty")],  # more: test_directory
    ("calls list", "account"): [(["--as", "x"], "not a valid UUID")],
    ("service-accounts add", "name"): [(["--name", ""], "must not be empty")],
    ("service-accounts add", "organization"): [(["--organization", "x"], "not a valid UUID")],
    ("service-accounts add", "scopes"): [(["--scope", "calls:all"], "'calls:all' is not one of")],
    ("service-accounts add", "certificate"): [([*SA, "--certificate", NOT_PEM],
                                               "holds no PEM certificate")],
    ("service-accounts disable", "account"): [(["x"], "not a valid UUID")],
    ("events tail", "call_uuid"): [(["--call", "x"], "not a valid UUID")],
    ("events tail", "lines"): [(["-n", "-1"], "-1 is not in the range x>=0")],
    ("events tail", "interval"): [(["--interval", "0"], "not in the range x>0")],
    ("dead-letters list", "since"): [(["--since", "yesterday"], "'yesterday' does not match")],
    ("dead-letters list", "reason"): [(["--reason", ""], "must not be empty")],
    ("dead-letters list", "limit"): [(["--limit", "-1"], "-1 is not in the range x>=1")],
    ("dead-letters replay", "rejected_id"): [(["0"], "0 is not in the range x>=1"),
                                             (["one"], "'one' is not a valid integer")],
    ("dead-letters replay", "file"): [(["1", MISSING], "No such file or directory")],
    ("dead-letters replay", "since"): [(["--since", "2026-13-01"], "does not match")],
    ("dead-letters replay", "reason"): [(["--reason", " "], "must not be empty")],
    ("dead-letters replay", "timeout"): [(["1", "--timeout", "inf"], "not a number of seconds")],
    ("dead-letters dismiss", "rejected_ids"): [(["1", "-2"], "No such option '-2'"),
                                               (["1", "0"], "0 is not in the range x>=1")],
    ("dead-letters dismiss", "since"): [(["--since", "soon"], "does not match")],
    ("dead-letters dismiss", "reason"): [(["--reason", ""], "must not be empty")],
}


def commands(group: click.Group = main, path: str = "") -> dict[str, click.Command]:
    found: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        full = f"{path} {name}".strip()
        if isinstance(command, click.Group):
            found |= commands(command, full)
        else:
            found[full] = command
    return found


def test_the_table_covers_every_parameter() -> None:
    taking_values = {
        (path, param.name)
        for path, command in commands().items()
        for param in command.params
        if param.name and not (isinstance(param, click.Option) and param.is_flag)
    }
    assert not taking_values - set(TABLE), "parameters with no bad-input row"
    assert not set(TABLE) - taking_values, "rows for parameters that are gone"


ROWS = [(f"{path}:{name}:{n}", path, argv, says)
        for (path, name), rows in TABLE.items() for n, (argv, says) in enumerate(rows)]  # fmt: skip


@pytest.mark.parametrize(("path", "argv", "says"), [row[1:] for row in ROWS],
                         ids=[row[0] for row in ROWS])  # fmt: skip
def test_a_bad_value_gets_a_message_and_exit_status_2(
    path: str, argv: list[str], says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / NOT_PEM).write_text("-----BEGIN NOTHING-----\n")
    # Servers that cannot answer: a value let through would fail there, with another status.
    monkeypatch.setenv("CALLS_WORKER_DATABASE_URL", "postgresql://nobody@127.0.0.1:9/none")
    monkeypatch.setenv("CALLS_WORKER_BROKER_URL", "redis://127.0.0.1:9/0")
    monkeypatch.setenv("CALLS_WORKER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(cli_main, "end_on_signals", lambda: None)  # pytest's signals stay
    from calls_worker.config import get_settings

    get_settings.cache_clear()
    result = CliRunner().invoke(main, [*path.split(), *argv])
    get_settings.cache_clear()
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert "Traceback" not in result.output
