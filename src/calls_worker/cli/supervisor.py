"""``calls-worker run``: everything a newcomer needs in one foreground process.

It resolves (or starts) the database and the broker, migrates, and runs as child
processes a command worker, a sweep worker (so a flood of commands never delays a sweep)
and beat. Ctrl-C, SIGTERM or SIGHUP stops the children with a warm shutdown, then the
embedded servers it started. Children die with it even if it is killed outright (PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import click

from calls_worker.adapters.embedded import free_port
from calls_worker.cli.servers import Servers
from calls_worker.config import LogFormat, LogLevel

SHUTDOWN_GRACE_SECONDS = 60
# The children's metrics ports: CALLS_WORKER_METRICS_PORT, and the next two.
METRICS_ORDER = ("worker", "sweeper", "beat")
_PR_SET_PDEATHSIG = 1
# How long a child may take to serve its metrics port before the run gives up on it.
SERVE_WAIT_SECONDS = 120


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "calls_worker", *args],
        env=env,
        # Own process group: a Ctrl-C reaches only us, and we stop the children in order.
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )


@contextmanager
def sole_run(data_dir: Path) -> Iterator[None]:
    """Hold ``data_dir`` for this run: a second ``calls-worker run`` on the same folder
    would start a second beat (and fight over the embedded servers), so it is refused,
    naming the first. The lock goes with the process, however it ends."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = (data_dir / "run.lock").open("a+")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise click.ClickException(
                f"another calls-worker run (pid {holder}) is running on {data_dir.resolve()}:"
                " stop it first, or give this one CALLS_WORKER_DATA_DIR of its own"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield
    finally:
        lock.close()


def run_everything(
    servers: Servers, *, log_format: LogFormat, log_level: LogLevel = "INFO",
    flower_port: int | None = None,
) -> int:
    """Run until a signal or until a child dies; the exit status."""
    from calls_worker.adapters.db.engine import build_engine
    from calls_worker.adapters.db.migrate import current_revision, upgrade

    stopping: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    children: dict[str, subprocess.Popen[bytes]] = {}
    try:
        database_url = servers.database_url()
        broker_url = servers.broker_url(start=True)
        # The data folder is this run's (sole_run): an embedded Redis running on it, left by
        # a command that was killed, is this run's to stop as well.
        servers.started_redis = servers.redis is not None
        engine = build_engine(database_url, pool_size=1)
        upgrade(engine)
        revision = current_revision(engine)
        engine.dispose()
        inherited = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        env = {
            **inherited,
            "CALLS_WORKER_DATABASE_URL": database_url,
            "CALLS_WORKER_BROKER_URL": broker_url,
            "CALLS_WORKER_RESULT_BACKEND_URL": servers.result_backend_url(start=True),
            "CALLS_WORKER_DATA_DIR": str(servers.settings.data_dir.resolve()),
        }
        fmt = ["--log-format", log_format, "--loglevel", log_level]
        settings = servers.settings
        ports = metrics_ports(settings.metrics_port,
                              explicit="metrics_port" in settings.model_fields_set)  # fmt: skip
        children["worker"] = _spawn(
            ["worker", *fmt, "-Q", "calls.commands", "-n", "commands@%h"],
            {**env, "CALLS_WORKER_METRICS_PORT": str(ports["worker"])},
        )
        children["sweeper"] = _spawn(
            ["worker", *fmt, "-Q", "calls.sweeps", "-c", "1", "-n", "sweeps@%h"],
            {**env, "CALLS_WORKER_METRICS_PORT": str(ports["sweeper"])},
        )
        children["beat"] = _spawn(
            ["beat", *fmt], {**env, "CALLS_WORKER_METRICS_PORT": str(ports["beat"])}
        )
        flower_login = None
        if flower_port:
            from calls_worker.cli.flower import start_flower

            children["flower"], flower_login = start_flower(env, flower_port)
            ports["flower"] = 0
        for line in servers.describe():
            click.echo(line)
        click.echo(f"schema at revision {revision}")
        for name, child in children.items():
            # An address is shown once it is served: a child that cannot serve its port
            # exits saying why, and this run stops.
            if ports[name] and not _serves(child, ports[name], stopping):
                if stopping:
                    return 0
                why = ("exited" if child.poll() is not None else
                       f"did not serve port {ports[name]} in {SERVE_WAIT_SECONDS} s")  # fmt: skip
                click.echo(f"{name} {why}; stopping", err=True)
                return 1
            metrics = f", metrics on http://127.0.0.1:{ports[name]}/metrics" if ports[name] else ""
            click.echo(f"{name}: pid {child.pid}{metrics}")
        if flower_login:
            user, password = flower_login.split(":", 1)
            click.echo(
                f"Flower: http://127.0.0.1:{flower_port}/ (user {user}, password {password};"
                " shown once)"
            )
        click.echo(
            f"sweep every {servers.settings.sweep_interval_seconds}s. "
            "Try the README's first expired call from another terminal"
            " (./dev organizations add ..., ./dev send create ...). Ctrl-C stops everything."
        )
        while not stopping:
            exited = [name for name, child in children.items() if child.poll() is not None]
            if exited:
                click.echo(f"{', '.join(exited)} exited; stopping", err=True)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        _stop(children)
        servers.stop()
        click.echo("stopped")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))  # noqa: S104 - where the children will listen
        except OSError:
            return False
    return True


def metrics_ports(port: int, *, explicit: bool) -> dict[str, int]:
    """The children's metrics ports: CALLS_WORKER_METRICS_PORT and the next two (none with
    0). When those are taken (another run, on a data folder of its own) and the setting was
    left at its default, free ports are picked and the banner shows them; when it was set,
    this run is refused, naming it."""
    if not port:
        return {name: 0 for name in METRICS_ORDER}
    wanted = {name: port + n for n, name in enumerate(METRICS_ORDER)}
    taken = [p for p in wanted.values() if p > 65535 or not _port_free(p)]
    if not taken:
        return wanted
    if explicit:
        raise click.ClickException(
            f"metrics port {', '.join(map(str, taken))} is in use: set CALLS_WORKER_METRICS_PORT"
            f" to the first of three free ports (this run uses it and the next two), or to 0"
            f" to serve no metrics"
        )
    click.echo(
        f"metrics ports {port}-{port + 2} are in use (another run?): using free ones, shown"
        " below; CALLS_WORKER_METRICS_PORT chooses them",
        err=True,
    )
    return {name: free_port() for name in METRICS_ORDER}


def _serves(child: subprocess.Popen[bytes], port: int, stopping: list[int]) -> bool:
    """Whether ``child`` came to serve ``port`` (False once it exited, or on a signal)."""
    deadline = time.monotonic() + SERVE_WAIT_SECONDS
    while time.monotonic() < deadline and not stopping and child.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # it answers: 503 says only that it is not ready yet
        except OSError:
            time.sleep(0.1)
    return False


def _stop(children: dict[str, subprocess.Popen[bytes]]) -> None:
    """Warm shutdown: SIGTERM lets running tasks finish; SIGKILL after the grace period
    (their unacknowledged messages are redelivered, so nothing is lost)."""
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
    for child in children.values():
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
