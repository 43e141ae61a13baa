"""The one table of what becomes of a command message (worker/settling.py)."""

from __future__ import annotations

import pytest

from calls_worker.worker.settling import (
    Action,
    Decision,
    Failure,
    Pause,
    Situation,
    decide,
)

A, P, F = Action, Pause, Failure
BUDGET = 3

# (situation, decision): every Failure, and each condition that changes its decision.
TABLE: list[tuple[str, Situation, Decision]] = [
    ("applied", Situation(F.NONE), Decision(A.ANSWER)),
    ("invalid, kept", Situation(F.INVALID), Decision(A.ANSWER)),
    ("outcome not stored, in the database", Situation(F.OUTCOME_NOT_STORED),
     Decision(A.ANSWER, P.OUTCOME_STORE)),
    ("outcome not stored, invalid (in no table)",
     Situation(F.OUTCOME_NOT_STORED, kept_elsewhere=False),
     Decision(A.ALONE_LATER, P.OUTCOME_STORE)),
    ("database away, first try", Situation(F.DATABASE, database_away=True, budget=BUDGET),
     Decision(A.RETRY, P.DATABASE)),
    ("database away, past the budget",
     Situation(F.DATABASE, database_away=True, retries=BUDGET + 5, budget=BUDGET),
     Decision(A.RETRY, P.DATABASE)),
    ("database answers, within the budget",
     Situation(F.DATABASE, retries=BUDGET - 1, budget=BUDGET), Decision(A.RETRY)),
    ("database answers, budget spent", Situation(F.DATABASE, retries=BUDGET, budget=BUDGET),
     Decision(A.GIVE_UP)),
    ("database answers, no budget", Situation(F.DATABASE, budget=0), Decision(A.GIVE_UP)),
    ("a defect of its own", Situation(F.DEFECT), Decision(A.GIVE_UP)),
    ("a defect of its own in a batch", Situation(F.DEFECT, alone=False), Decision(A.GIVE_UP)),
    ("the batch job raised, alone", Situation(F.BATCH_RAISED, in_pool=False),
     Decision(A.GIVE_UP)),
    ("the batch job raised, several", Situation(F.BATCH_RAISED, alone=False, in_pool=False),
     Decision(A.ALONE_LATER)),
    ("soft time limit, the one interrupted",
     Situation(F.SOFT_TIME_LIMIT, alone=False, interrupted=True), Decision(A.GIVE_UP)),
    ("soft time limit, a batch-mate",
     Situation(F.SOFT_TIME_LIMIT, alone=False, interrupted=False), Decision(A.ALONE)),
    ("soft time limit, alone, between statements",
     Situation(F.SOFT_TIME_LIMIT, alone=True, interrupted=False), Decision(A.GIVE_UP)),
    ("cannot be kept, in a pool process", Situation(F.NOT_KEPT, database_away=True),
     Decision(A.RETRY_AT_LONGEST, P.DATABASE)),
    ("cannot be kept, in the main process",
     Situation(F.NOT_KEPT, database_away=True, in_pool=False), Decision(A.ALONE_LATER, P.DATABASE)),
    ("pool process lost", Situation(F.WORKER_LOST, in_pool=False), Decision(A.CELERY)),
    ("pool process lost, several", Situation(F.WORKER_LOST, alone=False, in_pool=False),
     Decision(A.CELERY)),
    ("a message not kept, database away", Situation(F.MESSAGE_NOT_KEPT, database_away=True),
     Decision(A.ALONE_LATER, P.DATABASE)),
    ("a message not kept, the database refused it", Situation(F.MESSAGE_NOT_KEPT),
     Decision(A.DROP)),
]  # fmt: skip


@pytest.mark.parametrize(("situation", "decision"), [(s, d) for _, s, d in TABLE],
                         ids=[name for name, _, _ in TABLE])  # fmt: skip
def test_the_table(situation: Situation, decision: Decision) -> None:
    assert decide(situation) == decision


def test_every_failure_and_action_is_in_the_table() -> None:
    assert {s.failure for _, s, _ in TABLE} == set(Failure)
    assert {d.action for _, _, d in TABLE} == set(Action)
    assert {d.pause for _, _, d in TABLE} == set(Pause)
