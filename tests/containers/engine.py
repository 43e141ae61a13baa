"""A container engine of the tests' own, and the images they run.

The tests start their own ``dockerd``: its own socket and exec root under a fresh folder of
``/tmp``, its data root in a cache folder kept between runs (``CALLS_WORKER_CONTAINER_CACHE``,
by default ``~/.cache/calls-worker-containers``) so that base images and built layers are made
once per machine. It starts with ``--bridge=none --iptables=false``: every container runs with
host networking, so all traffic stays on 127.0.0.1 and no container takes another address.
A lock on the cache folder keeps a second test session's engine from sharing the data root.

No image registry is needed. The Debian base is made with ``debootstrap --variant=minbase``
and ``docker import``; the images above it (Python, the server stand-ins) are built from the
Dockerfiles under ``tests/containers/images`` with Debian's packages, over host networking.
"""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGES = Path(__file__).resolve().parent / "images"
SUITE = "bookworm"
MINBASE = "calls-worker-test/debian:bookworm-minbase"
PYTHON = "calls-worker-test/python:3.11-bookworm"
IMAGE = "calls-worker:under-test"
RUN_PARENT = "/tmp"  # noqa: S108 - the engine's sockets: a short path, made by mkdtemp
CGROUP = "calls-worker-tests"  # the cgroup parent of every container the tests' engine runs
# What deploy/Dockerfile COPYs; the build context holds these and nothing else.
CONTEXT = ("deploy/Dockerfile", "deploy/requirements.lock", "pyproject.toml", "README.md", "src")


class EngineUnavailable(Exception):
    """The machine cannot run the tests' container engine (a reason for the operator)."""


