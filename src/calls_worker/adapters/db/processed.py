"""The processed-command record (``worker_processed_commands``): each command's outcome by
its id, what makes commands idempotent."""

from __future__ import annotations

from uuid import UUID

from psycopg.types.json import Jsonb

from calls_worker.domain.outcome import Outcome
from calls_worker.service.unit_of_work import ProcessedCommands

from .transaction import OnTransaction

_PROCESSED_OUTCOME = "SELECT outcome FROM worker_processed_commands WHERE command_id = %(id)s"
# The first statement of a batch: the outcomes its command ids have already (redeliveries).
PROCESSED_OUTCOMES = (
    "SELECT coalesce(json_object_agg(command_id, outcome), '{}'::json) AS outcomes"
    " FROM worker_processed_commands WHERE command_id = ANY(%(ids)s)"
)
_INSERT_PROCESSED = (
    "INSERT INTO worker_processed_commands"
    " (command_id, kind, call_uuid, outcome, service_account_uuid)"
    " VALUES (%(command_id)s, %(kind)s, %(call_uuid)s, %(outcome)s, %(account)s)"
)
# Unique constraints whose violation at commit means something to the handlers: a command
# id recorded already, in either of the tables of outcomes (migration 0008).
DUPLICATE_COMMAND = {"worker_processed_commands_pkey", "worker_processed_commands_b_pkey"}


class SqlProcessedCommands(OnTransaction, ProcessedCommands):
    def get(self, command_id: str) -> Outcome | None:
        row = self._transaction.read(_PROCESSED_OUTCOME, {"id": command_id})
        return None if row is None else dict(row.outcome)

    def add(
        self, command_id: str, kind: str, call_uuid: UUID | None, outcome: Outcome,
        service_account_uuid: UUID | None = None,
    ) -> None:  # fmt: skip
        # First among the writes: a redelivery then fails before doing any of its work.
        self._transaction.write_first(
            _INSERT_PROCESSED,
            {"command_id": command_id, "kind": kind, "call_uuid": call_uuid,
             "outcome": Jsonb(outcome), "account": service_account_uuid},
        )  # fmt: skip


