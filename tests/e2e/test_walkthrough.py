"""The README's first expired call, run as written: its shell blocks, taken from README.md,
executed in the checkout against the embedded servers of a `./dev run` started as the
README says. The README cannot drift from the code without this failing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import Process, free_ports, wait_until

ROOT = Path(__file__).resolve().parents[2]


def walkthrough() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- walkthrough:start")[1].split("<!-- walkthrough:end")[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    assert len(blocks) >= 2, "the walkthrough has lost its shell blocks"
    return "\n".join(blocks)


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
        script = walkthrough()
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        shown = done.stdout.rsplit('"uuid"', 1)[-1]  # the last JSON printed: calls show
        assert '"status": "expired"' in shown, done.stdout
        assert '"attemptCount": 2' in shown
        assert '"maxCallAttempts": 2' in shown
        assert "Traceback" not in done.stderr
        assert run.stop(signal.SIGINT, timeout=90) == 0, run.output()
    finally:
        run.stop(signal.SIGKILL)
