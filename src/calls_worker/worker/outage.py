"""While the database does not answer, a worker stops taking commands off the queue.

A command that meets a database away is retried with a backoff (settling.py):
republished, so the broker holds it meanwhile. Without more, a worker would go on taking
every queued command, failing it and republishing it, for as long as the outage lasts:
work for nothing, and on RabbitMQ every message that a worker holds is returned when the
worker stops or dies, which counts toward the queue's delivery limit (wire.DELIVERY_LIMIT).

So the first process of a worker that finds the database away (a pool process applying a
command, or the main process keeping a rejected message) says so through memory shared
across the prefork pool's fork; the main process, once a second, sees it and cancels its
consumer of ``calls.commands``. The messages stay queued, untouched, their delivery count
unchanged. A thread asks the database every few seconds; once it answers, the consumer
starts again. The sweeps queue is left alone: a sweep fails and is acknowledged, and beat
sends the next.

A database whose schema is older than this release's (migrate has not run yet) counts as
away. A worker that starts against one answers pings but does not consume
``calls.commands`` until migrate has run (``CommandsPause.hold``); a command that meets a
table or column it does not know waits the same way (settling.database_away).
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from sqlalchemy import text

from calls_worker.worker.metrics import worker_metrics

logger = logging.getLogger("calls_worker")

# How often a paused worker asks the database whether it answers again.
PROBE_SECONDS = 5.0
# How often the main process looks whether a process found the database away.
WATCH_SECONDS = 1.0


DATABASE: Final = "the database"
OUTCOME_STORE: Final = "the result backend"


class DatabaseWatch:
    """When a process of this worker last found the database, or the result backend that
    takes the outcomes, away (shared by the pool)."""

    def __init__(self) -> None:
        # Made in the main process before the pool forks; lock-free: a double each, written
        # whole by whoever saw the outage last.
        context = multiprocessing.get_context("fork")
        self._away_at = {what: context.Value("d", 0.0, lock=False)
                         for what in (DATABASE, OUTCOME_STORE)}  # fmt: skip

    def report_away(self, what: str = DATABASE) -> None:
        self._away_at[what].value = time.time()

    @property
    def away_at(self) -> float:
        return max(float(value.value) for value in self._away_at.values())

    def away_since(self, seen: float) -> list[str]:
        """What was reported away after ``seen``."""
        return [what for what, value in self._away_at.items() if value.value > seen]


class CommandsPause:
    """In the main process: pause and resume the consumer of the commands queue."""

    def __init__(self, consumer: Any, watch: DatabaseWatch, queue: str,
                 database_answers: Callable[[], bool]) -> None:  # fmt: skip
        self.consumer = consumer
        self.watch = watch
        self.queue = queue
        self.database_answers = database_answers
        self.paused_since: float | None = None
        self._answered = threading.Event()
        self._seen = watch.away_at
        self._away = DATABASE

    def check(self) -> None:
        """Called every WATCH_SECONDS from the worker's timer."""
        try:
            if self.paused_since is None:
                if self.watch.away_at > self._seen:
                    self._pause()
            elif self._answered.is_set():
                self._resume()
        except Exception:  # the timer must go on; the next check tries again
            logger.exception("pausing or resuming the commands queue failed")

    def not_ready(self, engine: Any) -> str | None:
        """At start: why the commands queue may not be consumed (None: it may). Only a
        database that answers with a schema older than this release's holds it: one that is
        away is met, and paused for, as at any other time."""
        try:
            serves_this_release(engine)
        except SchemaBehind as behind:
            return str(behind)
        except Exception:  # away: the outage handling's, once commands meet it
            return None
        return None

    def hold(self, reason: str) -> None:
        """At start, with the commands queue not consumed: until the probe passes."""
        self._paused(DATABASE, ("schema",))
        logger.warning("%s: this worker takes no commands off %s until migrate has run and"
                       " the database answers (they wait there)", reason, self.queue)  # fmt: skip

    def _consuming(self) -> bool:
        task_consumer = getattr(self.consumer, "task_consumer", None)
        return task_consumer is not None and task_consumer.consuming_from(self.queue)

    def _pause(self) -> None:
        away = " and ".join(self.watch.away_since(self._seen)) or DATABASE
        self._seen = self.watch.away_at
        if not self._consuming():
            return
        self.consumer.cancel_task_queue(self.queue)
        self._paused(away)
        logger.warning("%s does not answer: this worker takes no more commands off"
                       " %s until it does (they wait there)", away, self.queue)  # fmt: skip

    def _paused(self, away: str, why: tuple[str, ...] | None = None) -> None:
        """Paused from now until the probe, started here, finds ``away`` answering."""
        if why is None:
            named = (("database", DATABASE), ("results", OUTCOME_STORE))
            why = tuple(reason for reason, what in named if what in away)
        worker_metrics().consuming_commands(False, why)
        self.paused_since = time.monotonic()
        self._away = away
        self._answered.clear()
        threading.Thread(target=self._probe, name="database-probe", daemon=True).start()

    def _probe(self) -> None:
        while True:
            time.sleep(PROBE_SECONDS)
            try:
                if self.database_answers():
                    self._answered.set()
                    return
            except Exception as error:  # still away
                logger.info("%s still does not answer: %s", self._away,
                            str(error).splitlines()[0] if str(error) else repr(error))

    def _resume(self) -> None:
        paused_for = time.monotonic() - (self.paused_since or time.monotonic())
        self.paused_since = None
        self._seen = self.watch.away_at
        self.consumer.add_task_queue(self.queue)
        worker_metrics().consuming_commands(True)
        logger.warning("%s answers again after %.0f s: taking commands off %s",
                       self._away, paused_for, self.queue)  # fmt: skip


def database_answers(engine: Any) -> bool:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    return True


class SchemaBehind(Exception):
    """The database answers with a schema older than this release's."""


def serves_this_release(engine: Any) -> bool:
    """The database's schema is this release's or a later one: raises while it is not."""
    from calls_worker.adapters.db.migrate import schema_behind

    reason = schema_behind(engine)
    if reason is not None:
        raise SchemaBehind(f"{reason}: run migrate")
    return True


def stores_answer(engine: Any, backend: Any) -> bool:
    """The database answers with this release's schema (or a later one), and so does the
    result backend when it is Redis (a PostgreSQL one is the database): raises while
    either does not."""
    database_answers(engine)
    serves_this_release(engine)
    client = getattr(backend, "client", None)
    if client is not None and hasattr(client, "ping"):
        client.ping()
    return True
