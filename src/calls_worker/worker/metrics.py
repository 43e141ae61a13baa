"""Prometheus metrics.

Workers count what they do (commands by kind and outcome code, rejected commands,
sweeps); Celery's prefork children write to ``PROMETHEUS_MULTIPROC_DIR`` and the worker's
main process serves their sum. Beat (of which there is exactly one) also serves what the
database says: requested calls, calls at their limit not yet expired, the sweep lag, the
last sweep, rejected commands waiting, and the queue lengths. No label names a call or an
organization, so cardinality stays bounded.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

from calls_worker.domain.commands import CommandKind

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PAUSE_REASONS = ("database", "results", "schema")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
                   1800, 3600)  # fmt: skip
LATENCY_KINDS = frozenset(("create", "add_attempt", "complete", "cancel", "expire"))


def prepare_multiprocess_dir() -> str:
    """Point prometheus_client at a fresh directory for this worker's processes.

    Must run before prometheus_client is imported: it picks its storage on import.
    """
    directory = os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="calls-worker-metrics-")
    # A pod's /tmp is an empty volume at every start: the named folder is made, not expected.
    os.makedirs(directory, exist_ok=True)
    os.environ[MULTIPROC_ENV] = directory
    for stale in os.scandir(directory):  # a previous run's values must not count
        if stale.name.endswith(".db"):
            os.unlink(stale.path)
    return directory


@dataclass(frozen=True)
class WorkerMetrics:
    commands: Any
    rejected: Any
    sweeps: Any
    sweep_duration: Any
    sweep_expired: Any
    repairs: Any
    batch_sizes: Any
    batch_durations: Any
    batches_failed: Any
    outcomes_unstored: Any
    consuming: Any
    paused: Any
    latency: Any
    untimed: Any

    def consuming_commands(self, consuming: bool, why: tuple[str, ...] = ()) -> None:
        """Set in the worker's main process (outage.py: paused or taking commands); ``why``:
        what it waits for (database, results, schema)."""
        self.consuming.set(1 if consuming else 0)
        for reason in PAUSE_REASONS:
            self.paused.labels(reason=reason).set(0 if consuming else int(reason in why))

    def answered(self, task_name: str, sent: float | None, now: float) -> None:
        """A command answered: from its producer's sentAt to now (clocks apart by a
        little may make that negative: counted as 0)."""
        if sent is None:
            self.untimed.inc()
            return
        kind = task_name.removeprefix("calls.")
        self.latency.labels(kind=kind if kind in LATENCY_KINDS else "other").observe(
            max(0.0, now - sent))  # fmt: skip

    def batch(self, *, size: int, duration: float, result: str) -> None:
        self.batch_sizes.labels(result=result).observe(size)
        self.batch_durations.labels(result=result).observe(duration)

    def batch_failed(self, reason: str) -> None:
        self.batches_failed.labels(reason=reason).inc()

    def outcomes_not_stored(self, count: int) -> None:
        self.outcomes_unstored.inc(count)

    def command(self, kind: CommandKind, outcome: str) -> None:
        self.commands.labels(kind=kind, outcome=outcome).inc()

    def rejection(self, stage: str) -> None:
        self.rejected.labels(stage=stage).inc()

    def sweep(self, *, skipped: bool, duration: float, expired: int) -> None:
        self.sweeps.labels(result="skipped" if skipped else "done").inc()
        if not skipped:
            self.sweep_duration.observe(duration)
            self.sweep_expired.inc(expired)

    def due_record_repairs(self, *, missing: int, stale: int) -> None:
        self.repairs.labels(kind="missing").inc(missing)
        self.repairs.labels(kind="stale").inc(stale)


@cache
def worker_metrics() -> WorkerMetrics:
    """This process's counters, made on first use (after fork, in a pool child)."""
    from prometheus_client import Counter, Gauge, Histogram

    return WorkerMetrics(
        paused=Gauge(
            "calls_worker_commands_paused",
            "1 while this worker takes no commands because of reason: the database or the"
            " result backend ('results') away, or a schema older than its release's"
            " ('schema': run migrate).",
            ["reason"],
            multiprocess_mode="livemax",
        ),
        latency=Histogram(
            "calls_worker_command_latency_seconds",
            "From the time the producer sent a command (its sentAt header) to its outcome"
            " stored and its message acknowledged: queueing, retries and applying, by kind.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
        ),
        untimed=Counter(
            "calls_worker_commands_untimed_total",
            "Commands answered whose message had no readable sentAt header (not timed).",
        ),
        consuming=Gauge(
            "calls_worker_commands_consumed",
            "1 while this worker takes commands off calls.commands; 0 while it is paused"
            " (the database or the result backend away, or a schema older than its release's:"
            " run migrate). Absent: no command worker runs.",
            multiprocess_mode="livemax",
        ),
        commands=Counter(
            "calls_worker_commands_total",
            "Commands handled, by kind and outcome code (ok, invalid, not_found, conflict).",
            ["kind", "outcome"],
        ),
        rejected=Counter(
            "calls_worker_rejected_commands_total",
            "Commands kept in the rejected-commands table, by where they were stopped"
            " (message, task, forbidden, gave_up); dropped: refused by the database even"
            " escaped, logged and not kept.",
            ["stage"],
        ),
        sweeps=Counter(
            "calls_worker_sweeps_total",
            "Sweeps run, or skipped because one was running.",
            ["result"],
        ),
        sweep_duration=Histogram(
            "calls_worker_sweep_duration_seconds",
            "How long a sweep took.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        ),
        sweep_expired=Counter(
            "calls_worker_sweep_expired_calls_total", "Calls the sweeps expired."
        ),
        repairs=Counter(
            "calls_worker_due_record_repairs_total",
            "Differences between the due-calls record and the expiry rule that reconciliation"
            " repaired: missing (due, not listed) or stale (listed, not due). Should stay 0.",
            ["kind"],
        ),
        batch_sizes=Histogram(
            "calls_worker_command_batch_size",
            "Commands in each batch applied (group commit), by result: done, or stopped"
            " (the database went away or a time limit struck: the rest was retried).",
            ["result"],
            buckets=(1, 2, 4, 8, 16, 32, 48, 64),
        ),
        batch_durations=Histogram(
            "calls_worker_command_batch_duration_seconds",
            "How long a batch of commands took in its pool process, from parsing to the"
            " outcomes stored, by result.",
            ["result"],
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        ),
        batches_failed=Counter(
            "calls_worker_command_batches_failed_total",
            "Batches whose pool process died (worker_lost: their messages were requeued) or"
            " that raised (raised: requeued after a pause, or kept when alone). Should stay 0.",
            ["reason"],
        ),
        outcomes_unstored=Counter(
            "calls_worker_outcomes_not_stored_total",
            "Outcomes of applied commands the result backend did not take (they are in the"
            " database; the worker paused until the backend answered). Should stay 0.",
        ),
    )


@dataclass(frozen=True)
class RelayMetrics:
    published: Any
    failures: Any
    round_seconds: Any


@cache
def relay_metrics() -> RelayMetrics:
    """The relay's counters (worker/relay.py; in the worker's main process)."""
    from prometheus_client import Counter, Histogram

    return RelayMetrics(
        published=Counter(
            "calls_worker_events_published_total",
            "Call events this worker's relay published (and marked published). An event"
            " published again after a relay died between the two counts again.",
        ),
        failures=Counter(
            "calls_worker_event_relay_failures_total",
            "Relay rounds that failed (the database or the broker away); the events wait.",
        ),
        round_seconds=Histogram(
            "calls_worker_event_relay_round_seconds",
            "How long a relay round that published took: read, publish, mark, commit.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        ),
    )


def serve_worker_metrics(port: int, broker_url: str) -> None:
    """Serve the sum of every pool process's counters (call in the worker's main process),
    and its liveness on /healthz (health.py)."""
    from prometheus_client import CollectorRegistry, multiprocess

    from calls_worker.worker.health import serve, worker_alive

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    serve(port, registry, lambda: worker_alive(broker_url))


def forget_process(pid: int) -> None:
    """A pool process exited: drop its live gauges (counters keep their totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class DatabaseCollector:
    """Figures read from the database and the broker at each scrape (served by beat)."""

    def __init__(
        self, engine: Any, broker_url: str, result_backend_url: str | None = None,
        event_queues: list[str] | None = None,
    ) -> None:  # fmt: skip
        self._engine = engine
        self._broker_url = broker_url
        self._result_backend_url = result_backend_url or broker_url
        self._event_queues = event_queues or []

    def describe(self) -> list[Any]:
        return []  # collected live; nothing to register up front

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from calls_worker.adapters.db.events import backlog
        from calls_worker.adapters.db.journal import operational_figures
        from calls_worker.adapters.queue import (
            event_queue_lengths,
            memory,
            oldest_command_sent_at,
            queue_lengths,
        )
        from calls_worker.wire import COMMANDS_QUEUE, is_amqp

        figures = operational_figures(self._engine)
        yield GaugeMetricFamily(
            "calls_worker_requested_calls", "Calls in status requested.", figures.requested
        )
        yield GaugeMetricFamily(
            "calls_worker_exhausted_calls",
            "Requested calls at or over their limit, not expired yet.",
            figures.exhausted,
        )
        yield GaugeMetricFamily(
            "calls_worker_sweep_lag_seconds",
            "How long the oldest call at its limit has waited to be expired (0: none waits).",
            figures.sweep_lag_seconds,
        )
        yield GaugeMetricFamily(
            "calls_worker_rejected_commands_waiting",
            "Rejected commands waiting for an operator: neither replayed nor dismissed.",
            figures.rejected_waiting,
        )
        if figures.last_sweep_at is not None:
            yield GaugeMetricFamily(
                "calls_worker_last_sweep_timestamp_seconds",
                "When the last sweep that ran (not skipped) started, as a Unix time.",
                figures.last_sweep_at.timestamp(),
            )
        events = backlog(self._engine)
        yield GaugeMetricFamily(
            "calls_worker_events_unpublished",
            "Call events written and not published yet.",
            events.unpublished,
        )
        yield GaugeMetricFamily(
            "calls_worker_events_oldest_unpublished_age_seconds",
            "How long the oldest unpublished call event has waited since its change committed"
            " (0: none waits).",
            events.oldest_age_seconds,
        )
        queues = GaugeMetricFamily(
            "calls_worker_queue_messages", "Messages waiting in a queue.", labels=["queue"]
        )
        lengths = queue_lengths(self._broker_url)
        for queue, length in lengths.items():
            queues.add_metric([queue], length)
        yield queues
        if not is_amqp(self._broker_url):
            head = oldest_command_sent_at(self._broker_url)
            if head is not None or not lengths.get(COMMANDS_QUEUE):
                yield GaugeMetricFamily(
                    "calls_worker_commands_oldest_age_seconds",
                    "How long the command at the head of calls.commands has waited since its"
                    " producer sent it (its sentAt header; 0: the queue is empty). Redis only;"
                    " absent when the head has no sentAt header.",
                    0.0 if head is None else max(0.0, time.time() - head),
                )
        subscribers = GaugeMetricFamily(
            "calls_worker_event_queue_messages",
            "Call events waiting in a subscriber's queue bound to calls.events (Redis: every"
            " bound queue; RabbitMQ: those in CALLS_WORKER_EVENTS_WATCH_QUEUES).",
            labels=["queue"],
        )
        for queue, length in event_queue_lengths(self._broker_url, self._event_queues).items():
            subscribers.add_metric([queue], length)
        yield subscribers
        used = GaugeMetricFamily(
            "calls_worker_redis_used_memory_bytes",
            "Memory the broker's and the result backend's Redis use (one series if they are"
            " one Redis).",
            labels=["redis"],
        )
        maximum = GaugeMetricFamily(
            "calls_worker_redis_max_memory_bytes",
            "Their maxmemory (0: none set: Redis grows until the machine runs out).",
            labels=["redis"],
        )
        servers = {"broker": self._broker_url}
        if self._result_backend_url != self._broker_url:
            servers["results"] = self._result_backend_url
        for name, url in servers.items():
            if not url.startswith(("redis://", "rediss://", "unix://")):
                continue  # RabbitMQ, PostgreSQL: no Redis memory to report
            in_use, most = memory(url)
            used.add_metric([name], in_use)
            maximum.add_metric([name], most)
        yield used
        yield maximum


def serve_database_metrics(
    port: int, engine: Any, broker_url: str, result_backend_url: str | None = None,
    event_queues: list[str] | None = None,
) -> None:  # fmt: skip
    from prometheus_client import CollectorRegistry

    from calls_worker.worker.health import beat_alive, serve

    registry = CollectorRegistry()
    registry.register(DatabaseCollector(engine, broker_url, result_backend_url, event_queues))
    serve(port, registry, beat_alive)
