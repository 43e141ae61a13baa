"""Faults a test injects into a worker started with ``--include tests.e2e.faults``.

``CALLS_WORKER_TEST_DIE_AFTER_COMMIT=<command id>``: the pool process handling that
command kills itself (SIGKILL) right after the command's transaction committed — when
the worker logs the command's line, before the task returns — so before its outcome is
stored and before its message is acknowledged. Once: the file named by
``CALLS_WORKER_TEST_FAULT_FLAG`` records that it happened.

``CALLS_WORKER_TEST_RAISE_AFTER_COMMIT=<command id>``: the same moment, but the batch
applying the command raises instead (a defect after the commit), once.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path


class DieAfterCommit(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        target = os.environ.get("CALLS_WORKER_TEST_DIE_AFTER_COMMIT")
        flag = Path(os.environ.get("CALLS_WORKER_TEST_FAULT_FLAG", "/nonexistent/flag"))
        if target and getattr(record, "command_id", None) == target and not flag.exists():
            flag.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


class RaiseAfterCommit(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        target = os.environ.get("CALLS_WORKER_TEST_RAISE_AFTER_COMMIT")
        flag = Path(os.environ.get("CALLS_WORKER_TEST_FAULT_FLAG", "/nonexistent/flag"))
        if target and getattr(record, "command_id", None) == target and not flag.exists():
            flag.write_text(str(os.getpid()))
            raise RuntimeError(f"the test breaks the batch of command {target}")


logging.getLogger("calls_worker").addHandler(DieAfterCommit())
logging.getLogger("calls_worker").addHandler(RaiseAfterCommit())
