"""The command line's and the settings' contracts that need no server (cli/, config.py),
and the worker's log lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from click.testing import CliRunner

from calls_worker.cli.main import main
from calls_worker.cli.replay import replay_id
from calls_worker.worker.logs import formatter

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_json_schemas_are_current(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["schema", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    generated = sorted(tmp_path.iterdir())
    assert len(generated) == 7  # five commands, the listing query and the call events
    for schema in generated:
        committed = ROOT / "docs/schemas" / schema.name
        assert committed.read_text() == schema.read_text(), f"regenerate {committed}"


def test_json_log_lines_carry_the_command_fields() -> None:
    record = logging.LogRecord(
        "calls_worker", logging.INFO, __file__, 1, "command %s", ("x",), None
    )
    record.command_id, record.outcome = "cmd-1", "ok"
    line = json.loads(formatter("json").format(record))
    assert (line["message"], line["command_id"], line["outcome"]) == ("command x", "cmd-1", "ok")
    assert line["level"] == "INFO"


def test_a_replay_id_is_stable_for_the_same_command() -> None:
    same = replay_id(7, '{"b": 1, "a": 2}') == replay_id(7, {"a": 2, "b": 1})
    assert same
    assert replay_id(7, {"a": 1}) != replay_id(7, {"a": 2})
    assert replay_id(7, {"a": 1}) != replay_id(8, {"a": 1})


def test_the_docs_show_the_current_settings() -> None:
    from calls_worker.config import settings_table

    readme = (ROOT / "docs" / "settings.md").read_text()
    shown = readme.split("<!-- settings:start")[1].split("-->", 1)[1].split("<!-- settings:end")[0]
    assert shown.strip() == settings_table().strip()


def test_a_setting_can_come_from_a_file(tmp_path: Path) -> None:
    from calls_worker.config import Settings, _from_files

    secret = tmp_path / "auth"
    secret.write_text("ops:from-a-file\n")
    environ = {"CALLS_WORKER_FLOWER_BASIC_AUTH_FILE": str(secret)}
    settings = Settings(**_from_files(environ))
    assert settings.flower_basic_auth is not None
    assert settings.flower_basic_auth.get_secret_value() == "ops:from-a-file"
    assert "from-a-file" not in repr(settings)
    direct = {**environ, "CALLS_WORKER_FLOWER_BASIC_AUTH": "ops:direct"}
    assert _from_files(direct) == {}


def test_a_remembered_redis_port_is_probed_briefly_and_once() -> None:
    """A restart (or status, or send) asks the port of the last run whether the embedded
    Redis is still there: a closed or foreign port must not hold it up for seconds."""
    from calls_worker.adapters.embedded import LOOPBACK_PROBE_SECONDS, probe_client

    client = probe_client(6399, "secret")
    settings = client.connection_pool.connection_kwargs
    assert LOOPBACK_PROBE_SECONDS <= 0.5
    assert settings["socket_connect_timeout"] == LOOPBACK_PROBE_SECONDS
    assert settings["socket_timeout"] == LOOPBACK_PROBE_SECONDS
    assert client.get_retry()._retries == 0
    client.close()


def test_docs_examples_hold_a_valid_command_of_every_kind() -> None:
    """docs/examples/<kind>.json for every command kind, each one the worker accepts."""
    from calls_worker.cli.sending import KINDS
    from calls_worker.domain.commands import parse_command

    for name, kind in KINDS.items():
        path = ROOT / "docs" / "examples" / f"{name}.json"
        parse_command(kind, path.read_text())  # raises InvalidCommand if it is not


def test_the_readme_lists_every_command() -> None:
    from calls_worker.cli.main import main

    readme = (ROOT / "README.md").read_text()
    table = readme.split("| command | what it does |")[1].split("\n\n")[0]
    for name in main.commands:
        assert f"`calls-worker {name}" in table or f"`{name} " in table, name


def test_the_sweeps_batch_follows_events_unless_set() -> None:
    from calls_worker.config import Settings, sweep_batch_size

    assert sweep_batch_size(Settings(events=True)) == 1000
    assert sweep_batch_size(Settings(events=False)) == 5000
    assert sweep_batch_size(Settings(events=True, sweep_batch_size=77)) == 77


def test_the_lines_per_command_and_per_batch_can_be_turned_down() -> None:
    from calls_worker.config import Settings
    from calls_worker.worker import batch_job, keeping
    from calls_worker.worker.logs import COMMANDS_LOGGER, use_format

    settings = Settings(command_log_level="warning", log_level="debug", log_format="json")
    assert (settings.command_log_level, settings.log_level) == ("WARNING", "DEBUG")
    assert keeping.command_lines is batch_job.command_lines is logging.getLogger(COMMANDS_LOGGER)
    try:
        use_format("text", settings.command_log_level)
        assert not keeping.command_lines.isEnabledFor(logging.INFO)
        assert keeping.command_lines.isEnabledFor(logging.WARNING)
        use_format("text", "INFO")
        assert keeping.command_lines.isEnabledFor(logging.INFO)
    finally:
        logging.getLogger(COMMANDS_LOGGER).setLevel(logging.NOTSET)


# The README's shell blocks that no walkthrough runs, each with what runs it instead.
RUN_ELSEWHERE = {
    "./dev run": "tests/e2e/test_walkthrough.py starts it; .ci/run is ./dev test",
    "docker build -f deploy/Dockerfile": "tests/containers/test_image.py builds this file",
    "docker compose -f docker-compose.yml -f docker-compose.rabbitmq.yml":
        "tests/containers/test_compose.py brings both files up",
    "./dev test-newest": "not in CI: it resolves the newest releases from PyPI (minutes);"
                         " run by hand before moving the pins",
    "./dev test-cluster": "not in CI: tests/cluster needs RabbitMQ's own nodes and iptables,"
                          " and 15 minutes; its last run is in docs/reliability.md",
}


def test_every_shell_block_of_the_readme_is_run_somewhere() -> None:
    import re

    readme = (ROOT / "README.md").read_text()
    tested = ""
    for marker in ("walkthrough", "accounts", "checklist"):
        tested += readme.split(f"<!-- {marker}:start")[1].split(f"<!-- {marker}:end")[0]
    for block in re.findall(r"```sh\n(.*?)```", readme, re.DOTALL):
        if block in tested:
            continue
        assert any(block.startswith(start) for start in RUN_ELSEWHERE), (
            f"a shell block of the README that nothing runs:\n{block}"
        )
    for where in RUN_ELSEWHERE.values():
        path = where.split()[0]
        assert path.startswith(("not", ".ci", "tests/")), where
        assert not path.startswith("tests/") or (ROOT / path).exists(), where
