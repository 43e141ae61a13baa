"""What a sender put in a message never makes the database refuse to keep it: NUL, lone
surrogates and over-long values in every field of a rejected command are stored escaped."""

from __future__ import annotations

import pytest

from calls_worker.adapters.db import journal
from calls_worker.domain.errors import FieldError
from tests.db_world import Db

UNSTORABLE = {
    "NUL": "a\x00b",
    "lone surrogate": "a\ud800b",
    "over-long": "x" * 100_000,
    "NUL, surrogate and long": ("\x00\udfff" * 30_000),
}


@pytest.mark.parametrize("value", UNSTORABLE.values(), ids=UNSTORABLE.keys())
def test_every_field_is_kept_escaped(db: Db, value: str) -> None:
    rejected_id = journal.record_rejected(
        db.engine, task_name=value, command_id=value, raw_body=value, reason=value,
        details=[FieldError(value, value)],
    )  # fmt: skip
    kept = journal.get_rejected(db.engine, rejected_id)
    assert kept is not None
    for name, text in (("task_name", kept.task_name), ("command_id", kept.command_id),
                       ("reason", kept.reason)):  # fmt: skip
        assert text is not None
        assert "\x00" not in text, name
        text.encode("utf-8")  # no lone surrogate
        assert len(text) <= (journal.NAME_LIMIT if name != "reason" else journal.REASON_LIMIT)
    if "\x00" in value or not value.isascii():
        assert kept.raw_body.startswith("base64:")  # the body as it came, recoverable
    else:
        assert kept.raw_body == value  # a body is never cut here (the consumer bounds it)
    if value == "a\x00b":
        assert kept.command_id == "a\\x00b"  # an escape an operator can read


def test_a_value_it_can_hold_is_kept_as_it_is() -> None:
    assert journal.storable_text("calls.create ✓", 200) == "calls.create ✓"
    cut = journal.storable_text("y" * 300, 200)
    assert cut.startswith("y" * 160)
    assert cut.endswith("(140 more characters)")


@pytest.mark.parametrize("value", ["plain", UNSTORABLE["NUL, surrogate and long"]],
                         ids=["plain", "unstorable"])  # fmt: skip
def test_an_invalid_command_that_comes_again_is_kept_once(db: Db, value: str) -> None:
    """``once``: the same command (id, body, reason) waiting for an operator is not kept a
    second time; one replayed or dismissed, or with another body or reason, is."""

    def keep(body: str = value, reason: str = "invalid") -> int:
        return journal.record_rejected(db.engine, task_name="calls.cancel", command_id=value,
                                       raw_body=body, reason=reason, once=True)  # fmt: skip

    first = keep()
    assert keep() == first
    assert keep(body=value + "!") != first
    assert keep(reason="other") != first
    assert journal.dismiss_rejected(db.engine, [first]) == [first]
    assert keep() != first
    kept = db.sql("SELECT count(*) FROM worker_rejected_commands").scalar()
    assert kept == 4
