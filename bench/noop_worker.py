"""The baseline workers: a Celery task that does nothing, with the production settings.

    python -m bench.noop_worker BROKER_URL [--queue QUEUE] [--concurrency N] [--batch N]

The very settings of calls-worker's worker (``celery_app.worker_config``: broker,
serializer, result backend, late acks, re-queue on worker loss, prefetch 1, time limits,
task events) and the same pool; only the task body differs. It consumes a queue of its
own, so it can run beside the real worker and the two be measured in turns.

With ``--batch N`` the no-op is batched exactly as the worker batches commands
(worker/batching.py and batch_job.py: the same buffer, wait, prefetch, pool job, result pipeline and
acknowledgements), and the job does nothing but store ``{"ok": true}`` for each message:
the ceiling of group commit on this machine.
"""

from __future__ import annotations

import argparse
from typing import Any

from celery import Celery
from celery.worker.consumer import Consumer

from calls_worker.config import Settings
from calls_worker.wire import QUEUE_ARGUMENTS, is_amqp
from calls_worker.worker.batch_job import DONE, store_outcomes
from calls_worker.worker.batching import CommandBatcher
from calls_worker.worker.celery_app import worker_config

NOOP_TASK = "bench.noop"
NOOP_QUEUE = "bench.noop"
BATCHED_NOOP_QUEUE = "bench.noop.batched"
# The worker's defaults (config.Settings), unless --batch and --batch-wait-ms say otherwise.
BATCH_WAIT_MS: int = Settings.model_fields["command_batch_wait_ms"].default


def noop_batch(task: Any, items: list[Any]) -> list[tuple[str, str]]:
    """The batched no-op's pool job: each message's outcome stored, in one pipeline."""
    store_outcomes(task.app, items, {key: {"ok": True} for key in range(len(items))})
    return [(DONE, "{'ok': True}")] * len(items)


class BatchingConsumer(Consumer):
    """Celery's consumer with the no-op task batched as the worker batches commands."""

    batch_size = 32
    batch_wait_ms = BATCH_WAIT_MS

    def __init__(self, on_task_request: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(on_task_request, *args, **kwargs)
        self.batcher = CommandBatcher(self, on_task_request, self.batch_size,
                                      self.batch_wait_ms / 1000, job=noop_batch)  # fmt: skip
        self.on_task_request = self.batcher.route(frozenset({NOOP_TASK}))

    def on_close(self) -> None:
        super().on_close()
        self.batcher.forget()


def noop_queues() -> list[Any]:
    """On RabbitMQ, the no-op queues as the commands': quorum queues on topic exchanges (a
    producer that sends to them declares them so)."""
    from kombu import Exchange, Queue

    return [
        Queue(q, Exchange(q, "topic", durable=True), routing_key=q, durable=True,
              queue_arguments=dict(QUEUE_ARGUMENTS))
        for q in (NOOP_QUEUE, BATCHED_NOOP_QUEUE)
    ]  # fmt: skip


def create_noop_app(broker_url: str, batch: int = 1, batch_wait_ms: int = BATCH_WAIT_MS,
                    results: str | None = None) -> Celery:  # fmt: skip
    """``results``: the result backend (by default the broker, which must then be Redis)."""
    app = Celery("bench-noop", set_as_current=False)
    app.conf.update(worker_config(broker_url, results or broker_url))
    if is_amqp(broker_url):
        app.conf.task_queues = [*app.conf.task_queues, *noop_queues()]
    if batch > 1:
        consumer = type("Batching", (BatchingConsumer,),
                        {"batch_size": batch, "batch_wait_ms": batch_wait_ms})  # fmt: skip
        app.conf.update(worker_prefetch_multiplier=batch, worker_consumer=consumer)

    @app.task(name=NOOP_TASK, queue=NOOP_QUEUE)
    def noop(command: Any = None) -> dict[str, Any]:
        return {"ok": True}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("broker_url")
    parser.add_argument("--queue", default=NOOP_QUEUE)
    parser.add_argument("--concurrency", default="2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--batch-wait-ms", type=int, default=BATCH_WAIT_MS)
    parser.add_argument("--name", default="noop")
    parser.add_argument("--results", default=None, help="result backend; default: the broker")
    arguments = parser.parse_args()
    create_noop_app(arguments.broker_url, arguments.batch, arguments.batch_wait_ms,
                    arguments.results).worker_main(
        ["worker", "--loglevel", "WARNING", "-Q", arguments.queue, "-c", arguments.concurrency,
         "-n", f"{arguments.name}@%h", "--without-mingle"]
    )  # fmt: skip


if __name__ == "__main__":
    main()
