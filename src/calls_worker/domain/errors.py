"""One hierarchy of errors; each domain error maps to an outcome code and an HTTP status."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

ErrorCode = Literal["invalid", "not_found", "conflict", "forbidden"]


@dataclass(frozen=True)
class FieldError:
    """What is wrong with one field of a command (``field`` is the camelCase JSON name)."""

    field: str
    reason: str


class CallsWorkerError(Exception):
    """Base of every error this package raises on purpose."""


class DomainError(CallsWorkerError):
    """A command broke a rule of the calls domain; the producer is told why in the outcome."""

    code: ClassVar[ErrorCode]
    status: ClassVar[int]

    def __init__(self, message: str, details: Sequence[FieldError] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.details = tuple(details)


class InvalidCommand(DomainError):
    """The command is malformed or breaks a field rule (422)."""

    code = "invalid"
    status = 422


class NotFound(DomainError):
    """The call, person, organization or pledge case named by the command does not exist (404)."""

    code = "not_found"
    status = 404


class Forbidden(DomainError):
    """The service account may not do this: missing, unknown, disabled, lacking the scope, or
    not authenticated by the certificate that signed the message (403)."""

    code = "forbidden"
    status = 403
    kept: ClassVar[bool] = False
    """Kept among the rejected commands too, for an operator (a claim that may be forged)."""


class UnauthenticatedClaim(Forbidden):
    """The command names a service account whose certificate did not sign the message."""

    kept = True


class Conflict(DomainError):
    """The command cannot apply to the call in its current state (409)."""

    code = "conflict"
    status = 409


class CallAlreadyExists(Conflict):
    """A different command already created a call with this uuid."""


class CallNotRequested(Conflict):
    """The call is in an end state; end states are final."""


class CallManagedExternally(Conflict):
    """The call is managed by an external system and cannot be changed here."""
