"""The baseline worker: a Celery task that does nothing, with the production settings.

    python -m bench.noop_worker BROKER_URL

The very settings of calls-worker's worker (``celery_app.worker_config``: broker,
serializer, result backend, late acks, re-queue on worker loss, prefetch 1, time limits,
task events) and the same pool; only the task body differs.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery

from calls_worker.entrypoints.celery_app import worker_config
from calls_worker.wire import COMMANDS_QUEUE

NOOP_TASK = "bench.noop"


def create_noop_app(broker_url: str) -> Celery:
    app = Celery("bench-noop", set_as_current=False)
    app.conf.update(worker_config(broker_url, broker_url))

    @app.task(name=NOOP_TASK, queue=COMMANDS_QUEUE)
    def noop(command: Any = None) -> dict[str, Any]:
        return {"ok": True}

    return app


if __name__ == "__main__":
    create_noop_app(sys.argv[1]).worker_main(
        [
            "worker",
            "--loglevel",
            "WARNING",
            "-Q",
            COMMANDS_QUEUE,
            "-c",
            "2",
            "-n",
            "noop@%h",
            "--without-mingle",
            "--without-gossip",
        ]
    )
