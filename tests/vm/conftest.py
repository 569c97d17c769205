"""VM tests: real builds and real QEMU boots. One VM per test class, kept on failure when asked.

HOMELAB_KEEP_VM=on_error leaves a failed class's VM running for a look (`ssh -F build/<role>/run/ssh_config
homelab-<role>`), like cloud-init's KEEP_INSTANCE=ON_ERROR; HOMELAB_KEEP_VM=always keeps every VM.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder import localvm
from builder.settings import Settings, load_settings

PROJECT = Path(__file__).resolve().parents[2]
TEST_SITE = PROJECT / "tests" / "fixtures" / "site" / "test-site.yaml"
TEST_SECRETS = PROJECT / "tests" / "fixtures" / "site" / "test-secrets.yaml"
HOMELAB = [sys.executable, "-m", "builder"]


def homelab(*args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """Run the real CLI, as a user would."""
    proc = subprocess.run([*HOMELAB, *args], capture_output=True, text=True, timeout=timeout, cwd=PROJECT,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"homelab {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and item.cls is not None:
        item.cls.failed = True  # read by the class's `booted` fixture


@pytest.fixture(scope="session")
def settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="class")
def booted(request: pytest.FixtureRequest, settings: Settings) -> Iterator[localvm.VMState]:
    """Build the class's role (reusing an up-to-date build) and boot it once for the whole class."""
    role: str = request.cls.role
    request.cls.failed = False
    homelab("build", "image", role)
    localvm.stop(settings, role)
    state = localvm.boot(settings, role, localvm.BootOptions(site_path=TEST_SITE, secrets_path=TEST_SECRETS))
    yield state
    keep = os.environ.get("HOMELAB_KEEP_VM", "")
    if keep == "always" or (keep == "on_error" and request.cls.failed):
        print(f"\nkeeping the {role} VM: ssh -F {state.ssh_config} {state.ssh_alias}")
        return
    localvm.stop(settings, role)
