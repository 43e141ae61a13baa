"""The baseline worker: a Celery task that does nothing, with the production settings.

    python -m bench.noop_worker BROKER_URL [--queue QUEUE] [--concurrency N]

The very settings of calls-worker's worker (``celery_app.worker_config``: broker,
serializer, result backend, late acks, re-queue on worker loss, prefetch 1, time limits,
task events) and the same pool; only the task body differs. It consumes a queue of its
own, so it can run beside the real worker and the two be measured in turns.
"""

from __future__ import annotations

import argparse
from typing import Any

from celery import Celery

from calls_worker.entrypoints.celery_app import worker_config

NOOP_TASK = "bench.noop"
NOOP_QUEUE = "bench.noop"


def create_noop_app(broker_url: str) -> Celery:
    app = Celery("bench-noop", set_as_current=False)
    app.conf.update(worker_config(broker_url, broker_url))

    @app.task(name=NOOP_TASK, queue=NOOP_QUEUE)
    def noop(command: Any = None) -> dict[str, Any]:
        return {"ok": True}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("broker_url")
    parser.add_argument("--queue", default=NOOP_QUEUE)
    parser.add_argument("--concurrency", default="2")
    arguments = parser.parse_args()
    create_noop_app(arguments.broker_url).worker_main(
        ["worker", "--loglevel", "WARNING", "-Q", arguments.queue, "-c", arguments.concurrency,
         "-n", "noop@%h", "--without-mingle"]
    )  # fmt: skip


if __name__ == "__main__":
    main()
