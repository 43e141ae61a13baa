"""`calls-worker send` with whatever a person may give it: every input ends in a clear
message and a documented exit status, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from uuid import uuid4

import pytest

from tests.db_world import Db
from tests.e2e.conftest import Process

ROOT = Path(__file__).resolve().parents[2]


def env_for(database_url: str, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLS_WORKER_")}
    return {**env, "CALLS_WORKER_DATABASE_URL": database_url, "CALLS_WORKER_BROKER_URL": redis_url}


def send(env: dict[str, str], *args: str, stdin: bytes = b"",
         cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
    argv = [sys.executable, "-m", "calls_worker", "send", *args]
    return subprocess.run(argv, env=env, input=stdin, capture_output=True, timeout=120,
                          check=False, cwd=cwd)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "status", "says"),
    [
        ("latin-1.json", '{"notes": "Müller"}'.encode("latin-1"), 2,
         "not UTF-8 text (byte 0xfc at offset 12)"),
        ("binary.json", b"\x00\xff\xfe\x01binary", 2, "not UTF-8 text (byte 0xff at offset 1)"),
        ("empty.json", b"", 2, "command is invalid"),
        ("huge.json", b'{"notes": "' + b"x" * 1_100_000 + b'"}', 2, "over 1048576 bytes"),
        ("a-directory", None, 2, "Is a directory"),
        ("missing.json", "missing", 2, "No such file or directory"),
    ],
)
def test_bad_input_is_refused_with_a_reason_and_exit_status_2(
    database_url: str, redis_url: str, tmp_path: Path, name: str, content: bytes | str | None,
    status: int, says: str,
) -> None:  # fmt: skip
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    done = send(env_for(database_url, redis_url), "create", str(path))
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == status, output
    assert says in output
    assert "Traceback" not in output


def test_a_file_with_a_byte_order_mark_is_read_from_where_you_are(
    db: Db, worker: Process, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    organization = db.organization(3)
    command = {"personUuid": str(db.person(organization)), "organizationUuid": str(organization)}
    (tmp_path / "cmd.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(command).encode())
    env = env_for(database_url, redis_url)
    done = subprocess.run([str(ROOT / "dev"), "send", "create", "cmd.json"], env=env,
                          capture_output=True, timeout=300, check=False, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert json.loads(done.stdout)["ok"] is True


def test_no_validate_sends_a_bad_command_as_a_producer_would_and_it_is_kept(
    db: Db, worker: Process, database_url: str, redis_url: str
) -> None:
    env = env_for(database_url, redis_url)
    done = send(env, "cancel", "--no-validate", "-", stdin=b'{"callUuid": "not a uuid"}')
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["error"]["code"] == "invalid"
    kept = db.sql("SELECT raw_body FROM worker_rejected_commands").scalars().all()
    assert len(kept) == 1
    assert "not a uuid" in kept[0]


def test_send_on_a_terminal_says_what_it_waits_for(database_url: str, redis_url: str) -> None:
    import pty

    terminal, its_end = pty.openpty()
    argv = [sys.executable, "-m", "calls_worker", "send", "create"]
    with subprocess.Popen(argv, stdin=its_end, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env_for(database_url, redis_url)) as child:  # fmt: skip
        os.close(its_end)
        try:
            assert child.stderr is not None
            said = child.stderr.readline().decode()
            assert "Reading the command's JSON from standard input; end it with Ctrl-D." in said
            os.write(terminal, b"{}\n\x04")  # a command, then Ctrl-D
            assert child.wait(60) == 2  # an empty create is invalid: refused before sending
        finally:
            os.close(terminal)
            child.kill()


def test_a_broker_that_does_not_answer_is_said_and_nothing_is_sent(
    database_url: str, tmp_path: Path
) -> None:
    (tmp_path / "c.json").write_text('{"personUuid": "x"}')
    done = send(env_for(database_url, "redis://:secret@127.0.0.1:9/0"), "create",
                str(tmp_path / "c.json"))  # fmt: skip
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 2, output
    assert "does not answer" in output
    assert "nothing was sent" in output
    assert "secret" not in output
    assert "Traceback" not in output


def test_no_outcome_in_time_says_the_command_id_to_ask_later(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    from tests.e2e.conftest import redis_database

    nobody_consumes = redis_database(redis_url, 8)
    command = {"personUuid": str(uuid4()), "organizationUuid": str(uuid4())}
    done = send(env_for(database_url, nobody_consumes), "create", "-", "--timeout", "1",
                "--command-id", "ask-me-later", stdin=json.dumps(command).encode())  # fmt: skip
    import redis

    redis.Redis.from_url(nobody_consumes).flushdb()  # the command nobody will take
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 3, output
    assert "sent command ask-me-later" in done.stderr.decode()
    assert "`calls-worker outcome ask-me-later`" in output
    assert "Traceback" not in output
