"""The Celery app, built by a factory from resolved URLs and the settings (never at import)."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

from calls_worker.config import LogFormat, Settings, signing_of
from calls_worker.wire import (
    PRUNE_TASK,
    RECONCILE_TASK,
    RESULT_RETENTION_SECONDS,
    SWEEP_TASK,
    SWEEPS_QUEUE,
    VISIBILITY_TIMEOUT,
    celery_config,
    enable_signing,
)
from calls_worker.worker import signer, tracing
from calls_worker.worker.consumer import DeadLetters
from calls_worker.worker.health import BEAT_MAX_LOOP_SECONDS
from calls_worker.worker.logs import use_format
from calls_worker.worker.metrics import (
    MULTIPROC_ENV,
    forget_process,
    serve_database_metrics,
    serve_worker_metrics,
)
from calls_worker.worker.relay import EventRelayStep
from calls_worker.worker.runtime import Runtime, runtime_of
from calls_worker.worker.tasks import register_tasks

# Longest a task may run (the default of CALLS_WORKER_TASK_TIME_LIMIT_SECONDS); the broker's
# visibility timeout should exceed it, or Redis hands a still-running task to a second worker.
TASK_TIME_LIMIT = 300


def soft_time_limit(time_limit: int) -> int:
    """When a task is asked to stop: 30 s before the hard limit, or half-way if sooner."""
    return time_limit - min(30, time_limit // 2)


def worker_config(
    broker_url: str,
    result_backend_url: str,
    visibility_timeout: int = VISIBILITY_TIMEOUT,
    time_limit: int = TASK_TIME_LIMIT,
    result_retention: int = RESULT_RETENTION_SECONDS,
) -> dict[str, Any]:
    """How a worker consumes: what the benchmarks' no-op baseline shares with the real one."""
    return {
        **celery_config(broker_url, result_backend_url, visibility_timeout, result_retention),
        # At least once, effect once: a task is acknowledged only after it ran, and put back
        # if its process dies; the command id makes the second run return the first outcome.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Except a command past its time limit. At the soft limit the task gives up: the
        # command is kept among the rejected ones (or retried while the database cannot keep
        # it), and acknowledged. At the hard limit Celery (5.7) kills the pool process, calls
        # the task's on_failure in the main process, which keeps the command, and
        # acknowledges it (this setting, said out loud; it is not requeued): a command that
        # hung that long would hang again, so it waits for an operator instead of holding a
        # worker process forever. tests/e2e/test_faults.py shows it.
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": time_limit,
        "task_soft_time_limit": soft_time_limit(time_limit),
        # Events for Flower.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
    }


def watched_event_queues(settings: Settings) -> list[str]:
    return [q.strip() for q in settings.events_watch_queues.split(",") if q.strip()]


def create_app(
    *,
    database_url: str,
    broker_url: str,
    result_backend_url: str | None,
    settings: Settings,
    log_format: LogFormat = "text",
) -> Celery:
    app = Celery("calls-worker")
    app.conf.update(
        worker_config(
            broker_url,
            result_backend_url or broker_url,
            settings.visibility_timeout_seconds,
            settings.task_time_limit_seconds,
            settings.result_retention_seconds,
        ),
        # Group commit: a batch fills only from messages the worker holds unacknowledged.
        worker_prefetch_multiplier=settings.command_batch_size,
        task_routes={
            task: {"queue": SWEEPS_QUEUE} for task in (SWEEP_TASK, PRUNE_TASK, RECONCILE_TASK)
        },
        worker_consumer="calls_worker.worker.consumer:RecordingConsumer",
        worker_hijack_root_logger=True,
        beat_schedule={
            "expire-exhausted-calls": {
                "task": SWEEP_TASK,
                "schedule": float(settings.sweep_interval_seconds),
                # A sweep that waited a whole interval is superseded by the next one.
                "options": {"queue": SWEEPS_QUEUE, "expires": settings.sweep_interval_seconds},
            },
            # The triggers keep the due-calls record; this checks them (and repairs what
            # went around them), so a drift shows as a metric instead of a stalled call.
            "reconcile-due-calls": {
                "task": RECONCILE_TASK,
                "schedule": float(settings.reconcile_interval_seconds),
                "options": {"queue": SWEEPS_QUEUE, "expires": settings.reconcile_interval_seconds},
            },
            "prune-command-outcomes": {
                "task": PRUNE_TASK,
                "schedule": 3600.0,
                "options": {"queue": SWEEPS_QUEUE, "expires": 3600},
            },
        },
        beat_schedule_filename=str(settings.data_dir / "beat-schedule"),
        # Its ticks are beat's heartbeat (/healthz on its metrics port): one at least this often.
        beat_scheduler="calls_worker.worker.health:BeatScheduler",
        beat_max_loop_interval=BEAT_MAX_LOOP_SECONDS,
    )
    if (signing := signing_of(settings)) is not None:
        enable_signing(app, signing)
        signer.install(signing)  # tasks learn whose certificate signed their message
    app.calls_runtime = Runtime(database_url=database_url, settings=settings)  # type: ignore[attr-defined]
    register_tasks(app)
    app.steps["consumer"].add(DeadLetters)
    app.steps["worker"].add(EventRelayStep)

    def set_format(**_: Any) -> None:
        use_format(log_format, settings.command_log_level)

    # weak=False: the handler is a closure that would otherwise be collected at once.
    signals.after_setup_logger.connect(set_format, weak=False)
    signals.after_setup_task_logger.connect(set_format, weak=False)

    def process_shutdown(**_: Any) -> None:
        runtime_of(app).dispose()
        tracing.shutdown()  # the spans not sent yet, if tracing is on
        if os.environ.get(MULTIPROC_ENV):
            forget_process(os.getpid())

    signals.worker_process_shutdown.connect(process_shutdown, weak=False)
    if settings.metrics_port:
        port = settings.metrics_port

        def serve_worker(**_: Any) -> None:
            if os.environ.get(MULTIPROC_ENV):  # set by `calls-worker worker`
                serve_worker_metrics(port, broker_url)

        def serve_beat(**_: Any) -> None:
            serve_database_metrics(port, runtime_of(app).engine(), broker_url,
                                   result_backend_url or broker_url,
                                   event_queues=watched_event_queues(settings))  # fmt: skip

        signals.worker_init.connect(serve_worker, weak=False)
        signals.beat_init.connect(serve_beat, weak=False)
    return app
