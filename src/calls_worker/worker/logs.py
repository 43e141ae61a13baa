"""Log lines for people (text) or machines (one JSON object a line)."""

from __future__ import annotations

import logging
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def formatter(log_format: LogFormat) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(processName)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level"},
        )
    return logging.Formatter(TEXT_FORMAT)


# Celery's own line per task received and per task succeeded say less than ours (no call,
# no outcome code) and cost the worker a repr of every outcome: warnings and errors only.
QUIETED = ("celery.worker.strategy", "celery.app.trace")


def use_format(log_format: LogFormat) -> None:
    """Give every handler of the root and Celery loggers this format; quiet Celery's
    per-task lines (the worker logs one line per command itself)."""
    for name in ("", "celery", "celery.task", "calls_worker"):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(formatter(log_format))
    for name in QUIETED:
        logging.getLogger(name).setLevel(logging.WARNING)
