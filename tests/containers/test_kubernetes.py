"""deploy/kubernetes/base's workloads, run from the built image as the kubelet runs them.

tests/containers/kubelet.py reads each container from the manifests. The test replaces the
Secrets' URLs (placeholders with ``rediss://`` and ``sslmode=require``) with the host's
servers, which speak no TLS: TLS is not tested here. Then, on Redis and on RabbitMQ
(outcomes in PostgreSQL, as secret.yaml describes), the two side by side:
- the migrate Job completes as the schema's owner and grants the app role;
- the worker becomes ready and answers commands sent from the host;
- beat's sweep, run by the sweeper (the command workers take only commands), expires a
  call at its maximum of attempts;
- Flower's /metrics answers without its login, as a scrape asks it;
- every probe runs on its schedule and passes, and none fails its threshold;
- SIGTERM with the pod's grace period shuts each one down warm, in time, with exit 0.
"""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from functools import partial

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from calls_worker.adapters.db.directory import add_service_account
from calls_worker.adapters.db.engine import build_engine
from calls_worker.client import CallsClient
from tests.conftest import create_database, drop_database
from tests.containers.engine import ROOT, Engine
from tests.containers.kubelet import Pod, manifests, moved_ports, side_by_side, workload
from tests.containers.tcp import reachable
from tests.db_world import Db
from tests.e2e.conftest import redis_database, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.containers, pytest.mark.timeout(900)]

ROLES = ("calls_worker_migrator", "calls_worker_app")  # named so by the Job's args
SCOPES = ["calls:create", "calls:attempt", "calls:complete", "calls:cancel", "calls:expire"]
COMMANDS = 20
BROKERS = ("redis", "rabbitmq")


@contextmanager
def cluster_database(server_url: str) -> Iterator[str]:
    """A database of its own, with deploy/sql/roles.sql run in it (as the superuser)."""
    name = f"calls_k8s_{uuid.uuid4().hex[:12]}"
    url = create_database(server_url, name)
    admin = build_engine(url, pool_size=1)
    with admin.begin() as connection:
        sql = (ROOT / "deploy" / "sql" / "roles.sql").read_text()
        for role in ROLES:  # the server's: another cluster here, or a killed run, made them
            exists = connection.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"),
                                        {"r": role}).scalar()  # fmt: skip
            if exists:
                sql = sql.replace(f"CREATE ROLE {role} LOGIN;", "")
        connection.exec_driver_sql(sql)
    admin.dispose()
    try:
        yield url
    finally:
        drop_database(server_url, name)


@pytest.fixture
def databases(postgres_server_url: str) -> Iterator[dict[str, str]]:
    """A database for each broker's cluster, over TCP (tcp.py); the roles dropped after."""
    with ExitStack() as stack:
        yield {kind: stack.enter_context(reachable(stack.enter_context(
                   cluster_database(postgres_server_url))))
               for kind in BROKERS}  # fmt: skip
    server = build_engine(postgres_server_url, pool_size=1)
    with server.begin() as connection:
        for role in ROLES:
            with suppress(DBAPIError), connection.begin_nested():
                # a role still owning objects elsewhere (another run's) stays
                connection.execute(text(f"DROP ROLE IF EXISTS {role}"))
    server.dispose()


def url_for(database_url: str, broker: str, results: str) -> Callable[[str, str], str]:
    """The Secrets' URLs, each replaced by the test server's: the database keeps its role."""

    def replace(key: str, value: str) -> str:
        if key == "CALLS_WORKER_DATABASE_URL":
            role = make_url(value).username
            return make_url(database_url).set(username=role, password=None)\
                .render_as_string(hide_password=False)  # fmt: skip
        if key == "CALLS_WORKER_BROKER_URL":
            return broker
        if key == "CALLS_WORKER_RESULT_BACKEND_URL":
            return results
        raise AssertionError(f"a URL the test does not know: {key}")

    return replace


@pytest.fixture
def pods(engine: Engine) -> Iterator[list[Pod]]:
    started: list[Pod] = []
    yield started
    for pod in started:
        pod._stopping.set()
        engine.docker("rm", "-f", pod.name, check=False)


