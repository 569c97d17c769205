"""testinfra suites for booted VMs. `homelab verify` writes what to expect to HOMELAB_VERIFY_CONTEXT."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest


@pytest.fixture(scope="session")
def expected() -> dict[str, Any]:
    path = os.environ.get("HOMELAB_VERIFY_CONTEXT")
    if not path:
        pytest.fail("HOMELAB_VERIFY_CONTEXT is not set: run these suites through `homelab verify <role>`")
    with open(path, encoding="utf-8") as handle:
        context: dict[str, Any] = json.load(handle)
    return context
