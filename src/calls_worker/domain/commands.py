"""The five commands producers queue, as strict pydantic models of their camelCase JSON.

``parse_command`` is the one way in: it turns raw JSON (text or decoded) into a command or
raises ``InvalidCommand`` naming every bad field and why.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal
from uuid import UUID

from pydantic import (
    UUID4,
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
)
from pydantic.alias_generators import to_camel

from calls_worker.domain.errors import FieldError, InvalidCommand
from calls_worker.domain.model import CallStatus, CallType

MAX_TEXT = 10_000
MAX_RESULT = 4_000
MAX_ATTEMPTS_ON_CREATE = 1_000
MAX_EXTERNAL_METADATA_BYTES = 64 * 1024

CommandKind = Literal["create", "add_attempt", "complete", "cancel", "expire"]


# PostgreSQL stores no NUL character in text or jsonb: refused here, with the field named,
# rather than failing at the database.
_NO_NUL = "must not contain the NUL character (\\u0000)"


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError(_NO_NUL)
    return value


Text = Annotated[str, AfterValidator(_no_nul)]


def _strings(value: JsonValue) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _bounded_metadata(value: dict[str, JsonValue]) -> dict[str, JsonValue]:
    if len(json.dumps(value, separators=(",", ":"))) > MAX_EXTERNAL_METADATA_BYTES:
        raise ValueError(f"must serialize to at most {MAX_EXTERNAL_METADATA_BYTES} bytes of JSON")
    if any("\x00" in text for text in _strings(value)):
        raise ValueError(_NO_NUL)
    return value


ExternalMetadata = Annotated[dict[str, JsonValue], AfterValidator(_bounded_metadata)]


class _Model(BaseModel):
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        frozen=True,
        alias_generator=to_camel,
        str_max_length=MAX_TEXT,
    )


class Command(_Model):
    """Fields every command has.

    ``issuedAt`` is stamped by the producer; timestamps a command leaves out default to it,
    so a retried command gives the same result. Without it the worker's clock stands in.
    """

    kind: ClassVar[CommandKind]

    issued_at: AwareDatetime | None = None
    service_account_uuid: UUID | None = None
    """The service account the command is sent for (domain/access.py); optional unless the
    worker requires one."""

    @property
    def call_uuid_or_none(self) -> UUID | None:
        """The call this command is about, when the command names it."""
        return None

    def timestamps(self) -> Iterator[tuple[str, datetime]]:
        """Every timestamp the command carries, by its JSON path."""
        for name, value in self:
            if isinstance(value, datetime):
                yield to_camel(name), value
            elif isinstance(value, list):
                for n, item in enumerate(value):
                    if isinstance(item, _Model):
                        for field, stamp in item:
                            if isinstance(stamp, datetime):
                                yield f"{to_camel(name)}.{n}.{to_camel(field)}", stamp


# Producers' clocks may run ahead of the worker's; a timestamp further ahead than this is
# not skew but a mistake (a wrong year, a unit error) and is refused.
FUTURE_TOLERANCE = timedelta(hours=24)


def absurd_timestamps(command: Command, now: datetime) -> list[FieldError]:
    """The timestamps of ``command`` more than FUTURE_TOLERANCE after ``now``."""
    limit = now + FUTURE_TOLERANCE
    return [
        FieldError(field, f"is more than {FUTURE_TOLERANCE} in the future")
        for field, stamp in command.timestamps()
        if stamp > limit
    ]


class AttemptIn(_Model):
    """An attempt as a producer sends it."""

    user_uuid: UUID
    attempted_at: AwareDatetime


_MANAGED_FORBIDDEN = ("status", "attempts", "result", "completed_at", "cancelled_at")


class CreateCall(Command):
    """Create a call, managed here (no ``externalMetadata``) or externally (with it)."""

    kind: ClassVar[CommandKind] = "create"

    uuid: UUID4 | None = None
    type: CallType | None = None
    status: CallStatus | None = None
    created_at: AwareDatetime | None = None
    external_metadata: ExternalMetadata | None = None
    attempts: list[AttemptIn] | None = Field(default=None, max_length=MAX_ATTEMPTS_ON_CREATE)
    result: Text | None = Field(default=None, max_length=MAX_RESULT)
    requested_by: UUID | None = None
    completed_at: AwareDatetime | None = None
    cancelled_at: AwareDatetime | None = None
    notes: Text | None = None
    person_uuid: UUID
    pledge_case_uuid: UUID | None = None
    organization_uuid: UUID

    @property
    def is_external(self) -> bool:
        return self.external_metadata is not None

    @property
    def call_uuid_or_none(self) -> UUID | None:
        return self.uuid

    def management_violations(self) -> list[FieldError]:
        """Fields this command may not carry, given where the call is managed.

        A field counts as given when it is present in the JSON, even as ``null``.
        """
        given = self.model_fields_set
        if self.is_external:
            if "type" in given:
                return [
                    FieldError(
                        "type",
                        "forbidden for a call managed externally (externalMetadata given): "
                        "its type is always verification",
                    )
                ]
            return []
        return [
            FieldError(
                to_camel(name),
                "forbidden for a call managed here (no externalMetadata): it is created as "
                "requested, without attempts, result or end timestamps",
            )
            for name in _MANAGED_FORBIDDEN
            if name in given
        ]


class _CallCommand(Command):
    call_uuid: UUID

    @property
    def call_uuid_or_none(self) -> UUID | None:
        return self.call_uuid


class AddCallAttempt(_CallCommand):
    """Record that someone tried to reach the person."""

    kind: ClassVar[CommandKind] = "add_attempt"

    user_uuid: UUID
    attempted_at: AwareDatetime


class CompleteCall(_CallCommand):
    """The person was reached; store the result."""

    kind: ClassVar[CommandKind] = "complete"

    user_uuid: UUID
    result: Text = Field(max_length=MAX_RESULT)


class CancelCall(_CallCommand):
    """The call will not be made."""

    kind: ClassVar[CommandKind] = "cancel"

    cancelled_at: AwareDatetime | None = None


class ExpireCall(_CallCommand):
    """Expire the call now, whatever its attempts."""

    kind: ClassVar[CommandKind] = "expire"

    expired_at: AwareDatetime | None = None


COMMANDS: dict[CommandKind, type[Command]] = {
    cls.kind: cls for cls in (CreateCall, AddCallAttempt, CompleteCall, CancelCall, ExpireCall)
}


MAX_PAGE = 100
DEFAULT_PAGE = 25
MAX_CURSOR = 1_000


class ListCalls(_Model):
    """The query ``calls.list``: calls newest first (``createdAt``, then ``uuid``), a page at
    a time; the filters narrow, the service account's reach narrows further."""

    service_account_uuid: UUID | None = None
    organization_uuid: UUID | None = None
    person_uuid: UUID | None = None
    status: CallStatus | None = None
    type: CallType | None = None
    limit: int = Field(default=DEFAULT_PAGE, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(default=None, min_length=1, max_length=MAX_CURSOR)


def parse_list_calls(payload: str | bytes | Mapping[str, Any]) -> ListCalls:
    """Validate a listing query's JSON; raises InvalidCommand listing every bad field."""
    try:
        raw = payload if isinstance(payload, str | bytes) else json.dumps(payload)
        return ListCalls.model_validate_json(raw)
    except (TypeError, ValueError) as error:
        if isinstance(error, ValidationError):
            raise InvalidCommand(
                f"list query is invalid: {error.error_count()} problem(s)",
                [_field_error(e) for e in error.errors(include_url=False)],
            ) from error
        raise InvalidCommand("list query is not JSON", [FieldError("", str(error))]) from error


def parse_command(kind: CommandKind, payload: str | bytes | Mapping[str, Any]) -> Command:
    """Validate a command's JSON; raises InvalidCommand listing every bad field.

    Decoded JSON (a mapping) is validated as JSON too, so strings are accepted for UUIDs and
    timestamps exactly as on the wire and nowhere else.
    """
    model = COMMANDS[kind]
    try:
        raw = payload if isinstance(payload, str | bytes) else json.dumps(payload)
    except (TypeError, ValueError) as error:
        raise InvalidCommand(f"{kind} command is not JSON", [FieldError("", str(error))]) from error
    try:
        command = model.model_validate_json(raw)
    except ValidationError as error:
        raise InvalidCommand(
            f"{kind} command is invalid: {error.error_count()} problem(s)",
            [_field_error(e) for e in error.errors(include_url=False)],
        ) from error
    if isinstance(command, CreateCall) and (violations := command.management_violations()):
        raise InvalidCommand(
            f"create command is invalid: {len(violations)} forbidden field(s)", violations
        )
    return command


def _field_error(error: Any) -> FieldError:
    return FieldError(".".join(str(part) for part in error["loc"]), str(error["msg"]))