def test_the_workloads_run_as_the_kubelet_runs_them(
    engine: Engine, image: str, databases: dict[str, str], redis_url: str, rabbitmq_url: str,
    pods: list[Pod],
) -> None:  # fmt: skip
    """The two brokers' clusters side by side (most of the time goes on timers)."""
    results = make_url(databases["rabbitmq"]).set(username="calls_worker_app")\
        .render_as_string(hide_password=False)  # fmt: skip
    servers = {
        "redis": (redis_database(redis_url, 12), redis_database(redis_url, 13)),
        "rabbitmq": (rabbitmq_url, results),
    }
    side_by_side({kind: partial(cluster, engine, image, databases[kind], *servers[kind], pods)
                  for kind in BROKERS})  # fmt: skip


def cluster(engine: Engine, image: str, database: str, broker: str, results: str,
            pods: list[Pod]) -> None:  # fmt: skip
    found = manifests()
    urls = url_for(database, broker, results)

    def pod(kind: str, name: str) -> Pod:
        w = workload(kind, name, found, urls)
        started = Pod(engine, w, image, moved_ports(w.ports.values())).start()
        pods.append(started)
        return started

    migrate = pod("Job", "calls-worker-migrate")
    assert migrate.wait_exit(120) == 0, migrate.logs()
    assert "schema at revision" in migrate.logs()

    db = Db(build_engine(database, pool_size=1))
    try:
        organization = db.organization(3)
        person = db.person(organization)
        exhausted = db.call(person, organization, attempts=3)  # beat's sweep expires it
        account = add_service_account(db.engine, "k8s", organization, SCOPES)

        worker = pod("Deployment", "calls-worker")
        sweeper = pod("Deployment", "calls-worker-sweeper")
        beat = pod("Deployment", "calls-worker-beat")
        flower = pod("Deployment", "calls-worker-flower")
        running = (worker, sweeper, beat, flower)

        def alive() -> bool:
            for p in running:
                state = p.state()
                assert state["Running"], f"{p.name} exited {state}:\n{p.logs()[-5000:]}"
            return True

        def ready() -> bool:
            alive()
            return worker.passed("readiness")

        wait_until(ready, 120, "the worker's readiness probe to pass")
        with CallsClient(broker, results, service_account=account) as client:
            sent = [client.send("create", {"personUuid": str(person),
                                           "organizationUuid": str(organization)})
                    for _ in range(COMMANDS)]  # fmt: skip
            outcomes = [message.outcome(60) for message in sent]
        assert all(outcome["ok"] for outcome in outcomes), outcomes
        created = db.sql("SELECT count(*) FROM calls WHERE uuid <> :u", u=exhausted).scalar()
        assert created == COMMANDS

        # Flower is scraped without its login (CallsWorkerTaskFailureRate reads it there)
        flower_metrics = f"http://127.0.0.1:{flower.moved[flower.workload.ports['http']]}/metrics"
        with urllib.request.urlopen(flower_metrics, timeout=10) as response:
            assert b"flower_events_total" in response.read()

        # the ConfigMap's sweep interval is 60 s: beat's first sweep comes a minute after it,
        # and the sweeper (not the command workers) runs it
        wait_until(lambda: alive() and db.row(exhausted)["status"] == "expired", 150,
                   "beat's sweep to expire the exhausted call")  # fmt: skip

        def every_probe_ran() -> bool:
            alive()
            return all(p.results[probe.kind] for p in running for probe in p.workload.probes)

        wait_until(every_probe_ran, 120, "every probe to run once")
        for p in running:
            for probe in p.workload.probes:
                ran = p.results[probe.kind]
                assert p.passed(probe.kind), f"{p.name} {probe.kind}: {ran}\n{p.logs()[-3000:]}"
                # a liveness probe failing its threshold in a row restarts the container
                assert p.longest_failing_streak(probe.kind) < probe.failure_threshold, ran
    finally:
        db.engine.dispose()

    for p in running:
        code, took = p.terminate()
        logs = p.logs()
        assert code == 0, f"{p.name} exit {code} after {took:.1f}s:\n{logs[-3000:]}"
        assert took < p.workload.grace, f"{p.name} took {took:.1f}s of {p.workload.grace}s"
        assert not p.state()["OOMKilled"]
    assert "warm shutdown" in worker.logs().lower()
    assert "expiredByOrganization" in sweeper.logs()  # a sweep's result line
    assert "expiredByOrganization" not in worker.logs()
