"""Flower, the task dashboard, always behind authentication."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from typing import Any

import click

FLOWER_USER = "admin"


def flower_argv(address: str, port: int) -> list[str]:
    return ["flower", f"--address={address}", f"--port={port}"]


def require_auth(basic_auth: str | None) -> str:
    """Flower never starts open: the credentials, or a ClickException saying how to set them."""
    if not basic_auth or ":" not in basic_auth:
        raise click.ClickException(
            "Flower needs authentication: set CALLS_WORKER_FLOWER_BASIC_AUTH=user:password "
            "(or CALLS_WORKER_FLOWER_BASIC_AUTH_FILE)"
        )
    return basic_auth


def start_flower(env: dict[str, str], port: int) -> tuple[subprocess.Popen[bytes], str]:
    """For ``run --flower``: a Flower child on 127.0.0.1 with fresh credentials."""
    credentials = f"{FLOWER_USER}:{secrets.token_urlsafe(12)}"
    child = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "calls_worker", "flower", "--port", str(port)],
        env={**env, "CALLS_WORKER_FLOWER_BASIC_AUTH": credentials},
        start_new_session=True,
    )
    return child, credentials


def run_flower(app: Any, basic_auth: str, address: str, port: int) -> None:
    # Through the environment, not argv, so the password is not in the process list.
    os.environ["FLOWER_BASIC_AUTH"] = basic_auth
    app.start(flower_argv(address, port))
