"""Handlers (one per command), the expiry sweep, and the unit of work they run in."""
