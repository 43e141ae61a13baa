"""How long a newcomer waits: from `git clone` to `./dev run` ready (the install included,
then excluded), and from a warm restart to ready.

In a fresh clone of this checkout in a temporary folder, with nothing configured:
1. `./dev run` on the fresh clone: makes .venv, installs, starts the embedded PostgreSQL
   (initdb) and Redis, migrates, starts the workers and beat;
2. stopped, its data folder removed, `./dev run` again: everything but the install;
3. stopped, `./dev run` again on the data it left: the warm restart.
Ready is the command worker's "ready." line: it consumes commands from then on. pip's
cache is whatever this machine has.

    python -m bench.startup
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The command worker's own "ready." line: it consumes from here on.
READY = re.compile(r"commands@\S+ ready\.")


def ready_after(clone: Path, env: dict[str, str], log: Path) -> float:
    started = time.monotonic()
    with log.open("wb") as out:
        run = subprocess.Popen([str(clone / "dev"), "run"], cwd=clone, env=env, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            while not READY.search(log.read_text(errors="replace")):
                if run.poll() is not None:
                    raise SystemExit(f"./dev run exited:\n{log.read_text()}")
                if time.monotonic() - started > 900:
                    raise SystemExit("./dev run not ready in 15 minutes")
                time.sleep(0.05)
            return time.monotonic() - started
        finally:
            run.send_signal(signal.SIGINT)
            run.wait(120)


def main() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLS_WORKER_")}
    with tempfile.TemporaryDirectory(prefix="calls-worker-startup-") as folder:
        clone = Path(folder) / "calls-worker"
        started = time.monotonic()
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        cloned = time.monotonic() - started
        first = ready_after(clone, env, Path(folder) / "first.log")
        shutil.rmtree(clone / ".calls-worker")
        fresh_data = ready_after(clone, env, Path(folder) / "fresh-data.log")
        warm = ready_after(clone, env, Path(folder) / "warm.log")
    print(f"git clone: {cloned:.1f} s")
    print(f"./dev run on the fresh clone, install included: {first:.1f} s")
    print(f"./dev run, install excluded (new data folder): {fresh_data:.1f} s")
    print(f"./dev run, warm restart: {warm:.1f} s")


if __name__ == "__main__":
    main()
