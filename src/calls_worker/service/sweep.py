"""The expiry sweep: expire every exhausted call, a bounded batch per transaction."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from calls_worker.service.unit_of_work import UnitOfWork


@dataclass(frozen=True)
class SweepResult:
    """What one sweep did: calls expired, in how many batches, how many for each owning
    organization (by its uuid), and which."""

    expired: int
    batches: int
    by_organization: dict[str, int] = field(default_factory=dict)
    expired_calls: list[UUID] = field(default_factory=list)


def expire_exhausted_calls(
    uow_factory: Callable[[], UnitOfWork], now: datetime, batch_size: int
) -> SweepResult:
    """Expire every call whose attempts reached its owning organization's maximum.

    Each batch is its own transaction, so no batch holds row locks for longer than it
    takes to expire ``batch_size`` calls, and a batch that fails loses only itself.
    Calls locked by a running command are skipped and left to the next sweep, so two
    sweeps, or a sweep and a command, never wait on each other nor expire a call twice.
    The rule itself lives in domain.policy; its SQL twin in adapters/db/sweep.py (exhausted).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    expired = batches = 0
    by_organization: Counter[str] = Counter()
    expired_calls: list[UUID] = []
    while True:
        with uow_factory() as uow:
            batch = uow.calls.expire_exhausted(now, batch_size)
            uow.commit()
        expired += batch.expired
        batches += 1
        by_organization.update(batch.by_organization)
        expired_calls.extend(batch.expired_calls)
        # A short batch means nothing more is due (or the rest is another sweep's); a full
        # batch that changed nothing means everything left is held by running commands.
        if batch.examined < batch_size or batch.expired + batch.cleared == 0:
            return SweepResult(expired, batches, dict(by_organization), expired_calls)
