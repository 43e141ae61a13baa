"""Service accounts: who may send which command, for which organization.

A service account represents one organization and holds scopes. It **reaches** a person
whose owning organization is its organization, and a call whose performing organization
is its organization or whose person it reaches. What it does not reach answers exactly as
if it did not exist: existence is not revealed.

Checks, in this order (docs/domain.md): a malformed command is ``invalid`` (parsing);
a missing (when required), unknown or disabled account, or one whose certificate did not
sign the message, is ``forbidden``; a missing scope is ``forbidden``; a person or call out
of reach is ``not_found``; then the domain rules. ``authorize`` is steps 2 and 3, the
``reaches_`` functions step 4; the handlers call them in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal
from uuid import UUID

from calls_worker.domain.errors import FieldError, Forbidden, UnauthenticatedClaim

Scope = Literal[
    "calls:create", "calls:attempt", "calls:complete", "calls:cancel", "calls:expire",
    "calls:read",
]  # fmt: skip
SCOPES: Final[tuple[Scope, ...]] = (
    "calls:create", "calls:attempt", "calls:complete", "calls:cancel", "calls:expire",
    "calls:read",
)  # fmt: skip

# The scope each command (and the listing query) needs, by its kind.
SCOPE_OF: Final[dict[str, Scope]] = {
    "create": "calls:create",
    "add_attempt": "calls:attempt",
    "complete": "calls:complete",
    "cancel": "calls:cancel",
    "expire": "calls:expire",
    "list": "calls:read",
}

ACCOUNT_FIELD: Final = "serviceAccountUuid"


@dataclass(frozen=True)
class ServiceAccount:
    """A service account as the worker keeps it (``worker_service_accounts``)."""

    uuid: UUID
    name: str
    organization_uuid: UUID
    scopes: frozenset[str]
    disabled_at: datetime | None = None
    certificate_sha256: str | None = None
    """The SHA-256 fingerprint (hex) of the certificate it signs with, where messages are signed."""

    @property
    def disabled(self) -> bool:
        return self.disabled_at is not None


@dataclass(frozen=True)
class Caller:
    """Who a message says it comes from, and what proves it."""

    service_account_uuid: UUID | None = None
    """The account the command names (``serviceAccountUuid``); None: it names none."""
    signer_sha256: str | None = None
    """The fingerprint of the certificate that signed the message; None when unsigned."""


@dataclass(frozen=True)
class AccessPolicy:
    """What this deployment demands of callers."""

    require_service_account: bool = False
    """Every command must name its service account (CALLS_WORKER_REQUIRE_SERVICE_ACCOUNT)."""
    signed: bool = False
    """Messages are signed: a named account must be the one whose certificate signed."""


OPEN: Final = AccessPolicy()


def authorize(
    policy: AccessPolicy, caller: Caller, account: ServiceAccount | None, scope: Scope | None
) -> ServiceAccount | None:
    """Steps 2 and 3: the account acting for ``caller`` (``account`` is what the store holds
    under the uuid it names), or None when it names none and none is required. ``scope``:
    the one the action needs (None: none, such as reading one's own outcome).
    Raises Forbidden (UnauthenticatedClaim for a claim the signature does not back)."""
    named = caller.service_account_uuid
    if named is None:
        if policy.require_service_account:
            raise Forbidden(
                "this worker requires every command to name its service account",
                [FieldError(ACCOUNT_FIELD, "missing")],
            )
        return None
    if account is None or account.disabled:
        raise Forbidden(
            f"service account {named} is unknown or disabled",
            [FieldError(ACCOUNT_FIELD, "unknown or disabled")],
        )
    if policy.signed and (
        account.certificate_sha256 is None or caller.signer_sha256 != account.certificate_sha256
    ):
        reason = (
            "has no certificate to sign with"
            if account.certificate_sha256 is None
            else "is not the account whose certificate signed this message"
        )
        raise UnauthenticatedClaim(
            f"service account {named} {reason}", [FieldError(ACCOUNT_FIELD, reason)]
        )
    if scope is not None and scope not in account.scopes:
        raise Forbidden(
            f"service account {named} lacks the scope {scope}",
            [FieldError(ACCOUNT_FIELD, f"lacks the scope {scope}")],
        )
    return account


def may_read_outcome(
    policy: AccessPolicy, caller: Caller, account: ServiceAccount | None, sent_by: UUID | None
) -> bool:
    """Whether ``caller`` may read the outcome of a command sent by the account ``sent_by``
    (None: a command that named none). Only the account that sent it may, once it is who it
    says it is (authorize, no scope needed); where accounts are not required, a caller that
    names none may read any. An outcome one may not read answers as one that does not exist:
    its command ids are often guessable, and it may be another organization's call."""
    try:
        acting = authorize(policy, caller, account, None)
    except Forbidden:
        return False
    return acting is None or acting.uuid == sent_by


def reaches_person(account: ServiceAccount | None, owning_organization_uuid: UUID | None) -> bool:
    """Whether ``account`` reaches a person owned by ``owning_organization_uuid`` (None: no
    such person). Without an account, every person that exists is reached."""
    if owning_organization_uuid is None:
        return False
    return account is None or owning_organization_uuid == account.organization_uuid


def reaches_call(
    account: ServiceAccount | None, organization_uuid: UUID, owning_organization_uuid: UUID | None
) -> bool:
    """Whether ``account`` reaches a call performed by ``organization_uuid`` whose person is
    owned by ``owning_organization_uuid``."""
    if account is None:
        return True
    return account.organization_uuid in (organization_uuid, owning_organization_uuid)
