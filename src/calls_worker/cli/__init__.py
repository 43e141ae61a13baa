"""The operator's command line, ``calls-worker`` (main.py): migrate, run (the supervisor
of worker, beat and Flower, on embedded servers when no URL is set), status, the
dead-letters, the directory of service accounts, call events, and the schemas."""
