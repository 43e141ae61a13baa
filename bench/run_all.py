"""Every benchmark, one after the other, then one table and bench/results.json.

python -m bench.run_all          # the goals' sizes (45 minutes, and bench.brokers' 4)
python -m bench.run_all --quick  # small sizes, to check the benchmarks run
"""

from __future__ import annotations

import argparse

from bench import (
    brokers,
    commands,
    events,
    lag,
    listing,
    memory,
    postgres_cpu,
    relay_lanes,
    sweep,
)
from bench.common import print_table, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    arguments = parser.parse_args()
    if arguments.quick:
        rows = sweep.run(100_000, [100_000])
        rows += commands.run(1_000, rounds=1)
        rows += memory.run(2_000)
        rows += lag.run(interval=2, calls=30, seconds=6)
        rows += listing.run(100_000, inserts=200)
        rows += brokers.run(300, rounds=1)
        rows += events.run(2_000, rounds=1)
        rows += relay_lanes.run(2_000, rounds=1, broker_name="redis")
        rows += postgres_cpu.run(300, batch=32, rounds=1)
    else:
        rows = sweep.run(1_000_000, [1_000_000, 5_000_000])
        rows += commands.run(5_000, rounds=5)
        rows += memory.run(100_000)
        rows += lag.run(interval=5, calls=300, seconds=60)
        rows += listing.run(5_000_000, inserts=2_000)
        rows += brokers.run(3_000, rounds=3)
        rows += events.run(20_000, rounds=3)
        rows += relay_lanes.run(20_000, rounds=3, broker_name="redis")
        rows += postgres_cpu.run(3_000, batch=32, rounds=3)
    print()
    print_table(rows)
    write_results(rows)


if __name__ == "__main__":
    main()
