"""The deployment files, checked by real validators and for what matters in them.

Nothing here runs Docker or Kubernetes (there are none on the test machines): the
Compose file is validated against the Compose specification's schema, every manifest
against the Kubernetes schemas, the alert rules and dashboard queries by promtool.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes" / "base"
BIN = Path(sys.executable).parent
DASHBOARD_METRICS = (
    "calls_worker_commands_total",
    "calls_worker_sweep_lag_seconds",
    "calls_worker_requested_calls",
    "calls_worker_exhausted_calls",
    "calls_worker_rejected_commands_total",
    "calls_worker_sweep_duration_seconds_bucket",
    "calls_worker_queue_messages",
    "calls_worker_last_sweep_timestamp_seconds",
    "calls_worker_redis_used_memory_bytes",
    "calls_worker_command_batch_size_count",
    "calls_worker_command_batch_duration_seconds_bucket",
    "calls_worker_command_batches_failed_total",
)


def tool(name: str) -> str:
    """A validator on this machine; missing fails under CI (which installs it), else skips."""
    found = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        message = f"{name} is not installed"
        if IN_CI:
            pytest.fail(f"{message} (CI is set, so this fails instead of skipping)")
        pytest.skip(message)
    return found


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def test_compose_file_follows_the_compose_specification() -> None:
    result = run(
        tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_exactly_one_beat(compose: dict[str, Any]) -> None:
    beats = [
        name for name, s in compose["services"].items() if s.get("command", [None])[0] == "beat"
    ]
    assert beats == ["beat"]
    assert compose["services"]["beat"].get("deploy", {}).get("replicas", 1) == 1


def test_compose_uses_one_image_for_every_role(compose: dict[str, Any]) -> None:
    roles = {"migrate", "worker", "beat", "flower"}
    images = {compose["services"][role]["image"] for role in roles}
    assert images == {"calls-worker:${CALLS_WORKER_VERSION:-latest}"}
    assert {compose["services"][role]["build"]["dockerfile"] for role in roles} == {
        "deploy/Dockerfile"
    }


def test_compose_flower_requires_authentication(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    assert flower["command"][0] == "flower"
    auth = flower["environment"]["CALLS_WORKER_FLOWER_BASIC_AUTH"]
    assert ":?" in auth  # compose refuses to start without it


def test_compose_checks_health_and_starts_in_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        if service.get("restart") == "no":
            continue  # one-shot: its health is its exit status
        assert service["healthcheck"]["test"], name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for role in ("worker", "beat"):
        depends = services[role]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        # not on a broker: docker-compose.rabbitmq.yml could not take that away
        assert set(depends) == {"migrate"}


def test_compose_redis_keeps_queued_commands(compose: dict[str, Any]) -> None:
    command = compose["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def kubernetes_documents() -> list[Path]:
    return sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in kubernetes_documents()]


@pytest.mark.parametrize("manifest", kubernetes_documents(), ids=lambda p: p.name)
def test_manifest_follows_the_kubernetes_schema(manifest: Path) -> None:
    result = run(tool("kubernetes-validate"), "--strict", "--quiet", str(manifest))
    assert result.returncode == 0, result.stdout + result.stderr


def manifest(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((KUBERNETES / name).read_text())
    return document


def test_beat_is_one_replica_recreated() -> None:
    beat = manifest("beat-deployment.yaml")["spec"]
    assert beat["replicas"] == 1
    assert beat["strategy"]["type"] == "Recreate"


def test_liveness_never_asks_the_broker_or_counts_calls() -> None:
    """A broker away must not restart every worker, and beat's probe reads no table:
    liveness is /healthz (worker/health.py); readiness may ask the broker and database."""
    for name in ("worker-deployment.yaml", "sweeper-deployment.yaml", "beat-deployment.yaml"):
        container = manifest(name)["spec"]["template"]["spec"]["containers"][0]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
    beat = manifest("beat-deployment.yaml")["spec"]["template"]["spec"]["containers"][0]
    assert beat["readinessProbe"]["httpGet"]["path"] == "/healthz"
    worker = manifest("worker-deployment.yaml")["spec"]["template"]["spec"]["containers"][0]
    assert "--database" in " ".join(worker["readinessProbe"]["exec"]["command"])


def test_command_workers_take_only_commands_and_a_sweeper_the_sweeps() -> None:
    def args(name: str) -> list[str]:
        spec = manifest(name)["spec"]["template"]["spec"]["containers"][0]
        found: list[str] = spec["args"]
        return found

    worker, sweeper = args("worker-deployment.yaml"), args("sweeper-deployment.yaml")
    assert worker[worker.index("-Q") + 1] == "calls.commands"
    assert sweeper[sweeper.index("-Q") + 1] == "calls.sweeps"


def test_flower_is_scraped() -> None:
    """Or CallsWorkerTaskFailureRate, on Flower's counters, could never fire."""
    annotations = manifest("flower-deployment.yaml")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "5555"


