"""docker-compose.yml, and with docker-compose.rabbitmq.yml, brought up with docker-compose.

The files run as shipped, apart from one override the test writes, for host networking:
every service gets ``network_mode: host`` and the other services' names as hosts of
127.0.0.1, and every listener the files would put on one port moves to a free one (the
two Redis on 6379, worker and beat metrics on 9808, and the host's own servers already on
5432, 6379, 5672 and 4369), with the URLs, commands and healthchecks that name them.
The server images are local stand-ins (tests/containers/images: Debian's packages of the
same servers), chosen through POSTGRES_IMAGE, REDIS_IMAGE and RABBITMQ_IMAGE; the worker's
is the image built from deploy/Dockerfile. Then: the database's init script makes the
roles, migrate completes (the API's tables, organizations to call_attempts, made where
there are none), a command sent from the host gets its outcome, the worker's
metrics and Flower (behind its login) answer, every service turns healthy, and
``docker-compose down`` leaves nothing behind.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from calls_worker.adapters.db.directory import add_service_account
from calls_worker.adapters.db.engine import build_engine
from calls_worker.client import CallsClient
from tests.conftest import unreachable
from tests.containers.engine import IMAGE, ROOT, Engine, base_image
from tests.containers.kubelet import moved_ports, side_by_side
from tests.db_world import Db
from tests.e2e.conftest import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.containers, pytest.mark.timeout(900)]

SCOPES = ["calls:create", "calls:attempt", "calls:complete", "calls:cancel", "calls:expire"]
LISTENERS = ("postgres", "redis", "redis-results", "worker", "beat", "flower",
             "amqp", "amqp-dist", "epmd", "rabbitmq-management")  # fmt: skip


def files(variant: str) -> list[Path]:
    extra = [ROOT / "docker-compose.rabbitmq.yml"] if variant == "rabbitmq" else []
    return [ROOT / "docker-compose.yml", *extra]


def merged(paths: list[Path]) -> dict[str, Any]:
    """The files' services merged as Compose merges them, for the keys rewritten here."""

    def merge(base: Any, extra: Any) -> Any:
        if isinstance(base, dict) and isinstance(extra, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in extra.items()}}
        return extra

    document: dict[str, Any] = {}
    for path in paths:
        document = merge(document, yaml.safe_load(path.read_text()))
    return document


def host_network(document: dict[str, Any], port: dict[str, int]) -> dict[str, Any]:
    """The override: host networking, and every listener moved to its own free port."""
    services = document["services"]
    urls = {"@postgres:5432/": f"@postgres:{port['postgres']}/",
            "//redis:6379/": f"//redis:{port['redis']}/",
            "//redis-results:6379/": f"//redis-results:{port['redis-results']}/",
            "@rabbitmq:5672/": f"@rabbitmq:{port['amqp']}/"}  # fmt: skip
    hosts = [f"{name}:127.0.0.1" for name in services]
    override: dict[str, Any] = {}
    for name, service in services.items():
        environment = {}
        for key, value in (service.get("environment") or {}).items():
            moved = str(value)
            for old, new in urls.items():
                moved = moved.replace(old, new)
            if moved != str(value):
                environment[key] = moved
        out: dict[str, Any] = {"network_mode": "host", "extra_hosts": hosts}
        if name == "postgres":
            environment["PGPORT"] = str(port["postgres"])  # postgres and pg_isready read it
        elif name in ("redis", "redis-results"):
            out["command"] = [*service["command"], "--port", str(port[name])]
            out["healthcheck"] = {"test": ["CMD", "redis-cli", "-p", str(port[name]), "ping"]}
        elif name == "rabbitmq":
            environment.update({
                "RABBITMQ_NODE_PORT": str(port["amqp"]),
                "RABBITMQ_DIST_PORT": str(port["amqp-dist"]),
                "ERL_EPMD_PORT": str(port["epmd"]),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                    f"-rabbitmq_management tcp_config [{{port,{port['rabbitmq-management']}}}]",
            })  # fmt: skip
        elif name in ("worker", "beat"):
            environment["CALLS_WORKER_METRICS_PORT"] = str(port[name])
        elif name == "flower":
            out["command"] = [str(port["flower"]) if arg == "5555" else arg
                              for arg in service["command"]]  # fmt: skip
            test = service["healthcheck"]["test"]
            out["healthcheck"] = {"test": [part.replace(":5555/", f":{port['flower']}/")
                                           for part in test]}  # fmt: skip
        if environment:
            out["environment"] = environment
        override[name] = out
    return {"services": override}


