"""The full soak, as one command; its report becomes docs/reliability.md.

    python -m tests.chaos                       # every fault, 10 iterations of 1,000 commands
    python -m tests.chaos --fault pool-kill --replay 123   # replay the iteration of seed 123

The report is written only by a complete run (every fault, at least 10 iterations of at
least 1,000 commands each) that found nothing wrong; a partial run prints its figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.chaos.report import REPORT, markdown, with_kept_sections
from tests.chaos.soak import FAULTS, dumps, failures, soak

FULL_ITERATIONS = 10
FULL_COMMANDS = 1_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault", action="append", choices=FAULTS)
    parser.add_argument("--iterations", type=int, default=FULL_ITERATIONS)
    parser.add_argument("--commands", type=int, default=FULL_COMMANDS)
    parser.add_argument("--seed", type=int, default=None, help="the soak's seed (default: random)")
    parser.add_argument("--json", type=Path, default=None, help="also write every result here")
    parser.add_argument("--replay", type=int, default=None, metavar="ITERATION_SEED",
                        help="run the one iteration of this seed (as a soak logged it)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the servers' data and the processes' logs in this folder")
    arguments = parser.parse_args()
    faults = tuple(arguments.fault or FAULTS)
    now = dt.datetime.now(dt.UTC)
    seed = arguments.seed if arguments.seed is not None else int(now.timestamp())
    print(f"soak: seed {seed}", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="calls-worker-soak-") as scratch:
        root = arguments.keep or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        results = soak(root, faults, arguments.iterations, arguments.commands, seed,
                       log=lambda line: print(line, flush=True),
                       replay=arguments.replay)  # fmt: skip
    if arguments.json:
        arguments.json.write_text(dumps(results))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()  # fmt: skip
    report = markdown(results, seed=seed, commit=commit, date=now.date().isoformat(),
                      minutes=(time.monotonic() - started) / 60)
    print(report)
    found = failures(results, 1 if arguments.replay is not None else arguments.iterations)
    complete = (set(faults) == set(FAULTS) and arguments.replay is None
                and arguments.iterations >= FULL_ITERATIONS
                and arguments.commands >= FULL_COMMANDS)  # fmt: skip
    if complete and not found:
        REPORT.write_text(with_kept_sections(report))
        print(f"written to {REPORT}")
    for line in found:
        print(f"FAIL {line}", file=sys.stderr)
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
