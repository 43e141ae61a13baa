"""Fuzzed messages: whatever arrives, the worker's path (worker/messages.py) ends in a
command or a clear InvalidCommand, and every message in an outcome."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calls_worker.domain.access import AccessPolicy
from calls_worker.domain.commands import (
    COMMANDS,
    MAX_ATTEMPTS_ON_CREATE,
    MAX_EXTERNAL_METADATA_BYTES,
    MAX_RESULT,
    MAX_TEXT,
    CommandKind,
    parse_command,
)
from calls_worker.domain.errors import InvalidCommand
from calls_worker.wire import TASK_NAMES
from calls_worker.worker.messages import Message, apply_messages, parsed
from tests.unit.fakes import FakeUnitOfWork
from tests.worker_path import message

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(
    ["callUuid", "personUuid", "organizationUuid", "userUuid", "attemptedAt", "result", "uuid",
     "status", "type", "externalMetadata", "attempts", "notes", "issuedAt", "extra", "call_uuid"]
)  # fmt: skip
payloads = st.dictionaries(field_names, json_values, max_size=8)
kinds = st.sampled_from(sorted(COMMANDS))


def parses_or_explains(kind: CommandKind, payload: Any) -> None:
    """Anything else than a command or InvalidCommand (a crash) fails the test. A command
    that parses holds what was sent: only fields of its kind, and it reads back the same
    from its own JSON."""
    refused: InvalidCommand | None = None
    try:
        command = parsed(message(kind, payload), signed=False).command
    except InvalidCommand as error:
        refused = error
    if refused is not None:
        assert refused.message
        assert refused.details
        assert all(isinstance(d.reason, str) and d.reason for d in refused.details)
        return
    assert command.kind == kind
    sent = payload if isinstance(payload, dict) else json.loads(payload)
    assert set(sent) == set(command.model_dump(by_alias=True, exclude_unset=True))
    again = parse_command(kind, command.model_dump_json(by_alias=True, exclude_unset=True))
    assert again == command


@settings(max_examples=300, deadline=None)
@given(kind=kinds, payload=payloads)
def test_any_object_parses_or_is_explained(kind: CommandKind, payload: dict[str, Any]) -> None:
    parses_or_explains(kind, payload)


@settings(max_examples=200, deadline=None)
@given(kind=kinds, body=st.binary(max_size=200) | st.text(max_size=200))
def test_any_body_parses_or_is_explained(kind: CommandKind, body: bytes | str) -> None:
    parses_or_explains(kind, body)


@settings(max_examples=200, deadline=None)
@given(kind=kinds, args=st.lists(json_values, max_size=2),
       kwargs=st.dictionaries(st.sampled_from(["command", "signedFor", "signedBy", "x"]),
                              payloads | json_values, max_size=3),
       signed=st.booleans())  # fmt: skip
def test_any_message_is_answered(kind: CommandKind, args: list[Any], kwargs: dict[str, Any],
                                 signed: bool) -> None:  # fmt: skip
    """Any arguments, through the whole path on the fakes: an outcome, never an error; a
    refusal before the command is applied is invalid, with its reasons."""
    uow = FakeUnitOfWork()
    sent = Message(TASK_NAMES[kind], "fuzzed", tuple(args), kwargs)
    (applied,), _ = apply_messages([sent], lambda: uow, policy=AccessPolicy(signed=signed),
                                   signed=signed)  # fmt: skip
    assert applied.failure is None
    assert applied.outcome is not None
    if applied.invalid is not None:
        assert applied.outcome["error"]["code"] == "invalid"
        assert applied.outcome["error"]["details"]


CALL = "5f0c6a52-0d5e-4e43-9a8d-7c1f6f7ea1b1"
PERSON = {"personUuid": CALL, "organizationUuid": CALL}
EXTERNAL = {**PERSON, "externalMetadata": {"source": "crm"}}
ATTEMPT = {"userUuid": CALL, "attemptedAt": "2026-03-01T09:00:00+00:00"}


def _metadata(size: int) -> dict[str, Any]:
    """externalMetadata whose compact JSON is exactly ``size`` bytes."""
    overhead = len(json.dumps({"k": ""}, separators=(",", ":")))
    return {"k": "m" * (size - overhead)}


# Each limit, with the payload that reaches it at ``n``: (kind, field, limit, payload(n)).
LIMITS: list[tuple[CommandKind, str, int, Any]] = [
    ("create", "notes", MAX_TEXT, lambda n: {**PERSON, "notes": "n" * n}),
    ("create", "result", MAX_RESULT, lambda n: {**EXTERNAL, "result": "r" * n}),
    ("complete", "result", MAX_RESULT, lambda n: {"callUuid": CALL, "userUuid": CALL,
                                                  "result": "r" * n}),
    ("create", "attempts", MAX_ATTEMPTS_ON_CREATE,
     lambda n: {**EXTERNAL, "attempts": [ATTEMPT] * n}),
    ("create", "externalMetadata", MAX_EXTERNAL_METADATA_BYTES,
     lambda n: {**PERSON, "externalMetadata": _metadata(n)}),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "field", "limit", "payload"), LIMITS,
                         ids=[f"{k}.{f}" for k, f, _, _ in LIMITS])  # fmt: skip
def test_each_size_limit_holds_at_and_refuses_over(
    kind: CommandKind, field: str, limit: int, payload: Any
) -> None:
    """At the limit the command parses with the value whole; one over, and far over (a
    hundredfold), it is refused naming that field and no other."""
    at = parse_command(kind, payload(limit))
    value = getattr(at, {"externalMetadata": "external_metadata"}.get(field, field))
    assert value is not None
    assert (len(json.dumps(value, separators=(",", ":"))) if field == "externalMetadata"
            else len(value)) == limit  # fmt: skip
    for size in (limit + 1, limit * 100):
        with pytest.raises(InvalidCommand) as refused:
            parse_command(kind, json.dumps(payload(size)))
        assert {d.field.split(".")[0] for d in refused.value.details} == {field}, size
