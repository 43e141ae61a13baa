"""``python -m calls_worker`` is the ``calls-worker`` command."""

from calls_worker.cli.main import main

main()
