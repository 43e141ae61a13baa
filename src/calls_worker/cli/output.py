"""What the command line prints for machines: JSON, in the API's camelCase everywhere."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import click


def camel_keys(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` with its snake_case keys (a table's columns) in camelCase."""

    def camel(key: str) -> str:
        head, *rest = key.split("_")
        return head + "".join(part.capitalize() for part in rest)

    return {camel(key): value for key, value in row.items()}


def print_json(value: Any) -> None:
    def default(item: Any) -> Any:
        return item.isoformat() if isinstance(item, datetime) else str(item)

    click.echo(json.dumps(value, indent=2, default=default, ensure_ascii=False))
