"""The README's first expired call, run as written: its shell blocks, taken from README.md,
executed in the checkout against the embedded servers of a `./dev run` started as the
README says. The README cannot drift from the code without this failing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import Process, free_ports, wait_until

ROOT = Path(__file__).resolve().parents[2]


def walkthrough(marker: str = "walkthrough", least: int = 2) -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"<!-- {marker}:start")[1].split(f"<!-- {marker}:end")[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    assert len(blocks) >= least, f"the {marker} section has lost its shell blocks"
    return "\n".join(blocks)


BETWEEN = "=== accounts ==="


@pytest.mark.slow
def test_the_readme_walkthrough_expires_a_call(tmp_path: Path) -> None:
    # Nothing configured but where the embedded servers keep their data (this test's own,
    # not the checkout's .calls-worker) and free metrics ports.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLS_WORKER_")}
    env |= {"CALLS_WORKER_DATA_DIR": str(tmp_path / "data"),
            "CALLS_WORKER_METRICS_PORT": str(free_ports(3))}  # fmt: skip
    run = Process([], env, tmp_path / "run.log", program=[str(ROOT / "dev"), "run"])
    try:
        wait_until(lambda: "Ctrl-C stops everything" in run.output(), 180, "./dev run")
        script = f"{walkthrough()}\necho '{BETWEEN}'\n{walkthrough('accounts', 1)}"
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        first, accounts = done.stdout.split(BETWEEN)
        shown = first.rsplit('"uuid"', 1)[-1]  # the last JSON printed: calls show
        assert '"status": "expired"' in shown, done.stdout
        assert '"attemptCount": 2' in shown
        assert '"maxCallAttempts": 2' in shown
        assert "Traceback" not in done.stderr
        created, refused = accounts.split("refused, exit status 1")[0].split('"ok": false')
        assert '"ok": true' in created
        assert '"code": "not_found"' in refused  # another charity's donor
        # Not on a terminal, the list is JSON, one call a line (a table on one).
        listed = accounts.split("refused, exit status 1")[1].strip().splitlines()
        assert [json.loads(line)["status"] for line in listed] == ["requested", "expired"]
        assert run.stop(signal.SIGINT, timeout=90) == 0, run.output()
    finally:
        run.stop(signal.SIGKILL)
