"""A Celery consumer that keeps every message it cannot run, instead of only logging it.

Celery acknowledges (and so drops) a message it cannot decode, whose content type it
refuses (pickle), or whose task it does not know. Each is first written to the
rejected-commands table with its raw body and the reason, where an operator can see it
and replay it (``calls-worker dead-letters``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer

from calls_worker.adapters.db import journal
from calls_worker.entrypoints.metrics import worker_metrics
from calls_worker.entrypoints.runtime import runtime_of

logger = logging.getLogger("calls_worker")


class RecordingConsumer(Consumer):
    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._record(message, f"message cannot be decoded: {exc}")
        super().on_decode_error(message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._record(message, f"message refused: {exc}")
        super().on_invalid_task(body, message, exc)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._record(message, f"unknown task: {exc}")
        super().on_unknown_task(body, message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._record(message, "not a task message")
        super().on_unknown_message(body, message)

    def _record(self, message: Any, reason: str) -> None:
        headers = getattr(message, "headers", None) or {}
        try:
            runtime = runtime_of(self.app)
            rejected_id = journal.record_rejected(
                runtime.unpooled_engine(),
                task_name=str(headers.get("task") or "?"),
                command_id=headers.get("id"),
                raw_body=journal.body_text(message.body),
                reason=f"{reason} (content type {message.content_type})",
            )
        except Exception:  # the broker's copy is about to go: log everything we have
            logger.exception("could not record a rejected message: %r", message.body)
            return
        worker_metrics().rejection("message")
        logger.warning("message rejected as %s: %s", rejected_id, reason)
