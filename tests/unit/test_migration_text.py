"""A released migration's SQL never changes: an adopted database holds the functions it
created, and ``migrate --check`` compares with them. The migrations that take pieces of
their text from adapters/db/trigger_sql.py render exactly what they did when released."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import pytest

VERSIONS = (Path(__file__).resolve().parents[2]
            / "src/calls_worker/adapters/db/migrations/versions")  # fmt: skip

# sha256 of each SQL text as released (before trigger_sql.py existed).
RELEASED = {
    ("0005_hardened_triggers.py", "UPGRADE"):
        "c984400f3f0dafab239a82ec50696f352ec428833ef162bbc4e116f18eb0cb2c",
    ("0005_hardened_triggers.py", "DOWNGRADE"):
        "eae538f30c84d1733e141ebf35b399230e8b3c504f64437be217c3dbe2d7736c",
    ("0007_service_accounts.py", "TABLES"):
        "8a313ca8833bbf97caea8a00c26bd7320683681e3cbdfa8fc3e60e76da482bd0",
    ("0007_service_accounts.py", "FUNCTIONS"):
        "bd2a208c0f3554df60ba2cfab777d1ed6d9e2bc3dd3f7bbd0e4c32c7a812276e",
    ("0007_service_accounts.py", "TRIGGERS"):
        "2eb65ac54d802b4316a6c59fe7ed631ea60a511318f585ea6b4a17f685102d1f",
    ("0007_service_accounts.py", "DOWNGRADE"):
        "f8145efa5974f98237f2808dc9fed781f30f40fb399d7a2a6bc90cb987f8a351",
    ("0008_outcome_rotation.py", "FUNCTIONS"):
        "c7034b172aaf1b5ef833a60df82a35452aa0c25de5d4bdb9dfe5ab1aeef43a2a",
    ("0008_outcome_rotation.py", "DOWNGRADE"):
        "b8e3b10158f153c48b75e544186b1e9846207b442f171c8d39d8cc0d028fba71",
}  # fmt: skip
# 0011 renders its function with arguments: (signature, keep) for the upgrade and downgrade.
RELEASED_ROTATIONS = {
    ("", "turn.keep"): "190dfb1d1d1fd9e606d419a681b2fd9537ef4aea2e9c0ab418e835eda77b1fc9",
    ("keep interval", "keep"): "94fba7bd30e1ce5e7ba7606d5c83e4f13bf6c1236dfa61cbab7542d17a124a89",
}


def _load(module: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"migration_{module[:4]}", VERSIONS / module)
    assert spec is not None
    assert spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize(("module", "name"), sorted(RELEASED), ids=lambda v: str(v))
def test_a_released_migration_renders_as_released(module: str, name: str) -> None:
    text: str = getattr(_load(module), name)
    assert _sha(text) == RELEASED[(module, name)]


@pytest.mark.parametrize("arguments", sorted(RELEASED_ROTATIONS), ids=lambda v: str(v))
def test_0011_renders_its_rotation_as_released(arguments: tuple[str, str]) -> None:
    rotation = _load("0011_owned_retention.py").rotation
    assert _sha(rotation(*arguments)) == RELEASED_ROTATIONS[arguments]