class Compose:
    def __init__(self, engine: Engine, project: str, paths: list[Path], env: dict[str, str]):
        self.engine = engine
        self.argv = ["docker-compose", "-p", project]
        for path in paths:
            self.argv += ["-f", str(path)]
        self.env = {**engine.env, **env}
        self.project = project

    def __call__(self, *args: str, timeout: float = 600) -> str:
        done = subprocess.run([*self.argv, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)  # fmt: skip
        assert done.returncode == 0, f"{args}: {done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        return done.stdout

    def container(self, service: str) -> dict[str, Any]:
        (found,) = self.engine.docker(
            "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.service={service}").stdout.split()  # fmt: skip
        inspected: dict[str, Any] = json.loads(self.engine.docker("inspect", found).stdout)[0]
        return inspected

    def logs(self) -> str:
        done = subprocess.run([*self.argv, "logs", "--no-color", "--tail", "60"], env=self.env,
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        return done.stdout[-12000:]

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        containers = self.engine.docker("ps", "-a", "-q", "--filter", label).stdout.split()
        volumes = self.engine.docker("volume", "ls", "-q", "--filter", label).stdout.split()
        networks = self.engine.docker("network", "ls", "-q", "--filter", label).stdout.split()
        return containers + volumes + networks


def http_get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except OSError as error:
        return 0, str(error)


@pytest.fixture(scope="module")
def compose_tool() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        unreachable("docker-compose is not installed (Debian: docker-compose; .ci/run installs it)")
    return str(found)


@contextmanager
def brought_up(engine: Engine, variant: str, folder: Path) -> Iterator[Settings]:
    """The variant's files up, with the host-networking override; down and gone after."""
    paths = files(variant)
    moved = moved_ports(range(len(LISTENERS)))
    port = {name: moved[i] for i, name in enumerate(LISTENERS)}
    override = folder / "docker-compose.host-network.yml"
    override.write_text(yaml.safe_dump(host_network(merged(paths), port)))
    passwords = {name: secrets.token_urlsafe(12) for name in
                 ("POSTGRES_PASSWORD", "CALLS_WORKER_MIGRATOR_PASSWORD",
                  "CALLS_WORKER_APP_PASSWORD", "RABBITMQ_PASSWORD")}  # fmt: skip
    env = {
        **passwords,
        "FLOWER_BASIC_AUTH": "ops:" + secrets.token_urlsafe(12),
        "CALLS_WORKER_VERSION": IMAGE.split(":")[1],
        "POSTGRES_IMAGE": base_image(engine, "postgres"),
        "REDIS_IMAGE": base_image(engine, "redis"),
        "RABBITMQ_IMAGE": base_image(engine, "rabbitmq"),
    }
    name = f"cwtest{secrets.token_hex(4)}"
    # Compose itself reads the shipped files with the override; what it resolves runs, less
    # the published ports, which docker refuses on the host's network (they are what host
    # networking stands in for).
    resolved = yaml.safe_load(Compose(engine, name, [*paths, override], env)("config"))
    for service in resolved["services"].values():
        service.pop("ports", None)
    (folder / "resolved.yml").write_text(yaml.safe_dump(resolved))
    compose = Compose(engine, name, [folder / "resolved.yml"], env)
    try:
        try:
            compose("up", "-d", "--no-build")
        except AssertionError as failed:
            raise AssertionError(f"{failed}\n{compose.logs()}") from None
        yield Settings(compose, variant, port, env)
    finally:
        try:
            compose("down", "-v", "--remove-orphans")
        finally:
            assert compose.leftovers() == [], "docker-compose down left these"


@dataclass(frozen=True)
class Settings:
    compose: Compose
    variant: str
    port: dict[str, int]
    env: dict[str, str]


def test_compose_comes_up_answers_and_goes_down(
    engine: Engine, image: str, compose_tool: str, tmp_path: Path
) -> None:
    """Redis and RabbitMQ, side by side (most of the time goes on healthcheck timers)."""

    def variant(name: str) -> None:
        (tmp_path / name).mkdir()
        with brought_up(engine, name, tmp_path / name) as settings:
            comes_up_and_answers(settings)

    side_by_side({name: partial(variant, name) for name in ("redis", "rabbitmq")})


def comes_up_and_answers(settings: Settings) -> None:
    compose, port, env = settings.compose, settings.port, settings.env

    def migrated() -> bool:
        state = compose.container("migrate")["State"]
        if state["Status"] == "exited":
            assert state["ExitCode"] == 0, compose.logs()
            return True
        return False

    wait_until(migrated, 240, "migrate to complete")
    superuser = (f"postgresql://postgres:{env['POSTGRES_PASSWORD']}"
                 f"@127.0.0.1:{port['postgres']}/calls")  # fmt: skip
    db = Db(build_engine(superuser, pool_size=1))
    try:
        roles = db.sql("SELECT rolname FROM pg_roles WHERE rolname LIKE 'calls_worker_%'")
        assert sorted(roles.scalars()) == ["calls_worker_app", "calls_worker_migrator"]
        for table in ("organizations", "persons", "pledge_cases", "calls", "call_attempts"):
            assert db.sql("SELECT to_regclass(:t)", t=table).scalar() == table, table
        organization = db.organization(3)
        person = db.person(organization)
        account = add_service_account(db.engine, "compose", organization, SCOPES)
    finally:
        db.engine.dispose()

    brokers = ["rabbitmq"] if settings.variant == "rabbitmq" else ["redis", "redis-results"]
    long_running = ["postgres", "worker", "beat", "flower", *brokers]

    def healthy(names: list[str]) -> bool:
        states = {name: compose.container(name)["State"] for name in names}
        for name, state in states.items():
            assert state["Running"], f"{name} exited: {state}\n{compose.logs()}"
            assert state["Health"]["Status"] != "unhealthy", f"{name}: {state['Health']}"
        return all(state["Health"]["Status"] == "healthy" for state in states.values())

    # as a producer would: once the broker answers (the workers wait for it themselves)
    wait_until(lambda: healthy(brokers), 180, "the broker to turn healthy")
    app = env["CALLS_WORKER_APP_PASSWORD"]
    if settings.variant == "redis":
        broker = f"redis://127.0.0.1:{port['redis']}/0"
        results = f"redis://127.0.0.1:{port['redis-results']}/0"
    else:
        broker = f"amqp://calls:{env['RABBITMQ_PASSWORD']}@127.0.0.1:{port['amqp']}//"
        results = f"postgresql://calls_worker_app:{app}@127.0.0.1:{port['postgres']}/calls"
    with CallsClient(broker, results, service_account=account) as client:
        sent = client.send("create", {"personUuid": str(person),
                                      "organizationUuid": str(organization)})  # fmt: skip
        outcome = sent.outcome(180)
    assert outcome["ok"] is True, outcome

    status, metrics = http_get(f"http://127.0.0.1:{port['worker']}/metrics")
    assert status == 200
    assert "calls_worker_commands_total" in metrics
    flower = f"http://127.0.0.1:{port['flower']}/api/workers?refresh=1"
    user, password = env["FLOWER_BASIC_AUTH"].split(":", 1)
    assert http_get(flower)[0] == 401
    wait_until(lambda: "worker@" in http_get(flower, (user, password))[1], 60,
               "Flower to see the worker")  # fmt: skip

    wait_until(lambda: healthy(long_running), 180, "every service to turn healthy")
