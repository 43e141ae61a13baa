"""Liveness that does not depend on the broker: ``/healthz`` on a worker's and beat's
metrics port.

A liveness probe that fails restarts the container. A probe through the broker (a ping)
fails on every worker at once while the broker is away, and restarting them all mends
nothing. So ``/healthz`` asks the process itself, and nothing else:

- a worker: its consumer's event loop ran in the last ``LOOP_STALE_SECONDS`` (a timer beats
  every second). While the loop does not run because the broker cannot be reached (the
  consumer is reconnecting), the worker is alive all the same: the check then looks
  whether the broker's address accepts a connection, and a broker away answers 200;
- beat: its scheduler ticked in the last ``BEAT_STALE_SECONDS`` (it ticks at least every
  ``BEAT_MAX_LOOP_SECONDS``). Nothing is read from the database (beat's /metrics reads it).

Readiness may depend on the broker and the database (a worker's ``ping --database``).
Any other path serves the Prometheus metrics as before.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from celery.beat import PersistentScheduler
from kombu import Connection

LOOP_STALE_SECONDS = 60.0
BEAT_MAX_LOOP_SECONDS = 30
BEAT_STALE_SECONDS = 4.0 * BEAT_MAX_LOOP_SECONDS
HEALTH_PATH = "/healthz"
# The exit status of a process whose metrics port is taken (sysexits' EX_CONFIG).
EXIT_PORT_TAKEN = 78


class Heartbeat:
    """When a loop of this process last ran (monotonic seconds)."""

    def __init__(self) -> None:
        self.at = time.monotonic()

    def beat(self) -> None:
        self.at = time.monotonic()

    def age(self) -> float:
        return time.monotonic() - self.at


HEARTBEAT = Heartbeat()
"""The consumer's loop (a worker) or the scheduler's (beat), in this process."""


def broker_reachable(broker_url: str, timeout: float = 2.0) -> bool:
    """Whether the broker's address accepts a TCP connection (no login, no protocol); of a
    list of brokers (``;``-separated, a cluster's nodes), any of them."""
    for url in broker_url.split(";"):
        connection = Connection(url.strip())
        host = connection.hostname or "127.0.0.1"
        port = connection.port or connection.transport.default_port or 6379
        try:
            with socket.create_connection((host, int(port)), timeout=timeout):
                return True
        except OSError:
            continue
    return False


def worker_alive(broker_url: str) -> tuple[bool, str]:
    age = HEARTBEAT.age()
    if age < LOOP_STALE_SECONDS:
        return True, f"the consumer's loop ran {age:.0f} s ago"
    if not broker_reachable(broker_url):
        return True, (f"the consumer's loop has not run for {age:.0f} s, and the broker is"
                      " away: waiting for it, which a restart would not mend")  # fmt: skip
    return False, f"the consumer's loop has not run for {age:.0f} s, and the broker answers"


def beat_alive() -> tuple[bool, str]:
    age = HEARTBEAT.age()
    if age < BEAT_STALE_SECONDS:
        return True, f"the scheduler ticked {age:.0f} s ago"
    return False, f"the scheduler has not ticked for {age:.0f} s"


class BeatScheduler(PersistentScheduler):
    """Celery's scheduler, with its heartbeat at each tick."""

    def tick(self, *args: Any, **kwargs: Any) -> float:
        HEARTBEAT.beat()
        next_in: float = super().tick(*args, **kwargs)
        return next_in


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds are not worth a log line each."""


def serve(port: int, registry: Any, alive: Callable[[], tuple[bool, str]]) -> None:
    """Metrics of ``registry`` on every path, and ``alive`` on /healthz, in a thread."""
    from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != HEALTH_PATH:
            body: Iterable[bytes] = metrics(environ, start_response)
            return body
        ok, reason = alive()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "text/plain; charset=utf-8")])  # fmt: skip
        return [f"{reason}\n".encode()]

    try:
        server = make_server("0.0.0.0", port, app, ThreadingWSGIServer, handler_class=_Quiet)  # noqa: S104 - a pod's port
    except OSError as error:
        # A process must not run claiming a port it does not serve (probes and scrapes
        # would reach whoever holds it): it ends here, saying what to change.
        logging.getLogger(__name__).critical(
            "cannot serve metrics and /healthz on port %s: %s. Set CALLS_WORKER_METRICS_PORT"
            " to a free port (0: none)", port, error.strerror,
        )
        logging.shutdown()
        os._exit(EXIT_PORT_TAKEN)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
