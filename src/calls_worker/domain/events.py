"""Call events: what downstream systems hear of every change of a call.

    {"eventId", "sequence", "kind", "occurredAt", "callUuid", "organizationUuid",
     "owningOrganizationUuid", "call", "expiry" (call.expired only)}

A change and its event are written in one transaction (the outbox, migration 0010), and the
relay publishes the event afterwards (worker/relay.py). ``call`` is the call as the
command's outcome shows it (outcome.call_json); the sweep writes the same shape in SQL.
The JSON Schema is docs/schemas/call-event.schema.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID, uuid4

from pydantic import AwareDatetime, BaseModel, ConfigDict, JsonValue

from calls_worker.domain.commands import CommandKind
from calls_worker.domain.model import Call, CallStatus, CallType

EventKind = Literal[
    "call.created", "call.attempt_added", "call.completed", "call.cancelled", "call.expired"
]

KIND_OF_COMMAND: dict[CommandKind, EventKind] = {
    "create": "call.created",
    "add_attempt": "call.attempt_added",
    "complete": "call.completed",
    "cancel": "call.cancelled",
    "expire": "call.expired",
}

ExpiredBy = Literal["sweep", "command"]


@dataclass(frozen=True)
class CallEvent:
    """A change a command made to ``call`` (as it stands after the change), at ``occurred_at``
    (the command's timestamp, or the time the worker applied it)."""

    kind: EventKind
    occurred_at: datetime
    call: Call
    event_id: UUID = field(default_factory=uuid4)

    @property
    def expired_by_command(self) -> bool:
        return self.kind == "call.expired"


def event_of(command_kind: CommandKind, call: Call, occurred_at: datetime) -> CallEvent:
    """The event of a command that changed ``call`` (every command that succeeds does)."""
    return CallEvent(KIND_OF_COMMAND[command_kind], occurred_at, call)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _uuid(value: object | None) -> str | None:
    return None if value is None else str(value)


def event_json(
    *, seq: int, event_id: UUID, kind: str, occurred_at: datetime, call_uuid: UUID,
    organization_uuid: UUID, owning_organization_uuid: UUID | None, call: dict[str, Any],
    expiry: dict[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    """The event as published, from what the outbox keeps of it."""
    event: dict[str, Any] = {
        "eventId": str(event_id),
        "sequence": seq,
        "kind": kind,
        "occurredAt": _iso(occurred_at),
        "callUuid": str(call_uuid),
        "organizationUuid": str(organization_uuid),
        "owningOrganizationUuid": _uuid(owning_organization_uuid),
        "call": call,
    }
    if kind == "call.expired":
        event["expiry"] = expiry
    return event


# The event as subscribers receive it, for its JSON Schema (docs/schemas/call-event.schema.json,
# written by `calls-worker schema`) and for tests that check what is published against it.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class AttemptOut(_Strict):
    """An attempt as the call shows it."""

    userUuid: UUID  # noqa: N815 - the wire's camelCase
    attemptedAt: AwareDatetime  # noqa: N815


class CallOut(_Strict):
    """The call after the change, as the command's outcome shows it."""

    uuid: UUID
    status: CallStatus
    type: CallType
    attempts: list[AttemptOut]
    attemptCount: int  # noqa: N815
    result: str | None
    notes: str | None
    requestedBy: UUID | None  # noqa: N815
    personUuid: UUID  # noqa: N815
    pledgeCaseUuid: UUID | None  # noqa: N815
    organizationUuid: UUID  # noqa: N815
    externalMetadata: JsonValue  # noqa: N815
    createdAt: AwareDatetime  # noqa: N815
    updatedAt: AwareDatetime  # noqa: N815
    completedAt: AwareDatetime | None  # noqa: N815
    cancelledAt: AwareDatetime | None  # noqa: N815
    expiredAt: AwareDatetime | None  # noqa: N815


class Expiry(_Strict):
    """Who expired the call, and how its attempts stood against its owning organization's
    maximum (null: the organization has none; a command may expire such a call)."""

    by: ExpiredBy
    attemptCount: int  # noqa: N815
    maxCallAttempts: int | None  # noqa: N815


class CallEventDocument(_Strict):
    """A change of a call, published to the topic exchange calls.events (routing key: its
    kind) as the keyword argument ``event`` of the task calls.events.call_changed. At least
    once: de-duplicate by ``eventId``. ``sequence`` grows with each change of a call."""

    eventId: UUID  # noqa: N815
    sequence: int
    kind: EventKind
    occurredAt: AwareDatetime  # noqa: N815
    callUuid: UUID  # noqa: N815
    organizationUuid: UUID  # noqa: N815
    owningOrganizationUuid: UUID | None  # noqa: N815
    call: CallOut
    expiry: Expiry | None = None
    """Present in call.expired events only."""
