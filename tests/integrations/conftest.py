"""Framework integration tests: each needs its framework installed (``pip install
"dcp-cloud[test-integrations]"``). Where one is missing its tests skip, except in CI (``CI`` set),
where a missing framework is an error, as for Azurite in tests/conftest.py."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require_framework(name: str) -> ModuleType:
    """``import name``; skip the calling test module when that fails, unless in CI."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(
        name, reason=f"{name} is not installed (pip install 'dcp-cloud[test-integrations]')"
    )
