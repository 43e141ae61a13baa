"""Getting a command back out of a rejected message's raw body."""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

import click


def command_of(raw_body: str) -> Any:
    """The ``command`` argument of a task message body (``[args, kwargs, embed]``).

    Raises ClickException when the body holds none, so the operator passes a corrected one.
    """
    try:
        body = json.loads(raw_body)
        command = body[1]["command"]
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise click.ClickException(
            "the rejected body holds no command argument; give the corrected command as FILE"
        ) from error
    return command


def replay_id(rejected_id: int, command: Any) -> str:
    """The command id of a replay: the same for the same rejected command and body.

    Not the original id: the result backend still holds the rejection under it.
    """
    canonical = command if isinstance(command, str) else json.dumps(command, sort_keys=True)
    with contextlib.suppress(ValueError):  # not JSON: the worker will say so; hash it as is
        canonical = json.dumps(json.loads(canonical), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    return f"replay-{rejected_id}-{digest}"
