"""Starting and stopping worker processes for the benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from celery import Celery

from calls_worker.wire import celery_config


def bench_env(database_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLS_WORKER_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return {
        **env,
        "CALLS_WORKER_DATABASE_URL": database_url,
        "CALLS_WORKER_BROKER_URL": broker_url,
        "CALLS_WORKER_METRICS_PORT": "0",
        **extra,
    }


def wait_for_ping(broker_url: str, hostname_prefix: str, timeout: float = 60) -> None:
    app = Celery("bench-ping", set_as_current=False)
    app.conf.update(celery_config(broker_url))  # control messages only
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            replies = app.control.ping(timeout=0.5) or []
            if any(host.startswith(hostname_prefix) for reply in replies for host in reply):
                return
        raise RuntimeError(f"no worker {hostname_prefix}* answered in {timeout}s")
    finally:
        app.close()


@contextmanager
def process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as output:
        child = subprocess.Popen(
            [sys.executable, *argv], env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            yield child
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
                try:
                    child.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()


def resident_memory(pid: int) -> int:
    """Resident bytes of a process and its children (a prefork worker and its pool)."""
    parent = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
