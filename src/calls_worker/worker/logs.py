"""Log lines for people (text) or machines (one JSON object a line)."""

from __future__ import annotations

import logging

from pythonjsonlogger.json import JsonFormatter

from calls_worker.config import LogFormat, LogLevel

# The line per command (its outcome) and per group commit: CALLS_WORKER_COMMAND_LOG_LEVEL.
COMMANDS_LOGGER = "calls_worker.commands"

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
# Alembic's lines of setting up its plugins, each time a worker reads the schema's revision,
# say nothing an operator needs.
QUIETED = ("celery.worker.strategy", "celery.app.trace", "alembic")


def use_format(log_format: LogFormat, command_log_level: LogLevel = "INFO") -> None:
    """Give every handler of the root and Celery loggers this format; quiet Celery's
    per-task lines (the worker logs one line per command itself), and set the level of
    those lines of ours."""
    for name in ("", "celery", "celery.task", "calls_worker"):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(formatter(log_format))
    for name in QUIETED:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger(COMMANDS_LOGGER).setLevel(command_log_level)
