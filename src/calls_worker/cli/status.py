"""``calls-worker status``: what an operator asks first."""

from __future__ import annotations

from typing import Any

from calls_worker.cli.output import camel_keys
from calls_worker.cli.servers import Servers


def gather_status(servers: Servers) -> dict[str, Any]:
    """Every figure, each with whether it could be read; never raises for a server down."""
    report: dict[str, Any] = {"database": {"ok": False}, "broker": {"ok": False}}
    try:
        from calls_worker.adapters.db.engine import build_engine
        from calls_worker.adapters.db.journal import operational_figures
        from calls_worker.adapters.db.migrate import current_revision, head_revision

        engine = build_engine(servers.database_url(), pool_size=1)
        try:
            revision = current_revision(engine)
            report["database"] = {"ok": True, "revision": revision, "head": head_revision()}
            if revision != head_revision():
                return _with_broker(report, servers)
            figures = operational_figures(engine)
            report["calls"] = {
                "requested": figures.requested,
                "atLimitNotExpired": figures.exhausted,
                "sweepLagSeconds": round(figures.sweep_lag_seconds, 3),
            }
            report["lastSweep"] = (
                None if figures.last_sweep is None else camel_keys(figures.last_sweep)
            )
            report["rejectedCommandsWaiting"] = figures.rejected_waiting
        finally:
            engine.dispose()
    except Exception as error:  # any failure means the same to an operator: not answering
        report["database"] = {"ok": False, "error": str(error).splitlines()[0]}
    return _with_broker(report, servers)


def _with_broker(report: dict[str, Any], servers: Servers) -> dict[str, Any]:
    try:
        from calls_worker.adapters.queue import queue_lengths

        report["queues"] = queue_lengths(servers.broker_url(start=False))
        report["broker"] = {"ok": True}
    except Exception as error:  # as above
        report["broker"] = {"ok": False, "error": str(error).splitlines()[0]}
    return report


def render_status(report: dict[str, Any]) -> str:
    def answer(part: dict[str, Any]) -> str:
        return "ok" if part["ok"] else f"NOT ANSWERING ({part.get('error', '?')})"

    database = report["database"]
    schema = ""
    if database["ok"]:
        schema = f", schema revision {database['revision']}"
        if database["revision"] != database["head"]:
            schema += f" (not {database['head']}: run calls-worker migrate)"
    lines = [
        f"database: {answer(database)}{schema}",
        f"broker:   {answer(report['broker'])}",
    ]
    if "queues" in report:
        queues = ", ".join(f"{name} {length}" for name, length in report["queues"].items())
        lines.append(f"queues:   {queues}")
    if "calls" in report:
        calls = report["calls"]
        last = report["lastSweep"]
        lines += [
            f"calls requested: {calls['requested']}; at their limit, not yet expired: "
            f"{calls['atLimitNotExpired']} (oldest waiting {calls['sweepLagSeconds']:.0f}s)",
            "last sweep: never"
            if last is None
            else f"last sweep: {last['sweptAt'].isoformat()}, expired {last['expired']} in "
            f"{last['durationSeconds']:.3f}s ({last['batches']} batches)",
            f"rejected commands waiting: {report['rejectedCommandsWaiting']}"
            + ("  (calls-worker dead-letters list)" if report["rejectedCommandsWaiting"] else ""),
        ]
    return "\n".join(lines)
