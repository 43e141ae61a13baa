"""deploy/Dockerfile, built here on the local Python base: what the image holds."""

from __future__ import annotations

import json

import pytest

from tests.containers.engine import Engine

pytestmark = [pytest.mark.containers, pytest.mark.timeout(900)]

NO_TOOLCHAIN = r"""
for tool in gcc cc c++ g++ make ld; do command -v "$tool"; done
dpkg-query -W -f '${Package}\n' \
  | grep -E -- '-dev$|^gcc-[0-9]+$|^g\+\+|^build-essential$|^binutils' || true
"""


def shell(engine: Engine, image: str, script: str) -> str:
    done = engine.docker("run", "--rm", "--network", "host", "--entrypoint", "sh", image,
                         "-c", script, check=False)  # fmt: skip
    return done.stdout + done.stderr


def test_the_image_runs_as_10001_and_holds_no_toolchain(engine: Engine, image: str) -> None:
    config = json.loads(engine.docker("image", "inspect", "-f", "{{json .Config}}", image).stdout)
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["calls-worker"]
    assert shell(engine, image, "id -u; id -g").split() == ["10001", "10001"]
    assert shell(engine, image, NO_TOOLCHAIN).strip() == ""


def test_the_build_stage_certificate_stays_out_of_the_image(engine: Engine, image: str) -> None:
    """The CA bundle handed to the build stage (PIP_CERT) is in no file, setting or layer."""
    found = shell(engine, image, "find / -xdev -name 'pip-cert*' 2>/dev/null; env | grep -i cert")
    assert found.strip() == ""
    history = engine.docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    assert "pip-cert" not in history
    assert "PIP_CERT" not in history


def test_the_image_writes_nowhere_but_tmp(engine: Engine, image: str) -> None:
    """What a read-only root allows: the roles' only writes are under /tmp (their data folder,
    metrics), and the interpreter writes no bytecode."""
    config = json.loads(engine.docker("image", "inspect", "-f", "{{json .Config}}", image).stdout)
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["CALLS_WORKER_DATA_DIR"].startswith("/tmp/")  # noqa: S108 - the pods' volume
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    denied = engine.docker("run", "--rm", "--read-only", "--entrypoint", "sh", image, "-c",
                           "touch /app/x", check=False)  # fmt: skip
    assert denied.returncode != 0
