"""Adapters to the outside world: the database and the queue."""
