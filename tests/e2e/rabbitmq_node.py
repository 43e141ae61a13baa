"""A throw-away RabbitMQ node of a test's own: its own node name, ports and data folder,
started from the RabbitMQ installed on the machine, stopped and restarted at will without
touching the machine's node."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from tests.conftest import unreachable
from tests.e2e.conftest import free_ports

# The server scripts themselves, not the wrappers in /usr/sbin that switch to the rabbitmq
# user (who could not write the test's folder); found on PATH otherwise.
_LIBEXEC = Path("/usr/lib/rabbitmq/bin")


def _program(name: str) -> str:
    path = _LIBEXEC / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        unreachable(f"{name} is not installed: no RabbitMQ node of the test's own")
        raise AssertionError("unreachable")
    return found


class RabbitNode:
    """``start()``, ``stop()``, ``start()`` again: the same node with the same data."""

    def __init__(self, base: Path, *, conf: str = "", group: int | None = None) -> None:
        """``conf``: more lines of rabbitmq.conf; ``group``: the group id the node runs as
        (the user staying the same), which firewall rules can match its traffic by."""
        self.base = base
        self.group = group
        self.name = f"calls-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_ports(1)
        self.dist_port = free_ports(1)
        for folder in ("mnesia", "log"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n{conf}")
        (base / "enabled_plugins").write_text("[].\n")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.base / "pid"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(self.base / "feature_flags"),
        }

    def ctl(self, *args: str, timeout: float = 90, program: str = "rabbitmqctl") -> str:
        """``rabbitmqctl`` (or ``rabbitmq-queues``, ...) on this node; its output."""
        done = subprocess.run(
            [_program(program), "-n", self.name, *args], env=self._env(),
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)}: {done.stderr or done.stdout}")
        return done.stdout

    def start(self) -> None:
        log = (self.base / "server.out").open("ab")
        self.process = subprocess.Popen(
            [_program("rabbitmq-server")], env=self._env(), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, group=self.group,
        )  # fmt: skip
        log.close()
        # await_startup fails at once while the node has not registered its name yet.
        deadline = time.monotonic() + 120
        while True:
            try:
                self.ctl("await_startup", "--timeout", "90", timeout=100)
                return
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        """A clean stop of the whole node (what a restart of its host does)."""
        if self.process is None:
            return
        try:
            self.ctl("stop")
            self.process.wait(60)
        except Exception:
            self.kill()
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None
