"""What becomes of a command message that was not simply applied: one function, one table.

Every place that meets a failure (the pool process applying a batch, the main process
settling one, the consumer keeping a message it cannot run) describes it as a
``Situation`` and does what ``decide`` answers. The cases, in the order ``decide``
tries them (tests/unit/test_settling.py holds the table):

- applied, or refused as invalid and kept: **answer** (its outcome stored, acknowledged);
  an outcome the result backend did not take is answered all the same (it is in the
  database) and consumption **pauses** until the backend answers; an invalid command's
  outcome is in no table, so it goes **back later**, to be answered when it returns;
- the database away (connection refused or lost, shutting down), or its schema older
  than this release's (a table, column or function it does not know: migrate has not run
  yet, docs/upgrades.md): **retry** with a backoff, whatever the budget, and **pause**
  consumption until it answers with the schema this release needs;
- a database that answers but failed the command (a deadlock, a serialization failure, a
  pool exhausted): **retry** while the budget lasts (CALLS_WORKER_COMMAND_MAX_RETRIES),
  then **give up**: kept among the rejected commands and acknowledged, its failure stored;
- an error no rule explains, raised by the command alone: **give up**; raised by a batch
  job of several: **back later**, and each comes back redelivered, so **alone**;
- the soft time limit: the command it interrupted (or the only one) is **given up**, it
  would only hang again; its batch-mates go **back at once**, to come back alone;
- a command to keep that the database cannot keep: **retry at the longest pause** from a
  pool process, **back later** from the main process, and **pause** either way;
- the pool process lost (killed, out of memory): **Celery's** own handling (put back,
  ``task_reject_on_worker_lost``, unless its outcome was stored);
- a message the consumer cannot run and cannot keep: **back later** and **pause** while
  the database is away; when a database that answers refuses it, **dropped**, with the
  counter ``calls_worker_rejected_commands_total{stage="dropped"}``, never sent round
  again.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import psycopg
from psycopg import errors as sqlstates
from sqlalchemy.exc import InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

# Errors worth another try: the database or the network was away for a moment, a deadlock
# or serialization failure was resolved by rolling us back. A broken rule is never retried.
TRANSIENT_ERRORS = (
    OperationalError,
    InterfaceError,
    PoolTimeoutError,
    # Commands read and write through psycopg directly too (adapters/db: _Transaction).
    psycopg.OperationalError,
    psycopg.InterfaceError,
    # A schema older than this release's (database_away), or a statement the database
    # refuses whatever the command (a broken grant): the batch stops, each command waits.
    ProgrammingError,
    sqlstates.UndefinedTable,
    sqlstates.UndefinedColumn,
    sqlstates.UndefinedFunction,
    sqlstates.UndefinedObject,
    # A standby answering (a URL without target_session_attrs=read-write, or a host listed
    # whose role changed): the primary is elsewhere, and a new connection may find it.
    sqlstates.ReadOnlySqlTransaction,
)
# SQLSTATEs that say the server cannot serve us now: admin or crash shutdown, starting up;
# read-only (a standby, not the primary the writes need).
_SERVER_AWAY = {"57P01", "57P02", "57P03", "25006"}
# SQLSTATEs of a schema older than the statements: undefined table, column, function,
# object. Bad input never causes these (the statements are this release's own).
SCHEMA_BEHIND = {"42P01", "42703", "42883", "42704"}


def database_away(error: BaseException) -> bool:
    """Whether ``error`` says the database cannot be reached (connection refused or lost,
    shutting down, starting up) or cannot serve this release yet (its schema is older), as
    opposed to an error of a database that answers (a deadlock, a serialization failure, a
    pool exhausted by slow commands)."""
    cause = getattr(error, "orig", None) or error
    if isinstance(error, InterfaceError) or isinstance(cause, psycopg.InterfaceError):
        return True
    if isinstance(cause, psycopg.Error) and cause.sqlstate in SCHEMA_BEHIND | {"25006"}:
        return True
    if isinstance(cause, psycopg.OperationalError):
        state = cause.sqlstate
        return state is None or state.startswith("08") or state in _SERVER_AWAY
    return False


class Failure(StrEnum):
    """What happened to a command message."""

    NONE = "none"
    """Applied: it has its outcome."""
    INVALID = "invalid"
    """Refused as invalid (unparseable, a wrong ``signedFor``), and kept with its reason."""
    DATABASE = "database"
    """A database error stopped its batch before its outcome was committed."""
    DEFECT = "defect"
    """An error no rule explains, raised by this command alone."""
    BATCH_RAISED = "batch_raised"
    """The batch job raised in the pool process (main process)."""
    SOFT_TIME_LIMIT = "soft_time_limit"
    """Its batch ran past the soft time limit."""
    NOT_KEPT = "not_kept"
    """It was to be kept among the rejected commands, and the database could not keep it."""
    OUTCOME_NOT_STORED = "outcome_not_stored"
    """Its outcome is decided, and the result backend did not take it."""
    WORKER_LOST = "worker_lost"
    """The pool process applying it died."""
    MESSAGE_NOT_KEPT = "message_not_kept"
    """The consumer could not run the message and could not keep it either."""


class Action(StrEnum):
    """What is done with the message."""

    ANSWER = "answer"
    """Its outcome stored (unless sent with ``ignore_result``); acknowledged."""
    RETRY = "retry"
    """Sent again with a backoff (Celery's retry: a new message, ``retries`` + 1); acknowledged."""
    RETRY_AT_LONGEST = "retry_at_longest"
    """Sent again at the longest backoff (CALLS_WORKER_COMMAND_RETRY_BACKOFF_MAX_SECONDS)."""
    GIVE_UP = "give_up"
    """Kept among the rejected commands with the reason; its failure stored; acknowledged."""
    ALONE = "alone"
    """Back to the queue now; it comes back redelivered, and so is applied alone."""
    ALONE_LATER = "alone_later"
    """Back to the queue after a pause (batching.REQUEUE_PAUSE_SECONDS), then alone."""
    CELERY = "celery"
    """Celery's own handling of a task whose worker was lost."""
    DROP = "drop"
    """Acknowledged with an error line and a counter: a database that answers refuses it."""


class Pause(StrEnum):
    """What the worker stops taking commands for, until it answers (outage.py)."""

    NONE = "none"
    DATABASE = "database"
    OUTCOME_STORE = "outcome_store"


@dataclass(frozen=True)
class Situation:
    failure: Failure
    database_away: bool = False
    """Whether the error says the database cannot be reached (``database_away``)."""
    alone: bool = True
    """Whether its batch held this message only."""
    interrupted: bool = True
    """Whether the failure struck this command (not a batch-mate of the one it struck)."""
    retries: int = 0
    """The message's ``retries`` so far."""
    budget: int = 0
    """CALLS_WORKER_COMMAND_MAX_RETRIES."""
    kept_elsewhere: bool = True
    """Whether its outcome is in the database (an invalid command's is not)."""
    in_pool: bool = True
    """Met in a pool process (a retry can be sent) or in the main process (it cannot)."""


@dataclass(frozen=True)
class Decision:
    action: Action
    pause: Pause = Pause.NONE


def decide(situation: Situation) -> Decision:
    """What becomes of a command message in ``situation`` (the module's docstring)."""
    s = situation
    away = Pause.DATABASE if s.database_away else Pause.NONE
    match s.failure:
        case Failure.NONE | Failure.INVALID:
            return Decision(Action.ANSWER)
        case Failure.OUTCOME_NOT_STORED:
            action = Action.ANSWER if s.kept_elsewhere else Action.ALONE_LATER
            return Decision(action, Pause.OUTCOME_STORE)
        case Failure.DATABASE:
            if s.database_away or s.retries < s.budget:
                return Decision(Action.RETRY, away)
            return Decision(Action.GIVE_UP)
        case Failure.DEFECT:
            return Decision(Action.GIVE_UP)
        case Failure.BATCH_RAISED:
            return Decision(Action.GIVE_UP if s.alone else Action.ALONE_LATER)
        case Failure.SOFT_TIME_LIMIT:
            return Decision(Action.GIVE_UP if s.interrupted or s.alone else Action.ALONE)
        case Failure.NOT_KEPT:
            action = Action.RETRY_AT_LONGEST if s.in_pool else Action.ALONE_LATER
            return Decision(action, Pause.DATABASE)
        case Failure.WORKER_LOST:
            return Decision(Action.CELERY)
        case Failure.MESSAGE_NOT_KEPT:
            if s.database_away:
                return Decision(Action.ALONE_LATER, Pause.DATABASE)
            return Decision(Action.DROP)
    raise AssertionError(f"no rule for {s}")  # pragma: no cover - every Failure has one
