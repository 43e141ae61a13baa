"""``python -m calls_worker`` is the ``calls-worker`` command."""

from calls_worker.entrypoints.cli import main

main()
