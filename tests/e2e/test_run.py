"""The README's first command: `calls-worker run` on the embedded default, then Ctrl-C."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from sqlalchemy import text

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.embedded import running_redis
from tests.e2e.conftest import Process, free_ports, wait_until


def running(pid: int) -> bool:
    """Alive and not a zombie (the daemonized postmaster's reaper is not ours to run)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def flower_answers(url: str, auth: str) -> bool:
    request = urllib.request.Request(f"{url}api/workers")
    request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as error:
        error.close()
        return False
    except OSError:
        return False


def embedded_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLS_WORKER_")}
    return {**env, "CALLS_WORKER_DATA_DIR": str(data_dir)}


def send(
    env: dict[str, str], kind: str, command: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "calls_worker", "send", kind, "-"],
        input=json.dumps(command), env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_run_starts_everything_accepts_a_command_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {
        **embedded_env(data_dir),
        "CALLS_WORKER_SWEEP_INTERVAL_SECONDS": "1",
        "CALLS_WORKER_METRICS_PORT": str(free_ports(3)),
    }
    flower_port = free_ports(1)
    run = Process(["run", "--flower", "--flower-port", str(flower_port)], env, tmp_path / "run.log")
    try:
        wait_until(lambda: "Ctrl-C stops everything" in run.output(), 120, "run to start")
        output = run.output()
        children = [int(pid) for pid in re.findall(r"^\w+: pid (\d+)", output, re.MULTILINE)]
        assert len(children) == 4, output
        login = re.search(r"Flower: (\S+) \(user (\S+), password (\S+);", output)
        assert login is not None, output
        flower_url, user, password = login.groups()
        assert flower_url == f"http://127.0.0.1:{flower_port}/"
        wait_until(lambda: flower_answers(flower_url, f"{user}:{password}"), 60, "Flower")
        assert not flower_answers(flower_url, f"{user}:wrong")
        database_url = re.search(r"embedded PostgreSQL: (\S+)", output)
        assert database_url is not None, output
        postmaster = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])

        engine = build_engine(database_url.group(1), pool_size=1)
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO organizations VALUES ('11111111-1111-4111-8111-111111111111', 'o', 1);"
                "INSERT INTO persons VALUES ('22222222-2222-4222-8222-222222222222',"
                " '11111111-1111-4111-8111-111111111111')"
            ))  # fmt: skip
        person = {
            "personUuid": "22222222-2222-4222-8222-222222222222",
            "organizationUuid": "11111111-1111-4111-8111-111111111111",
        }
        created = send(env, "create", person)  # from a "second terminal": nothing configured
        assert created.returncode == 0, created.stderr
        call = json.loads(created.stdout)["call"]["uuid"]
        attempted = send(env, "add-attempt", {
            "callUuid": call, "userUuid": person["personUuid"],
            "attemptedAt": "2026-01-01T00:00:00Z",
        })  # fmt: skip
        assert json.loads(attempted.stdout)["call"]["attemptCount"] == 1

        def expired_by_beat() -> bool:
            with engine.connect() as connection:
                status = connection.execute(
                    text("SELECT status FROM calls WHERE uuid = :u"), {"u": call}
                ).scalar()
            return status == "expired"

        wait_until(expired_by_beat, 30, "beat's sweep to expire the call at its limit")
        engine.dispose()

        argv = [sys.executable, "-m", "calls_worker", "run"]
        second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60,
                                check=False)  # fmt: skip
        assert second.returncode == 1
        assert f"another calls-worker run (pid {run.popen.pid})" in second.stderr
        assert "Traceback" not in second.stderr

        assert run.stop(signal.SIGINT, timeout=90) == 0, run.output()
    finally:
        run.stop(signal.SIGKILL)
    assert "stopped" in run.output()
    assert not [pid for pid in [*children, postmaster] if running(pid)]
    assert running_redis(data_dir / "redis") is None


def postmaster(data_dir: Path) -> int | None:
    """The embedded PostgreSQL's pid, if it runs."""
    try:
        pid = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if running(pid) else None


def users(data_dir: Path) -> list[int]:
    """The processes the embedded PostgreSQL counts as its users."""
    listed: list[int] = json.loads((data_dir / "postgres" / ".handle_pids.json").read_text())
    return listed


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_the_embedded_postgresql_stops_however_the_command_that_started_it_ends(
    tmp_path: Path, sig: int
) -> None:
    data_dir = tmp_path / "data"
    env = embedded_env(data_dir)
    argv = [sys.executable, "-m", "calls_worker"]
    migrated = subprocess.run([*argv, "migrate"], env=env, capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip
    assert migrated.returncode == 0, migrated.stderr
    assert postmaster(data_dir) is None  # the command let go, and it was the only user

    # Stopped by a signal (`timeout 4 calls-worker events tail -f`, a closed terminal).
    follower = Process(["events", "tail", "-f", "--interval", "0.2"], env, tmp_path / "tail.log")
    try:
        wait_until(lambda: postmaster(data_dir) and follower.popen.pid in users(data_dir), 60,
                   "the follower to start the embedded PostgreSQL")  # fmt: skip
        assert follower.stop(sig, timeout=30) == 128 + sig
    finally:
        follower.stop(signal.SIGKILL)
    assert "Traceback" not in follower.output(), follower.output()
    wait_until(lambda: postmaster(data_dir) is None, 30, "the embedded PostgreSQL to stop")
    assert users(data_dir) == []

    # A user that died without letting go (killed outright) no longer keeps it running.
    gone = subprocess.Popen(["true"])
    gone.wait()
    (data_dir / "postgres" / ".handle_pids.json").write_text(json.dumps([gone.pid]))
    listed = subprocess.run([*argv, "organizations", "list"], env=env, capture_output=True,
                            text=True, timeout=120, check=False)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert postmaster(data_dir) is None
    assert users(data_dir) == []
