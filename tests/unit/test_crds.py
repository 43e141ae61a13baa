"""deploy/kubernetes/overlays/prometheus-operator: its custom resources against their CRDs.

The PodMonitors and PrometheusRule of the Prometheus Operator and KEDA's ScaledObject are
validated with the schemas of their CRDs, as generated into the npm packages of
kubernetes-models (pinned below, installed once into a cache folder with Node's npm):
types, required fields and enumerations. A field the CRD does not know passes (as a cluster
prunes it): that is not checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import unreachable

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "deploy" / "kubernetes" / "overlays" / "prometheus-operator"
VALIDATOR = ROOT / "tests" / "crds" / "validate.mjs"
PACKAGES = ("@kubernetes-models/keda@2.0.0", "@kubernetes-models/prometheus-operator@6.0.0")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """The pinned packages, installed once per machine."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        unreachable("Node.js and npm are needed to validate the custom resources")
    configured = os.environ.get("CALLS_WORKER_NPM_CACHE")
    folder = Path(configured) if configured else Path.home() / ".cache" / "calls-worker-crds"
    marker = folder / ("installed-" + "-".join(p.replace("/", "_") for p in PACKAGES))
    if not marker.exists():
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["npm", "install", "--prefix", str(folder), "--no-audit", "--no-fund",
             "--loglevel", "error", *PACKAGES],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            unreachable(f"npm install failed: {done.stderr[-2000:]}")
        marker.touch()
    return folder / "node_modules"


def validate(node_modules: Path, documents: list[dict[str, Any]]) -> list[str | None]:
    # Node resolves the packages from the script's folder upwards: run a copy beside them.
    script = node_modules.parent / "validate.mjs"
    script.write_text(VALIDATOR.read_text())
    done = subprocess.run(["node", str(script)], input=json.dumps(documents), capture_output=True,
                          text=True, timeout=120, check=True)  # fmt: skip
    verdicts: list[str | None] = json.loads(done.stdout)
    return verdicts


def overlay_documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    documents = []
    for resource in kustomization["resources"]:
        if not resource.startswith("../"):
            documents += [d for d in yaml.safe_load_all((OVERLAY / resource).read_text()) if d]
    return documents


def test_the_overlay_is_valid_against_the_crds(node_modules: Path) -> None:
    documents = overlay_documents()
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == ["PodMonitor", "PodMonitor", "PrometheusRule", "ScaledObject"]
    verdicts = validate(node_modules, documents)
    assert verdicts == [None] * len(documents), list(zip(kinds, verdicts, strict=True))


def test_a_wrong_resource_is_caught(node_modules: Path) -> None:
    """The checker: each document broken in a way its CRD's schema forbids."""
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in overlay_documents()}
    scaled = by_kind[("ScaledObject", "calls-worker")]
    monitor = by_kind[("PodMonitor", "calls-worker")]
    broken_scaled = {**scaled, "spec": {**scaled["spec"], "minReplicaCount": "two"}}
    no_target = {**scaled, "spec": {k: v for k, v in scaled["spec"].items()
                                    if k != "scaleTargetRef"}}  # fmt: skip
    broken_monitor = {**monitor, "spec": {**monitor["spec"], "podMetricsEndpoints": "metrics"}}
    verdicts = validate(node_modules, [broken_scaled, no_target, broken_monitor])
    assert all(verdict is not None for verdict in verdicts), verdicts


def test_the_prometheus_rule_holds_the_alert_rules() -> None:
    rule = yaml.safe_load((OVERLAY / "prometheusrule.yaml").read_text())
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"], "copy alerts.yml's groups into it"


def test_keda_scales_the_command_workers_on_their_queue() -> None:
    (scaled,) = (d for d in overlay_documents() if d["kind"] == "ScaledObject")
    worker = yaml.safe_load((ROOT / "deploy/kubernetes/base/worker-deployment.yaml").read_text())
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert 'calls_worker_queue_messages{queue="calls.commands"}' in trigger["metadata"]["query"]


def test_the_monitors_name_the_jobs_the_alerts_use() -> None:
    monitors = {d["metadata"]["name"]: d for d in overlay_documents() if d["kind"] == "PodMonitor"}
    jobs = {name: next(r["replacement"] for r in m["spec"]["podMetricsEndpoints"][0]["relabelings"]
                       if r["targetLabel"] == "job") for name, m in monitors.items()}  # fmt: skip
    assert jobs == {"calls-worker": "calls-worker", "calls-worker-flower": "calls-worker-flower"}
    alerts = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    assert 'job="calls-worker"' in alerts
    assert 'job="calls-worker-flower"' in alerts
