"""VM tests: real builds and real QEMU boots. One VM per test class, kept on failure when asked.

The stacks' container images come from stand-ins (tests/standins) served under their real names by a
registry on loopback: the session locks a copy of the project against it with the real `homelab lock`,
then builds from that copy. Only the registry differs from an owner's build.

HOMELAB_KEEP_VM=on_error leaves a failed class's VM running for a look (`ssh -F <build>/<role>/run/ssh_config
homelab-<role>`), like cloud-init's KEEP_INSTANCE=ON_ERROR; HOMELAB_KEEP_VM=always keeps every VM.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder import localvm
from builder.build import remove_workdir
from builder.definition import known_roles
from builder.settings import Settings, load_settings
from tests.netlab import ZoneNetwork
from tests.standins.images import build_standins, push_standins
from tests.standins.registry import LoopbackRegistry

PROJECT = Path(__file__).resolve().parents[2]
TEST_SITE = PROJECT / "tests" / "fixtures" / "site" / "test-site.yaml"
TEST_SECRETS = PROJECT / "tests" / "fixtures" / "site" / "test-secrets.yaml"
HOMELAB = [sys.executable, "-m", "builder"]
# Each session builds afresh in its own directory (the package-layer cache in ~/.cache/homelab still applies);
# HOMELAB_VM_TEST_DIR names a directory to keep and reuse instead (an unchanged project then rebuilds nothing).
KEEP_WORK = os.environ.get("HOMELAB_VM_TEST_DIR")


def homelab(*args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """Run the real CLI, as a user would (on the session's project copy, see `stack_project`)."""
    proc = subprocess.run([*HOMELAB, *args], capture_output=True, text=True, timeout=timeout, cwd=PROJECT,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"homelab {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _copy_project(dest: Path) -> None:
    for name in ("images", "compose", "cloudinit"):
        shutil.rmtree(dest / name, ignore_errors=True)
        shutil.copytree(PROJECT / name, dest / name)


@pytest.fixture(scope="session", autouse=True)
def stack_project() -> Iterator[Path]:
    """A copy of the project whose stacks are locked against stand-ins on a loopback registry."""
    work = Path(KEEP_WORK) if KEEP_WORK else Path(tempfile.mkdtemp(prefix="homelab-vm-tests-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    project = work / "project"
    _copy_project(project)
    saved = {k: os.environ.get(k) for k in ("HOMELAB_PROJECT", "HOMELAB_BUILD_DIR", "HOMELAB_REGISTRIES_CONF")}
    with tempfile.TemporaryDirectory(prefix="standins-", dir=work) as tmp, LoopbackRegistry(Path(tmp)) as registry:
        push_standins(registry, build_standins(Path(tmp) / "archives"))
        os.environ.update({"HOMELAB_PROJECT": str(project), "HOMELAB_BUILD_DIR": str(work / "build"),
                           "HOMELAB_REGISTRIES_CONF": str(registry.registries_conf)})
        try:
            for role in known_roles(project):
                homelab("lock", role, "--registries-conf", str(registry.registries_conf))
            yield project
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if not KEEP_WORK and os.environ.get("HOMELAB_KEEP_VM") is None:
                remove_workdir(work)  # refuses while a killed build left mounts (host /dev) under it


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and item.cls is not None:
        item.cls.failed = True  # read by the class's `booted` fixture


@pytest.fixture(scope="session")
def settings(stack_project: Path) -> Settings:
    return load_settings(stack_project)


@pytest.fixture(scope="class")
def network(request: pytest.FixtureRequest) -> Iterator[ZoneNetwork]:
    """The test site's zones as namespaces on a bridge (tests/netlab.py); the DMZ client would take the
    extranet's own address."""
    with ZoneNetwork(without=("dmz",) if request.cls.role == "extranet" else ()) as zones:
        yield zones


@pytest.fixture(scope="class")
def booted(request: pytest.FixtureRequest, settings: Settings, network: ZoneNetwork) -> Iterator[localvm.VMState]:
    """Build the class's role (reusing an up-to-date build) and boot it once for the whole class, on the test
    network with its site address (ssh from this machine goes through QEMU's user network)."""
    role: str = request.cls.role
    request.cls.failed = False
    homelab("build", "image", role)
    localvm.stop(settings, role)
    state = localvm.boot(settings, role, localvm.BootOptions(site_path=TEST_SITE, secrets_path=TEST_SECRETS,
                                                             bridge=network.bridge))
    yield state
    keep = os.environ.get("HOMELAB_KEEP_VM", "")
    if keep == "always" or (keep == "on_error" and request.cls.failed):
        print(f"\nkeeping the {role} VM: ssh -F {state.ssh_config} {state.ssh_alias}")
        return
    localvm.stop(settings, role)
