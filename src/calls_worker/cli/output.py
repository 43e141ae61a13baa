"""What the command line prints for machines: JSON, in the API's camelCase everywhere."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
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


def output_options(function: Any) -> Any:
    """``--json`` and ``--table`` for a command that lists rows: a table on a terminal,
    JSON otherwise (a pipe, a file), unless one of them is given."""
    function = click.option("--table", "as_table", is_flag=True,
                            help="A table, even when not on a terminal.")(function)  # fmt: skip
    return click.option("--json", "as_json", is_flag=True,
                        help="JSON, even on a terminal.")(function)  # fmt: skip


def wants_json(as_json: bool, as_table: bool) -> bool:
    if as_json and as_table:
        raise click.UsageError("--json and --table: give one")
    return as_json or (not as_table and not sys.stdout.isatty())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return ",".join(map(_cell, value))
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: list[str]) -> str:
    """``rows`` as a table of ``columns``, each as wide as its widest cell."""
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column), *(len(line[n]) for line in cells)])
              for n, column in enumerate(columns)]  # fmt: skip
    lines = [columns, *cells]
    return "\n".join("  ".join(cell.ljust(widths[n]) for n, cell in enumerate(line)).rstrip()
                     for line in lines)  # fmt: skip


def show_rows(rows: Sequence[Mapping[str, Any]], columns: list[str], as_json: bool,
              as_table: bool) -> None:  # fmt: skip
    """The rows as one JSON list, or as a table of ``columns``."""
    if wants_json(as_json, as_table):
        print_json(rows)
    elif rows:
        click.echo(table(rows, columns))
    else:
        click.echo("(none)")


class Group(click.Group):
    """A group whose command list shows each command's first sentence whole (click cuts it
    at the terminal's width, mid-sentence, with "...")."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=10_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