def test_every_pod_runs_as_non_root_with_the_same_image() -> None:
    images = set()
    for name in ("worker-deployment.yaml", "sweeper-deployment.yaml", "beat-deployment.yaml",
                 "flower-deployment.yaml", "migrate-job.yaml"):  # fmt: skip
        pod = manifest(name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        images |= {c["image"] for c in pod["containers"]}
    assert images == {"calls-worker"}


def test_alert_rules_pass_promtool_and_their_tests() -> None:
    promtool = tool("promtool")
    check = run(promtool, "check", "rules", "deploy/prometheus/alerts.yml")
    assert check.returncode == 0, check.stdout + check.stderr
    tests = run(promtool, "test", "rules", "deploy/prometheus/alerts.test.yml")
    assert tests.returncode == 0, tests.stdout + tests.stderr
    names = {r["alert"] for g in yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())[
        "groups"] for r in g["rules"]}  # fmt: skip
    assert names == {
        "CallsWorkerDown",
        "CallsWorkerNoCommandWorker",
        "CallsWorkerCommandsPaused",
        "CallsWorkerCommandsQueueDeep",
        "CallsWorkerCommandsOldest",
        "CallsWorkerCommandLatencyHigh",
        "CallsWorkerSweepNotRunning",
        "CallsWorkerSweepLagHigh",
        "CallsWorkerRejectedCommandsRising",
        "CallsWorkerRejectedCommandsWaiting",
        "CallsWorkerTaskFailureRate",
        "CallsWorkerDueRecordDrift",
        "CallsWorkerRedisMemoryHigh",
        "CallsWorkerRedisWithoutMaxMemory",
        "CallsWorkerEventsNotPublished",
        "CallsWorkerEventSubscriberBehind",
    }


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    dashboard = json.loads((DEPLOY / "grafana/calls-worker-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{n}", "expr": expr} for n, expr in enumerate(exprs)
    ]}]}  # fmt: skip
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    check = run(tool("promtool"), "check", "rules", str(tmp_path / "dashboard-rules.yml"))
    assert check.returncode == 0, check.stdout + check.stderr
    shown = " ".join(exprs)
    for metric in DASHBOARD_METRICS:
        assert metric in shown


def database_user(url: str) -> str | None:
    from sqlalchemy import make_url

    return make_url(url.replace("${", "").replace("}", "")).username


