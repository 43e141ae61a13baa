"""The kinds of value the command line takes, each refused with a reason and exit status 2
(click's usage error) before anything is started or sent: a bad argument never reaches
the database, the broker or Celery to come back as a traceback."""

from __future__ import annotations

import importlib.util
import ipaddress
import math
from typing import Any

import click


class Text(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.3 on
    """Printable text that is not blank (a name, a hostname, a role)."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = str(value)
        if not text.strip():
            self.fail("must not be empty", param, ctx)
        if not text.isprintable():
            self.fail(f"{text!r} holds characters that cannot be printed", param, ctx)
        return text


class Seconds(click.FloatRange):
    """A duration in seconds, above zero and finite."""

    name = "seconds"

    def __init__(self) -> None:
        super().__init__(min=0, min_open=True)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return seconds


class Queues(click.ParamType):  # type: ignore[type-arg]
    """A comma-separated list of queue names, none of them empty: the worker's own
    (``calls.commands``, ``calls.sweeps``), or others a benchmark or a test routes to."""

    name = "queues"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        names = [name.strip() for name in str(value).split(",")]
        if not all(names) or not all(name.isprintable() for name in names):
            self.fail(f"{value!r}: give queue names separated by commas, none of them empty"
                      " (calls.commands, calls.sweeps)", param, ctx)  # fmt: skip
        return ",".join(names)


class Module(Text):
    """A Python module that can be imported here (Celery's --include)."""

    name = "module"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        module = super().convert(value, param, ctx)
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            self.fail(f"no module named {module!r} can be imported here", param, ctx)
        return module


class Address(Text):
    """An IP address to listen on."""

    name = "address"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        address = super().convert(value, param, ctx)
        if address == "localhost":
            return address
        try:
            ipaddress.ip_address(address)
        except ValueError:
            self.fail(f"{address!r} is not an IP address (e.g. 127.0.0.1 or 0.0.0.0)", param, ctx)
        return address


class Certificate(click.File):
    """A PEM certificate file; the certificate's bytes."""

    name = "pem-file"

    def __init__(self) -> None:
        super().__init__("rb")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from calls_worker.worker.signer import certificate_sha256

        with super().convert(value, param, ctx) as file:
            pem = file.read()
        try:
            certificate_sha256(pem)
        except ValueError:
            self.fail(f"{value} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                      param, ctx)  # fmt: skip
        return pem


TEXT = Text()
SECONDS = Seconds()
PORT = click.IntRange(1, 65535)
COUNT = click.IntRange(min=0)
POSITIVE = click.IntRange(min=1)


class CommandId(Text):
    """A command id the worker accepts: printable, at most COMMAND_ID_LIMIT characters."""

    name = "command-id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from calls_worker.wire import COMMAND_ID_LIMIT

        command_id = super().convert(value, param, ctx)
        if len(command_id) > COMMAND_ID_LIMIT:
            self.fail(f"is {len(command_id)} characters; a command id has at most"
                      f" {COMMAND_ID_LIMIT}", param, ctx)  # fmt: skip
        return command_id


class Kind(click.Choice):  # type: ignore[type-arg]
    """A command kind, as the wire format spells it (add-attempt) or as the schema files and
    the Python client do (add_attempt)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return super().convert(str(value).replace("_", "-"), param, ctx)
