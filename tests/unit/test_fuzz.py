"""Fuzzed payloads: whatever arrives, parsing ends in a command or a clear InvalidCommand."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calls_worker.domain.commands import COMMANDS, CommandKind, parse_command
from calls_worker.domain.errors import InvalidCommand

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
    """Anything else than a command or InvalidCommand (a crash) fails the test."""
    refused: InvalidCommand | None = None
    try:
        parse_command(kind, payload)
    except InvalidCommand as error:
        refused = error
    if refused is not None:
        assert refused.message
        assert all(isinstance(d.reason, str) and d.reason for d in refused.details)


@settings(max_examples=300, deadline=None)
@given(kind=kinds, payload=payloads)
def test_any_object_parses_or_is_explained(kind: CommandKind, payload: dict[str, Any]) -> None:
    parses_or_explains(kind, payload)


@settings(max_examples=200, deadline=None)
@given(kind=kinds, body=st.binary(max_size=200) | st.text(max_size=200))
def test_any_body_parses_or_is_explained(kind: CommandKind, body: bytes | str) -> None:
    parses_or_explains(kind, body)


@settings(max_examples=50, deadline=None)
@given(kind=kinds, size=st.integers(min_value=10_001, max_value=2_000_000))
def test_huge_strings_are_refused_by_field(kind: CommandKind, size: int) -> None:
    payload = {"notes": "x" * size, "result": "y" * size, "callUuid": "z" * size}
    with pytest.raises(InvalidCommand) as refused:
        parse_command(kind, json.dumps(payload))
    assert {d.field for d in refused.value.details} & {"notes", "result", "callUuid"}