def test_compose_migrates_as_the_owner_and_runs_as_the_least_privileged_role(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    users = {name: database_user(services[name]["environment"]["CALLS_WORKER_DATABASE_URL"])
             for name in ("migrate", "worker", "beat", "flower")}  # fmt: skip
    assert users == {"migrate": "calls_worker_migrator", "worker": "calls_worker_app",
                     "beat": "calls_worker_app", "flower": "calls_worker_app"}  # fmt: skip
    assert services["migrate"]["command"] == ["migrate", "--grant-to", "calls_worker_app"]
    initdb = [v for v in services["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v]
    assert initdb
    assert (ROOT / initdb[0].split(":")[0]).is_file()


def test_kubernetes_migrates_as_the_owner_and_runs_as_the_least_privileged_role() -> None:
    secrets = {manifest(name)["metadata"]["name"]: manifest(name)["stringData"]
               for name in ("secret.yaml", "migrator-secret.yaml")}  # fmt: skip
    job = manifest("migrate-job.yaml")["spec"]["template"]["spec"]["containers"][0]
    assert job["args"] == ["migrate", "--grant-to", "calls_worker_app"]
    job_secrets = [s["secretRef"]["name"] for s in job["envFrom"] if "secretRef" in s]
    assert job_secrets == ["calls-worker-migrator"]
    assert database_user(secrets["calls-worker-migrator"]["CALLS_WORKER_DATABASE_URL"]) == (
        "calls_worker_migrator")  # fmt: skip
    assert database_user(secrets["calls-worker-secrets"]["CALLS_WORKER_DATABASE_URL"]) == (
        "calls_worker_app")  # fmt: skip
    for name in ("worker-deployment.yaml", "sweeper-deployment.yaml", "beat-deployment.yaml",
                 "flower-deployment.yaml"):
        pod = manifest(name)["spec"]["template"]["spec"]
        refs = {s["secretRef"]["name"] for c in pod["containers"] for s in c.get("envFrom", [])
                if "secretRef" in s}  # fmt: skip
        assert refs == {"calls-worker-secrets"}, name


def test_the_dockerfile_passes_hadolint() -> None:
    linted = run(tool("hadolint"), "deploy/Dockerfile")
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_the_dockerfile_installs_what_the_image_test_installs() -> None:
    """tests/e2e/test_image.py repeats these steps; they must stay the same steps."""
    steps = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines()
             if line.startswith("RUN pip")]  # fmt: skip
    assert steps == [
        "RUN pip wheel --no-cache-dir --no-deps --require-hashes --wheel-dir /wheels"
        " -r requirements.lock",
        "RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .",
        "RUN pip install --no-cache-dir --no-index --no-deps /wheels/*.whl && rm -rf /wheels",
    ]


def test_compose_keeps_outcomes_out_of_the_broker(compose: dict[str, Any]) -> None:
    services = compose["services"]
    worker = services["worker"]["environment"]
    assert "redis-results" in worker["CALLS_WORKER_RESULT_BACKEND_URL"]
    assert "redis-results" not in worker["CALLS_WORKER_BROKER_URL"]
    broker, results = services["redis"]["command"], services["redis-results"]["command"]
    assert broker[broker.index("--maxmemory-policy") + 1] == "noeviction"
    assert "--maxmemory" in broker  # or it grows until the kernel kills it
    assert results[results.index("--maxmemory-policy") + 1] == "volatile-ttl"
    assert "--maxmemory" in results


def test_kubernetes_keeps_outcomes_out_of_the_broker() -> None:
    secret = manifest("secret.yaml")["stringData"]
    assert secret["CALLS_WORKER_RESULT_BACKEND_URL"] != secret["CALLS_WORKER_BROKER_URL"]


def test_compose_and_kubernetes_require_a_service_account(compose: dict[str, Any]) -> None:
    from calls_worker.config import Settings

    assert Settings.model_fields["require_service_account"].default is False  # embedded run
    for name in ("worker", "beat"):
        environment = compose["services"][name]["environment"]
        assert environment["CALLS_WORKER_REQUIRE_SERVICE_ACCOUNT"] == "true", name
    settings = yaml.safe_load((KUBERNETES / "configmap.yaml").read_text())["data"]
    assert settings["CALLS_WORKER_REQUIRE_SERVICE_ACCOUNT"] == "true"


def _merged(base: Any, extra: Any) -> Any:
    """Compose's merge of two files, for the keys these files use: mappings merge key by
    key (the environment too), anything else replaces. (tests/containers runs the files
    with docker-compose itself.)"""
    if isinstance(base, dict) and isinstance(extra, dict):
        return {**base, **{k: _merged(base.get(k), v) for k, v in extra.items()}}
    return extra


@pytest.fixture(scope="module")
def rabbitmq_compose() -> dict[str, Any]:
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    extra = yaml.safe_load((ROOT / "docker-compose.rabbitmq.yml").read_text())
    merged: dict[str, Any] = _merged(base, extra)
    return merged


def test_the_rabbitmq_variant_follows_the_compose_specification(
    rabbitmq_compose: dict[str, Any], tmp_path: Path
) -> None:
    merged = tmp_path / "docker-compose.merged.yml"
    merged.write_text(yaml.safe_dump(rabbitmq_compose))
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(merged))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rabbitmq_variant_needs_no_redis(rabbitmq_compose: dict[str, Any]) -> None:
    services = rabbitmq_compose["services"]
    started = {name for name, s in services.items() if not s.get("profiles")}
    assert not {"redis", "redis-results"} & started
    for role in ("worker", "beat", "flower"):
        service = services[role]
        assert set(service.get("depends_on", {})) <= {"migrate"}, role
        assert service["environment"]["CALLS_WORKER_BROKER_URL"].startswith("amqp://calls:")
        assert service["environment"]["CALLS_WORKER_RESULT_BACKEND_URL"].startswith(
            "postgresql://calls_worker_app:"
        )
    for role in ("worker", "beat"):
        assert services[role]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
    rabbitmq = services["rabbitmq"]
    assert rabbitmq["healthcheck"]["test"]
    assert ":?" in rabbitmq["environment"]["RABBITMQ_DEFAULT_PASS"]  # no default password
    assert rabbitmq["ports"] == ["127.0.0.1:15672:15672"]  # the UI on this host only
