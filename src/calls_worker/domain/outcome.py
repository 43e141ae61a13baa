"""What a producer reads back: the call as the API's JSON, or an error with its code.

    {"ok": true,  "call": {...}}
    {"ok": false, "error": {"code", "status", "message", "details": [{"field", "reason"}]}}

Outcomes are plain JSON values so they can be stored as they were first given and sent
again, byte for byte, when a command is delivered twice.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from calls_worker.domain.errors import DomainError
from calls_worker.domain.model import Call

Outcome = dict[str, Any]


def _timestamp(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _uuid(value: object | None) -> str | None:
    return None if value is None else str(value)


def call_json(call: Call) -> dict[str, Any]:
    """The call in the API's camelCase shape, attempts included."""
    return {
        "uuid": str(call.uuid),
        "status": call.status.value,
        "type": call.type.value,
        "attempts": [
            {"userUuid": str(a.user_uuid), "attemptedAt": _timestamp(a.attempted_at)}
            for a in call.attempts
        ],
        "attemptCount": call.attempt_count,
        "result": call.result,
        "notes": call.notes,
        "requestedBy": _uuid(call.requested_by),
        "personUuid": str(call.person_uuid),
        "pledgeCaseUuid": _uuid(call.pledge_case_uuid),
        "organizationUuid": str(call.organization_uuid),
        "externalMetadata": call.external_metadata,
        "createdAt": _timestamp(call.created_at),
        "updatedAt": _timestamp(call.updated_at),
        "completedAt": _timestamp(call.completed_at),
        "cancelledAt": _timestamp(call.cancelled_at),
        "expiredAt": _timestamp(call.expired_at),
    }


def succeeded(call: Call) -> Outcome:
    return {"ok": True, "call": call_json(call)}


def failed(error: DomainError) -> Outcome:
    return {
        "ok": False,
        "error": {
            "code": error.code,
            "status": error.status,
            "message": error.message,
            "details": [{"field": d.field, "reason": d.reason} for d in error.details],
        },
    }
