"""What the cluster tests counted, fault by fault: shown at the end of their run and
written as JSON where ``CALLS_WORKER_CLUSTER_REPORT`` says (docs/reliability.md's rows are
made from it)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any


class Report:
    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def record(self, fault: str, **counted: Any) -> None:
        self.rows[fault].append(counted)
        path = os.environ.get("CALLS_WORKER_CLUSTER_REPORT")
        if path:
            Path(path).write_text(json.dumps(self.rows, indent=1) + "\n")

    def markdown(self) -> str:
        """A row per fault: the counts summed over its iterations, the rest listed."""
        lines = ["| fault | iterations | commands | lost | doubled | also | seeds |",
                 "|---|---|---|---|---|---|---|"]  # fmt: skip
        for fault, runs in self.rows.items():
            total = {key: sum(int(run.get(key, 0)) for run in runs)
                     for key in ("commands", "lost", "doubled")}  # fmt: skip
            also = "; ".join(
                ", ".join(f"{key} {value}" for key, value in run.items()
                          if key not in (*total, "seed"))
                for run in runs)  # fmt: skip
            seeds = ", ".join(str(run["seed"]) for run in runs)
            lines.append(f"| {fault} | {len(runs)} | {total['commands']:,} | {total['lost']}"
                         f" | {total['doubled']} | {also} | {seeds} |")  # fmt: skip
        return "\n".join(lines)
