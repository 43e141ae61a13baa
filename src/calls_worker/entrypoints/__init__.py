"""How the worker is started: the command line, and (later) the Celery app."""
