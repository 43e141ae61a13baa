"""Run a workload of deploy/kubernetes/base in a container, as the kubelet would run it.

Everything is read from the manifests: the container's command and args; its environment
(``envFrom`` ConfigMaps and Secrets in order, then ``env``); the pod's and the container's
``securityContext`` (user and group, read-only root, capabilities dropped, no privilege
escalation); each ``emptyDir`` as a tmpfs of its ``sizeLimit``; the memory limit; the
probes, run on their own schedule (initial delay, period, timeout, failure threshold); and
the termination grace period.

Two things differ from a cluster, both because every container here shares the host's
network (the tests' dockerd has no bridge):
- a pod's container ports are moved to free ports of the host, in the settings and
  arguments that name them, since two pods would otherwise both listen on 9808;
- an httpGet probe asks 127.0.0.1 on the moved port, where the kubelet asks the pod's IP.
The caller replaces the Secret's URLs with the test's servers (``urls``); nothing else.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.containers.engine import Engine

BASE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "base"
DEFAULT_GRACE = 30  # the pod spec's default terminationGracePeriodSeconds
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}


_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def moved_ports(ports: Iterable[int]) -> dict[int, int]:
    """A free port of the host for each container port; none handed out twice in a run."""
    moved: dict[int, int] = {}
    with _ports_lock:
        for port in sorted(set(ports)):
            while True:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    free = int(probe.getsockname()[1])
                if free not in _handed_out:
                    break
            _handed_out.add(free)
            moved[port] = free
    return moved


def side_by_side(runs: Mapping[str, Callable[[], None]]) -> None:
    """Each run in a thread of its own; the first failure (by name) is raised."""
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {name: pool.submit(run) for name, run in runs.items()}
    for name, future in futures.items():
        if (error := future.exception()) is not None:
            raise AssertionError(f"{name}: {error}") from error


def manifests(folder: Path = BASE) -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of the kustomization's resources, by (kind, name)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for document in yaml.safe_load_all((folder / resource).read_text()):
            if document:
                found[(document["kind"], document["metadata"]["name"])] = document
    return found


def quantity(text: str) -> int:
    """A Kubernetes quantity in bytes ("256Mi")."""
    number, unit = re.fullmatch(r"(\d+)([KMG]i?)?", text).groups()  # type: ignore[union-attr]
    return int(number) * UNITS.get(unit or "", 1)


@dataclass(frozen=True)
class Probe:
    kind: str  # liveness, readiness
    exec: list[str] | None
    http: tuple[str, int] | None  # path, container port
    initial_delay: int
    period: int
    timeout: int
    failure_threshold: int

    @classmethod
    def of(cls, kind: str, spec: Mapping[str, Any], ports: Mapping[str, int]) -> Probe:
        http = None
        if "httpGet" in spec:
            port = spec["httpGet"]["port"]
            http = (spec["httpGet"]["path"], ports[port] if isinstance(port, str) else port)
        return cls(
            kind=kind, exec=spec.get("exec", {}).get("command"), http=http,
            initial_delay=spec.get("initialDelaySeconds", 0),
            period=spec.get("periodSeconds", 10), timeout=spec.get("timeoutSeconds", 1),
            failure_threshold=spec.get("failureThreshold", 3),
        )  # fmt: skip


@dataclass(frozen=True)
class Workload:
    name: str  # the Deployment's or Job's
    command: list[str] | None
    args: list[str]
    env: dict[str, str]
    user: str
    read_only: bool
    dropped: list[str]
    no_new_privileges: bool
    seccomp: str | None
    tmpfs: dict[str, int]  # mount path: size in bytes
    memory: int | None
    ports: dict[str, int]  # name: container port
    probes: list[Probe]
    grace: int


def workload(kind: str, name: str, found: Mapping[tuple[str, str], dict[str, Any]],
             urls: Callable[[str, str], str]) -> Workload:  # fmt: skip
    """The one container of a Deployment's or Job's pod, with its settings resolved.

    ``urls(key, value)``: the value to use for a setting whose value is a URL (the Secret's
    placeholders name servers that do not exist here)."""
    pod = found[(kind, name)]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(found[("ConfigMap", source["configMapRef"]["name"])]["data"])
        else:
            env.update(found[("Secret", source["secretRef"]["name"])]["stringData"])
    env.update({item["name"]: item["value"] for item in container.get("env", [])})
    env = {key: urls(key, value) if "://" in value else value for key, value in env.items()}
    pod_security = pod.get("securityContext", {})
    security = {**pod_security, **container.get("securityContext", {})}
    assert security.get("runAsNonRoot"), "the kubelet refuses a root user"
    assert security.get("runAsUser"), "a numeric user, so that runAsNonRoot can be checked"
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    tmpfs = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        assert "emptyDir" in volume, f"only emptyDir volumes run here: {volume}"
        tmpfs[mount["mountPath"]] = quantity(volume["emptyDir"].get("sizeLimit", "64Mi"))
    ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
    probes = [Probe.of(kind_, container[f"{kind_}Probe"], ports)
              for kind_ in ("liveness", "readiness", "startup")
              if f"{kind_}Probe" in container]  # fmt: skip
    limit = container.get("resources", {}).get("limits", {}).get("memory")
    return Workload(
        name=name, command=container.get("command"), args=list(container.get("args", [])),
        env=env, user=f"{security['runAsUser']}:{security.get('runAsGroup', 0)}",
        read_only=bool(security.get("readOnlyRootFilesystem")),
        dropped=list(security.get("capabilities", {}).get("drop", [])),
        no_new_privileges=security.get("allowPrivilegeEscalation") is False,
        seccomp=security.get("seccompProfile", {}).get("type"),
        tmpfs=tmpfs, memory=quantity(limit) if limit else None, ports=ports, probes=probes,
        grace=pod.get("terminationGracePeriodSeconds", DEFAULT_GRACE),
    )  # fmt: skip


@dataclass
class ProbeResult:
    at: float  # seconds since the pod started
    ok: bool
    output: str


@dataclass
class Pod:
    """One workload's container, running, with its probes on their schedule."""

    engine: Engine
    workload: Workload
    image: str
    moved: dict[int, int]  # container port: host port
    name: str = ""
    started: float = 0.0
    results: dict[str, list[ProbeResult]] = field(default_factory=dict)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Pod:
        w = self.workload
        self.name = f"{w.name}-{secrets.token_hex(3)}"
        argv = ["run", "-d", "--name", self.name, "--hostname", self.name, "--network", "host",
                "--user", w.user]  # fmt: skip
        if w.read_only:
            argv.append("--read-only")
        argv += [f"--cap-drop={cap}" for cap in w.dropped]
        if w.no_new_privileges:
            argv += ["--security-opt", "no-new-privileges"]
        assert w.seccomp in (None, "RuntimeDefault")  # docker's default profile
        for path, size in w.tmpfs.items():
            argv += ["--tmpfs", f"{path}:rw,nosuid,nodev,size={size},mode=1777"]
        if w.memory:
            argv += ["--memory", str(w.memory), "--memory-swap", str(w.memory)]
        for key, value in self.env().items():
            argv += ["-e", f"{key}={value}"]
        if w.command:
            argv += ["--entrypoint", w.command[0]]
        argv += [self.image, *(w.command or [])[1:], *self.moved_args(w.args)]
        self.engine.docker(*argv)
        self.started = time.monotonic()
        for probe in w.probes:
            self.results[probe.kind] = []
            thread = threading.Thread(target=self._probe, args=(probe,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def env(self) -> dict[str, str]:
        return {key: str(self.moved.get(int(value), value)) if value.isdigit() else value
                for key, value in self.workload.env.items()}  # fmt: skip

    def moved_args(self, args: list[str]) -> list[str]:
        return [str(self.moved.get(int(arg), arg)) if arg.isdigit() else arg for arg in args]

    def _probe(self, probe: Probe) -> None:
        next_at = probe.initial_delay
        while not self._stopping.wait(max(0.0, self.started + next_at - time.monotonic())):
            ok, output = self.probe_once(probe)
            self.results[probe.kind].append(
                ProbeResult(time.monotonic() - self.started, ok, output))  # fmt: skip
            next_at += probe.period

    def probe_once(self, probe: Probe) -> tuple[bool, str]:
        if probe.exec:
            try:
                done = self.engine.docker("exec", self.name, *probe.exec,
                                          timeout=probe.timeout, check=False)  # fmt: skip
            except subprocess.TimeoutExpired:
                return False, f"timed out after {probe.timeout}s"
            return done.returncode == 0, (done.stdout + done.stderr)[-2000:]
        assert probe.http is not None
        path, port = probe.http
        url = f"http://127.0.0.1:{self.moved.get(port, port)}{path}"
        try:
            with urllib.request.urlopen(url, timeout=probe.timeout) as response:
                return 200 <= response.status < 400, f"{response.status}"
        except Exception as error:  # any failure is a failed probe
            return False, f"{type(error).__name__}: {error}"

    def passed(self, kind: str) -> bool:
        """At least one probe of the kind ran, and the last one passed."""
        results = self.results.get(kind, [])
        return bool(results) and results[-1].ok

    def longest_failing_streak(self, kind: str) -> int:
        longest = streak = 0
        for result in self.results.get(kind, []):
            streak = 0 if result.ok else streak + 1
            longest = max(longest, streak)
        return longest

    def state(self) -> dict[str, Any]:
        inspected = self.engine.docker("inspect", "-f", "{{json .State}}", self.name)
        state: dict[str, Any] = json.loads(inspected.stdout)
        return state

    def logs(self) -> str:
        done = self.engine.docker("logs", self.name, check=False)
        return done.stdout + done.stderr

    def wait_exit(self, timeout: float) -> int:
        done = self.engine.docker("wait", self.name, timeout=timeout)
        return int(done.stdout.strip())

    def terminate(self) -> tuple[int, float]:
        """SIGTERM, and SIGKILL after the grace period, as the kubelet stops a pod.
        The exit code and the seconds it took."""
        self._stopping.set()
        began = time.monotonic()
        self.engine.docker("stop", "-t", str(self.workload.grace), self.name,
                           timeout=self.workload.grace + 60)  # fmt: skip
        took = time.monotonic() - began
        return int(self.state()["ExitCode"]), took
