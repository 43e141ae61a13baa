"""A released migration's SQL never changes: an adopted database holds the functions it
created, and ``migrate --check`` compares with them. The migrations that take pieces of
their text from adapters/db/trigger_sql.py render exactly what they did when released."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

VERSIONS = (Path(__file__).resolve().parents[2]
            / "src/calls_worker/adapters/db/migrations/versions")  # fmt: skip

# sha256 of each SQL text as released (0005 and 0007 before trigger_sql.py existed).
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
}  # fmt: skip


@pytest.mark.parametrize(("module", "name"), sorted(RELEASED), ids=lambda v: str(v))
def test_a_released_migration_renders_as_released(module: str, name: str) -> None:
    spec = importlib.util.spec_from_file_location(f"migration_{module[:4]}", VERSIONS / module)
    assert spec is not None
    assert spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    text: str = getattr(loaded, name)
    assert hashlib.sha256(text.encode()).hexdigest() == RELEASED[(module, name)]
