"""The worker process: the Celery app and its tasks, the consumer that applies commands in
batches (batching.py), the one path of a command (messages.py) and what becomes of one
that fails (settling.py), the outage pause, the call-event relay, message signing,
metrics and logs. Started by ``calls-worker worker`` (cli/)."""
