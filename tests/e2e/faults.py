"""Faults a test injects into a worker started with ``--include tests.e2e.faults``.

``CALLS_WORKER_TEST_DIE_AFTER_COMMIT=<command id>``: the pool process handling that
command kills itself (SIGKILL) right after the command's transaction committed — when
the worker logs the command's line, before the task returns — so before its outcome is
stored and before its message is acknowledged. Once: the file named by
``CALLS_WORKER_TEST_FAULT_FLAG`` records that it happened.

``CALLS_WORKER_TEST_RAISE_AFTER_COMMIT=<command id>``: the same moment, but the batch
applying the command raises instead (a defect after the commit), once.

``CALLS_WORKER_TEST_POISON=<command id>``: the pool process handling that command kills
itself at that moment every time: a message that ends its worker whenever it is delivered.

``CALLS_WORKER_TEST_POISON_BEFORE_COMMIT=<command id>``: the pool process applying a batch
that holds that command kills itself before the batch's transaction, every time: a
poison that takes its batch-mates' uncommitted work down with it.

With any of these, each batch holding the command has its command ids appended, a line a
batch, to ``CALLS_WORKER_TEST_FAULT_LOG`` if set (which commands the fault struck with it).

``CALLS_WORKER_TEST_RELAY_DIE=<p>``: the worker dies between the relay's publishing of call
events and its marking them published, in each round with probability p, after holding
that moment for ``CALLS_WORKER_TEST_RELAY_WINDOW_SECONDS`` (RelayDies).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class AfterCommit(logging.Handler):
    """Once, when the worker logs the outcome of the command named by ``variable``: ``act``."""

    def __init__(self, variable: str, act: Callable[[str], None], *, once: bool = True) -> None:
        super().__init__()
        self.variable, self.act, self.once = variable, act, once

    def emit(self, record: logging.LogRecord) -> None:
        target = os.environ.get(self.variable)
        if not target or getattr(record, "command_id", None) != target:
            return
        if self.once:
            flag = Path(os.environ.get("CALLS_WORKER_TEST_FAULT_FLAG", "/nonexistent/flag"))
            if flag.exists():
                return
            flag.write_text(str(os.getpid()))
        self.act(target)


def _die(target: str) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _raise(target: str) -> None:
    raise RuntimeError(f"the test breaks the batch of command {target}")


logging.getLogger("calls_worker").addHandler(
    AfterCommit("CALLS_WORKER_TEST_DIE_AFTER_COMMIT", _die)
)
logging.getLogger("calls_worker").addHandler(
    AfterCommit("CALLS_WORKER_TEST_RAISE_AFTER_COMMIT", _raise)
)
logging.getLogger("calls_worker").addHandler(
    AfterCommit("CALLS_WORKER_TEST_POISON", _die, once=False)
)


class RelayDies(logging.Handler):
    """``CALLS_WORKER_TEST_POISON_BEFORE_COMMIT=<command id>``: the pool process applying a batch
that holds that command kills itself before the batch's transaction, every time: a
poison that takes its batch-mates' uncommitted work down with it. Each killed batch's
command ids are appended, a line a batch, to ``CALLS_WORKER_TEST_FAULT_LOG`` if set.

``CALLS_WORKER_TEST_RELAY_DIE=<p>``: after each round in which the relay published
    events, before it marks them published, the whole worker (its process group) is
    killed with probability p: the relay dies between the broker accepting the events and
    the database recording it."""

    def emit(self, record: logging.LogRecord) -> None:
        chance = float(os.environ.get("CALLS_WORKER_TEST_RELAY_DIE") or 0)
        if not chance or not getattr(record, "published", None):
            return
        # A window as wide as a slow broker's: another relay that did not wait for this
        # one would read the same unmarked events meanwhile.
        time.sleep(float(os.environ.get("CALLS_WORKER_TEST_RELAY_WINDOW_SECONDS") or 0))
        if random.random() < chance:
            os.killpg(0, signal.SIGKILL)


_relay = logging.getLogger("calls_worker.relay")
_relay.addHandler(RelayDies())
if os.environ.get("CALLS_WORKER_TEST_RELAY_DIE"):
    _relay.setLevel(logging.DEBUG)  # the relay's line after publishing, before marking


FAULTS_ON_A_COMMAND = ("CALLS_WORKER_TEST_POISON_BEFORE_COMMIT",
                       "CALLS_WORKER_TEST_DIE_AFTER_COMMIT",
                       "CALLS_WORKER_TEST_RAISE_AFTER_COMMIT", "CALLS_WORKER_TEST_POISON")


def _poison_before_commit() -> None:
    from calls_worker.worker import messages

    apply = messages.__dict__["handle_batch"]

    def handle_batch(entries: Any, *args: Any, **kwargs: Any) -> Any:
        ids = [entry.command_id for entry in entries]
        targets = {os.environ.get(variable) for variable in FAULTS_ON_A_COMMAND} - {None, ""}
        log = os.environ.get("CALLS_WORKER_TEST_FAULT_LOG")
        if log and targets.intersection(ids):
            with open(log, "a") as batches:  # which commands share the fault's batch
                batches.write(" ".join(ids) + "\n")
        if os.environ.get("CALLS_WORKER_TEST_POISON_BEFORE_COMMIT") in ids:
            os.kill(os.getpid(), signal.SIGKILL)
        return apply(entries, *args, **kwargs)

    setattr(messages, "handle_batch", handle_batch)  # noqa: B010 - not exported


_poison_before_commit()
