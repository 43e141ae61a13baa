from __future__ import annotations

import json
from typing import Any
from uuid import uuid4

import pytest

from calls_worker.domain.commands import (
    COMMANDS,
    MAX_RESULT,
    MAX_TEXT,
    AddCallAttempt,
    CommandKind,
    CreateCall,
    parse_command,
)
from calls_worker.domain.errors import InvalidCommand


def create_payload(**fields: Any) -> dict[str, Any]:
    return {"personUuid": str(uuid4()), "organizationUuid": str(uuid4()), **fields}


def fields_of(error: pytest.ExceptionInfo[InvalidCommand]) -> set[str]:
    return {d.field for d in error.value.details}


def test_camel_case_json_is_parsed() -> None:
    call, user = uuid4(), uuid4()
    command = parse_command(
        "add_attempt",
        {"callUuid": str(call), "userUuid": str(user), "attemptedAt": "2023-05-01T00:00:00.000Z"},
    )
    assert isinstance(command, AddCallAttempt)
    assert (command.call_uuid, command.user_uuid) == (call, user)
    assert command.attempted_at.utcoffset() is not None


def test_text_and_bytes_are_parsed_like_decoded_json() -> None:
    payload = create_payload(type="winback")
    from_text = parse_command("create", json.dumps(payload))
    from_bytes = parse_command("create", json.dumps(payload).encode())
    assert from_text == from_bytes == parse_command("create", payload)


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(InvalidCommand) as error:
        parse_command(
            "add_attempt",
            {"callUuid": str(uuid4()), "userUuid": str(uuid4()), "attemptedAt": "2023-05-01T00:00"},
        )
    assert fields_of(error) == {"attemptedAt"}


def test_extra_fields_are_refused_by_name() -> None:
    with pytest.raises(InvalidCommand) as error:
        parse_command("cancel", {"callUuid": str(uuid4()), "cancelledBy": "me"})
    assert fields_of(error) == {"cancelledBy"}


def test_snake_case_is_not_the_wire_format() -> None:
    with pytest.raises(InvalidCommand) as error:
        parse_command("cancel", {"call_uuid": str(uuid4())})
    assert "callUuid" in fields_of(error)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("personUuid", 12),
        ("personUuid", "not-a-uuid"),
        ("type", "robocall"),
        ("notes", 5),
        ("notes", "x" * (MAX_TEXT + 1)),
        ("externalMetadata", ["a", "list"]),
        ("externalMetadata", {"blob": "x" * 70_000}),
        ("uuid", "6ba7b810-9dad-11d1-80b4-00c04fd430c8"),  # v1, not v4
    ],
)
def test_wrong_values_are_refused_by_name(field: str, value: Any) -> None:
    with pytest.raises(InvalidCommand) as error:
        parse_command("create", create_payload(**{field: value}))
    assert field in {f.split(".")[0] for f in fields_of(error)}


@pytest.mark.parametrize(
    ("kind", "payload", "field"),
    [
        ("create", create_payload(notes="a\x00b"), "notes"),
        ("create", create_payload(externalMetadata={"k": [{"d": "\x00"}]}), "externalMetadata"),
        ("create", create_payload(externalMetadata={"key\x00": 1}), "externalMetadata"),
        ("complete", {"callUuid": str(uuid4()), "userUuid": str(uuid4()), "result": "\x00"},
         "result"),
    ],
)  # fmt: skip
def test_text_with_a_nul_is_refused_by_name(kind: CommandKind, payload: Any, field: str) -> None:
    """PostgreSQL cannot store NUL in text or jsonb: refused as invalid, not a crash."""
    with pytest.raises(InvalidCommand) as error:
        parse_command(kind, json.dumps(payload))
    assert fields_of(error) == {field}
    assert "NUL" in error.value.details[0].reason


def test_result_has_a_max_length() -> None:
    payload = {"callUuid": str(uuid4()), "userUuid": str(uuid4()), "result": "r" * (MAX_RESULT + 1)}
    with pytest.raises(InvalidCommand) as error:
        parse_command("complete", payload)
    assert fields_of(error) == {"result"}


def test_unparseable_json_is_invalid() -> None:
    with pytest.raises(InvalidCommand, match="invalid"):
        parse_command("create", "{not json")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("status", "completed"),
        ("status", None),
        ("attempts", []),
        ("result", "reached"),
        ("completedAt", "2023-05-01T00:00:00Z"),
        ("cancelledAt", "2023-05-01T00:00:00Z"),
    ],
)
def test_managed_create_forbids_end_state_fields(field: str, value: Any) -> None:
    with pytest.raises(InvalidCommand) as error:
        parse_command("create", create_payload(**{field: value}))
    assert fields_of(error) == {field}
    assert "managed here" in error.value.details[0].reason


def test_managed_create_names_every_forbidden_field() -> None:
    with pytest.raises(InvalidCommand) as error:
        parse_command("create", create_payload(status="completed", result="reached"))
    assert fields_of(error) == {"status", "result"}


def test_external_create_forbids_type() -> None:
    with pytest.raises(InvalidCommand) as error:
        parse_command("create", create_payload(externalMetadata={"source": "crm"}, type="winback"))
    assert fields_of(error) == {"type"}
    assert "verification" in error.value.details[0].reason


def test_external_create_allows_end_state_fields() -> None:
    command = parse_command(
        "create",
        create_payload(
            externalMetadata={"source": "crm"},
            status="completed",
            result="reached",
            completedAt="2023-05-01T00:00:00Z",
            attempts=[{"userUuid": str(uuid4()), "attemptedAt": "2023-04-30T10:00:00+02:00"}],
        ),
    )
    assert isinstance(command, CreateCall)
    assert command.is_external
    assert command.attempts is not None
    assert len(command.attempts) == 1


def test_empty_external_metadata_still_means_external() -> None:
    command = parse_command("create", create_payload(externalMetadata={}, status="cancelled"))
    assert isinstance(command, CreateCall)
    assert command.is_external


@pytest.mark.parametrize("kind", sorted(COMMANDS))
def test_every_command_has_a_camel_case_json_schema(kind: CommandKind) -> None:
    schema = COMMANDS[kind].model_json_schema(by_alias=True)
    assert schema["additionalProperties"] is False
    assert all("_" not in name for name in schema["properties"])
    assert "issuedAt" in schema["properties"]