def cache_dir() -> Path:
    configured = os.environ.get("CALLS_WORKER_CONTAINER_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "calls-worker-containers"


class Engine:
    """A running dockerd of the tests' own; ``docker`` talks to it and to nothing else."""

    def __init__(self, run_dir: Path, process: subprocess.Popen[bytes]) -> None:
        self.run_dir = run_dir
        self.socket = run_dir / "docker.sock"
        self.process = process
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")},
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_BUILDKIT": "0",  # the classic builder: no frontend image to pull
            "DOCKER_CONFIG": str(run_dir / "client"),
        }

    def docker(self, *args: str, timeout: float = 600, check: bool = True,
               stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        done = subprocess.run(
            ["docker", *args], env=self.env, input=stdin.decode("latin-1") if stdin else None,
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: exit {done.returncode}\n"
                                 f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")  # fmt: skip
        return done

    def has_image(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False).returncode == 0

    def build(self, tag: str, context: bytes, dockerfile: str = "Dockerfile",
              *build_args: str) -> None:  # fmt: skip
        """``docker build`` of a context given as a tar, over host networking."""
        argv = ["build", "-q", "--network", "host", "-f", dockerfile, "-t", tag]
        for assignment in build_args:
            argv += ["--build-arg", assignment]
        done = subprocess.run(
            ["docker", *argv, "-"], env=self.env, input=context, capture_output=True,
            timeout=1200, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise AssertionError(f"docker build {tag}: exit {done.returncode}\n"
                                 f"{done.stdout.decode(errors='replace')[-6000:]}\n"
                                 f"{done.stderr.decode(errors='replace')[-6000:]}")  # fmt: skip

    def remove_all_containers(self) -> None:
        listed = self.docker("ps", "-aq").stdout.split()
        if listed:
            self.docker("rm", "-f", "-v", *listed)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _remove_run_dir(self.run_dir)


def _stop_leftovers() -> None:
    """A killed test session's dockerd, containerd and shims (all named by their run folder
    under /tmp/cw-docker-*), which would hold the data root's databases, and its containers'
    processes (in the cgroup the engine gives them)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        program = Path(argv[0].decode(errors="replace")).name
        mentions = any(b"/tmp/cw-docker-" in arg for arg in argv)
        try:
            contained = f":/{CGROUP}/" in (proc / "cgroup").read_text()
        except OSError:
            continue
        engine = program in ("dockerd", "containerd", "containerd-shim-runc-v2")
        if contained or (mentions and engine):
            with suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
    for folder in Path(RUN_PARENT).glob("cw-docker-*"):
        _remove_run_dir(folder)


def _remove_run_dir(folder: Path) -> None:
    """The engine's run folder, with what dockerd mounted in it (its netns, an nsfs mount,
    stays mounted after dockerd exits)."""
    mounted = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
               if line.split()[1].startswith(f"{folder}/")]  # fmt: skip
    for point in sorted(mounted, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False, timeout=30)
    shutil.rmtree(folder, ignore_errors=True)


def _missing_tools() -> list[str]:
    return [tool for tool in ("dockerd", "docker", "debootstrap") if shutil.which(tool) is None]


@contextmanager
def started_engine() -> Iterator[Engine]:
    """A dockerd of the tests' own for the duration; EngineUnavailable when it cannot run."""
    if sys.platform != "linux" or os.geteuid() != 0:
        raise EngineUnavailable("the tests' dockerd and debootstrap need root on Linux")
    if missing := _missing_tools():
        raise EngineUnavailable(f"not installed: {', '.join(missing)} (Debian: docker.io, "
                                "debootstrap; .ci/run installs them)")  # fmt: skip
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session's engine: wait for it to stop
        _stop_leftovers()
        run_dir = Path(tempfile.mkdtemp(prefix="cw-docker-", dir=RUN_PARENT))
        log = (run_dir / "dockerd.log").open("wb")
        process = subprocess.Popen(
            ["dockerd", "-H", f"unix://{run_dir / 'docker.sock'}",
             "--data-root", str(cache / "data"), "--exec-root", str(run_dir / "exec"),
             "--pidfile", str(run_dir / "dockerd.pid"), "--bridge=none", "--iptables=false",
             "--ip-masq=false", "--userland-proxy=false", "--cgroup-parent", CGROUP],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        engine = Engine(run_dir, process)
        try:
            deadline = time.monotonic() + 60
            while engine.docker("version", check=False, timeout=30).returncode != 0:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    tail = (run_dir / "dockerd.log").read_text(errors="replace")[-3000:]
                    raise EngineUnavailable(f"dockerd did not start:\n{tail}")
                time.sleep(0.2)
            engine.remove_all_containers()  # a killed run's leftovers
            engine.docker("volume", "prune", "-f")
            # Images a rebuild replaced, after a week (younger ones are the build cache).
            engine.docker("image", "prune", "-f", "--filter", "until=168h")
            yield engine
        finally:
            try:
                if process.poll() is None:
                    engine.remove_all_containers()
            finally:
                engine.stop()
                log.close()


def minbase(engine: Engine) -> str:
    """Debian bookworm from debootstrap, imported as an image (made once per cache)."""
    if engine.has_image(MINBASE):
        return MINBASE
    with tempfile.TemporaryDirectory(dir=cache_dir()) as scratch:
        rootfs = Path(scratch) / "rootfs"
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", SUITE, str(rootfs), "http://deb.debian.org/debian"],
            capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise AssertionError(f"debootstrap: {done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        packed = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True,
                                check=True, timeout=300).stdout  # fmt: skip
    imported = subprocess.run(
        ["docker", "import", "-c", 'CMD ["bash"]', "-", MINBASE], env=engine.env,
        input=packed, capture_output=True, timeout=300, check=False,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr.decode(errors="replace")
    return MINBASE


def folder_context(folder: Path, extra: dict[str, bytes] | None = None) -> bytes:
    """A build context of a folder's files (and ``extra`` ones), with no times in it."""
    files = {path.relative_to(folder).as_posix(): path.read_bytes()
             for path in sorted(folder.rglob("*")) if path.is_file()}  # fmt: skip
    return packed({**files, **(extra or {})})


def packed(files: dict[str, bytes]) -> bytes:
    """A tar of these files, mode 0644 (0755 for scripts), owner root, time 0."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def base_image(engine: Engine, name: str) -> str:
    """The image of ``tests/containers/images/<name>``, built on the Debian base."""
    tag = f"calls-worker-test/{name}:{SUITE}"
    engine.build(tag, folder_context(IMAGES / name), "Dockerfile", f"BASE={minbase(engine)}")
    return tag


def pip_cert() -> bytes | None:
    """The CA bundle pip is configured with here (``pip config``), if any."""
    if configured := os.environ.get("PIP_CERT"):
        return Path(configured).read_bytes()
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                            text=True, timeout=60, check=False).stdout  # fmt: skip
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".cert") and value:
            return Path(value.strip("'\"")).read_bytes()
    return None


def project_context() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for name in CONTEXT:
        path = ROOT / name
        if path.is_file():
            files[name] = path.read_bytes()
            continue
        for found in sorted(path.rglob("*")):
            relative = found.relative_to(ROOT)
            skip = {"__pycache__"} & set(relative.parts) or ".egg-info" in found.as_posix()
            if found.is_file() and not skip:
                files[relative.as_posix()] = found.read_bytes()
    return files


def calls_worker_image(engine: Engine) -> str:
    """deploy/Dockerfile built on the local Python base, as a user builds it: classic
    builder, host network, the machine's pip CA bundle handed to the build stage only."""
    files = project_context()
    build_args = [f"PYTHON_IMAGE={base_image(engine, 'python')}"]
    if (cert := pip_cert()) is not None:
        files["deploy/pip-cert.pem"] = cert
        build_args.append("PIP_CERT=/src/pip-cert.pem")
    engine.build(IMAGE, packed(files), "deploy/Dockerfile", *build_args)
    return IMAGE
