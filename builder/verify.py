"""`homelab verify <role>`: the role's testinfra suite against the local VM or a given host.

Against the local VM it boots the latest build when none runs and powers it down afterwards. The
suite reads what to expect (role, hostname, address, baked files) from a JSON context file.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import localvm
from .build import latest_build, manifest_of, read_manifest
from .errors import HomelabError, VerifyError
from .progress import Reporter, Silent
from .runner import run, run_streaming
from .settings import Settings
from .site import load_site

SUITES = Path(__file__).resolve().parent.parent / "tests" / "infra"


class SuiteRunner(Protocol):
    """What a deploy provider runs its checks with (tests script it where no VM runs)."""

    def run(self, role: str, context: dict[str, Any], hosts: str, ssh_config: Path | None) -> Path:
        """The role's suite against `hosts` (testinfra's --hosts): the junit report; VerifyError on failures."""

    def reach(self, address: str, ssh_config: Path) -> str | None:
        """Why `address` cannot be logged in to over ssh with `ssh_config`, or None when it can."""


@dataclass
class VerifyOptions:
    site_path: Path
    secrets_path: Path | None = None
    host: str | None = None  # ssh://user@host[:port]; None = the local VM
    keep: bool = False  # leave a VM we booted running afterwards
    accel: str | None = None


def suite_files(role: str) -> list[Path]:
    files = [SUITES / "test_base.py"]
    role_suite = SUITES / f"test_{role}.py"
    if role_suite.exists():
        files.append(role_suite)
    return files


def verify(settings: Settings, role: str, options: VerifyOptions, reporter: Reporter | None = None) -> Path:
    """Run the suite; returns the junit report path, raises VerifyError on failures."""
    reporter = reporter or Silent()
    if options.host:
        return run_suite(settings, role, _remote_context(settings, role, options), options.host, None, reporter)
    state = localvm.running_vm(settings, role)
    booted_here = state is None
    if state is None:
        state = localvm.boot(settings, role, localvm.BootOptions(
            site_path=options.site_path, secrets_path=options.secrets_path, accel=options.accel), reporter)
    try:
        context = _local_context(settings, state)
        return run_suite(settings, role, context, f"paramiko://{state.ssh_alias}", state.ssh_config, reporter)
    finally:
        if booted_here and not options.keep:
            with reporter.step("Power down the VM"):
                localvm.stop(settings, role)


def _local_context(settings: Settings, state: localvm.VMState) -> dict[str, Any]:
    manifest = read_manifest(manifest_of(Path(state.image)), VerifyError)
    return {
        "role": state.role, "hostname": state.hostname, "address": state.address, "user": state.user,
        "manifest": manifest, "qga_socket": str(state.qga_socket),
    }


def _remote_context(settings: Settings, role: str, options: VerifyOptions) -> dict[str, Any]:
    site = load_site(options.site_path)
    host = site.host(role)
    manifest = latest_build(settings, role)
    if manifest is None:
        raise HomelabError(f"no build of {role} to compare the host with: build it first")
    return {
        "role": role, "hostname": host.hostname, "address": host.address, "user": site.admin_user,
        "manifest": manifest, "qga_socket": None,
    }


def pinned_ssh_config(directory: Path, address: str, user: str, host_key: str) -> Path:
    """An ssh_config for `address` that trusts only `host_key` (read from the VM through a channel already trusted,
    its guest agent): a new VM on the production address has a new host key, which the owner's known_hosts would
    refuse as changed, and accepting whatever answers would check nothing. The block is for the address itself, so
    the owner's ~/.ssh/config blocks for it (keys, ProxyJump) apply after ours; its own connection-sharing socket
    keeps ssh from reusing a connection the owner has open to that address (one that checked another key)."""
    fields = host_key.split()
    if len(fields) < 2 or not fields[0].startswith(("ssh-", "ecdsa-")):
        raise VerifyError(f"{address}: {host_key.strip()[:60]!r} is not an ssh public host key")
    known_hosts = directory / "known_hosts"
    known_hosts.write_text(f"{address} {fields[0]} {fields[1]}\n")
    config = directory / "ssh_config"
    config.write_text(
        f"Host {address}\n  User {user}\n  UserKnownHostsFile {known_hosts}\n  GlobalKnownHostsFile /dev/null\n"
        f"  StrictHostKeyChecking yes\n  BatchMode yes\n  ControlPath {directory}/cm-%C\n\n"
        "Match all\nInclude ~/.ssh/config\n")
    return config


def deploy_context(expect: dict[str, Any], qga_socket: Path | None = None) -> dict[str, Any]:
    """The suite's context for a deployed VM, from a deploy plan's `expect` (whose manifest is a path)."""
    manifest = read_manifest(Path(expect["manifest"]), VerifyError)
    return {**expect, "manifest": manifest, "qga_socket": str(qga_socket) if qga_socket else None}


@dataclass
class SshSuite:
    """The real SuiteRunner: pytest with testinfra, and ssh, as processes through the runner."""

    settings: Settings
    reporter: Reporter | None = None

    def run(self, role: str, context: dict[str, Any], hosts: str, ssh_config: Path | None) -> Path:
        return run_suite(self.settings, role, context, hosts, ssh_config, self.reporter or Silent())

    def reach(self, address: str, ssh_config: Path) -> str | None:
        result = run(["ssh", "-F", str(ssh_config), address, "true"], check=False, timeout=60)
        if result.returncode == 0:
            return None
        return f"ssh to {address} failed ({result.returncode}): {' | '.join(result.stderr.strip().splitlines()[-2:])}"


def run_suite(settings: Settings, role: str, context: dict[str, Any], hosts: str, ssh_config: Path | None,
              reporter: Reporter) -> Path:
    out_dir = settings.role_dir(role) / "verify"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=out_dir, delete=False) as handle:
        json.dump(context, handle)
        context_file = Path(handle.name)
    junit = out_dir / "junit.xml"
    argv = [sys.executable, "-m", "pytest", *map(str, suite_files(role)), f"--hosts={hosts}",
            "-p", "no:cacheprovider", "-q", "-rfE", f"--junitxml={junit}", "--rootdir", str(SUITES),
            # Only the suites' own conftest: the unit tests' process guard would refuse testinfra's ssh backend.
            "--confcutdir", str(SUITES)]
    if ssh_config is not None:
        argv.append(f"--ssh-config={ssh_config}")
    env = {**os.environ, "HOMELAB_VERIFY_CONTEXT": str(context_file)}
    try:
        with reporter.step(f"Verify {role} (testinfra)"):
            run_streaming(argv, log_file=out_dir / "verify.log", on_line=reporter.info, env=env,
                          cwd=settings.project)
    except HomelabError as exc:
        raise VerifyError(f"verification of {role} failed (see {out_dir / 'verify.log'})") from exc
    finally:
        context_file.unlink(missing_ok=True)
    return junit

