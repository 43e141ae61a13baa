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
    """Flower never starts open: the credentials, or a ClickException saying how to set them.

    One ``user:password``, both non-empty. No comma anywhere: Flower splits its basic-auth
    setting on commas into several logins, so a password with a comma would let its first
    part (and whatever follows as a second "user:password") in.
    """
    user, colon, password = (basic_auth or "").partition(":")
    if not basic_auth or not colon or not user or not password:
        raise click.ClickException(
            "Flower needs authentication: set CALLS_WORKER_FLOWER_BASIC_AUTH=user:password "
            "with both parts non-empty (or CALLS_WORKER_FLOWER_BASIC_AUTH_FILE)"
        )
    if "," in basic_auth:
        raise click.ClickException(
            "CALLS_WORKER_FLOWER_BASIC_AUTH must not contain a comma: Flower would read it as"
            " several logins"
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
