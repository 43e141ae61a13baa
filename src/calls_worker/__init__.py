"""calls-worker: consumes call commands and expires calls whose attempts are exhausted."""

__version__ = "0.1.0"
