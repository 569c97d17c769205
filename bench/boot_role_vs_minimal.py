"""Image size, boot-to-ssh, boot-to-cloud-init-done and boot-to-all-healthy: a role image vs a minimal image
built the same way in the same run (goal for the boot ratios <= 1.5x).

The minimal image is the role's definition stripped to the base (no extra packages, files, compose or
units), built by the same builder; both boot under the same accelerator with the same seed. "All healthy" is
the role's stack up with every healthcheck passing (homelab-stack.service runs `docker compose up --wait`), the
minimal image's is cloud-init done. The VM has no route to any registry: a boot that waited on a pull would
time out, so the role's figure also shows its container images come preloaded.

    .venv/bin/python -m bench.boot_role_vs_minimal [role]
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import yaml

from bench._common import TEST_SECRETS, TEST_SITE, project_copy, report
from builder import localvm
from builder.build import execute_build, latest_build, plan_build
from builder.runner import run
from builder.settings import Settings

STACK_TIMEOUT = 900


def _stack_healthy_after(state: localvm.VMState, has_stack: bool) -> float:
    """Seconds from QEMU's start until the stack is up and healthy (cloud-init done without a stack)."""
    if not has_stack:
        return state.cloud_init_seconds
    started = time.monotonic()
    while time.monotonic() - started < STACK_TIMEOUT:
        probe = run(localvm.ssh_argv(state, "systemctl is-active homelab-stack.service"), check=False, timeout=30)
        if probe.stdout.strip() == "active":
            return round(state.cloud_init_seconds + time.monotonic() - started, 1)
        if probe.stdout.strip() == "failed":
            raise SystemExit(f"{state.role}: homelab-stack.service failed")
        time.sleep(1)
    raise SystemExit(f"{state.role}: the stack was not healthy after {STACK_TIMEOUT} s")


def boot_times(settings: Settings, role: str, has_stack: bool) -> tuple[float, float, float]:
    localvm.stop(settings, role)
    state = localvm.boot(settings, role, localvm.BootOptions(site_path=TEST_SITE, secrets_path=TEST_SECRETS))
    healthy = _stack_healthy_after(state, has_stack)
    localvm.stop(settings, role)
    return state.ssh_seconds, state.cloud_init_seconds, healthy


def image_mib(settings: Settings, role: str) -> float:
    latest = latest_build(settings, role)
    assert latest is not None
    return round(int(latest["size"]) / 2**20, 1)


def main(role: str = "extranet") -> None:
    with project_copy() as settings:
        images = settings.project / "images"
        definition = yaml.safe_load((images / f"{role}.yaml").read_text())
        minimal = {key: definition[key] for key in ("description", "base", "kernel", "vm")}
        # Same role name (the site's host entry and seed are the same); a separate build directory.
        (images / f"{role}.yaml").write_text(yaml.safe_dump(minimal))
        # Its own cache: the minimal build's package layer must not replace the role's real one.
        minimal_settings = replace(settings, cache_dir=settings.build_dir / "minimal-cache")
        execute_build(minimal_settings, plan_build(minimal_settings, role))
        minimal_mib = image_mib(settings, role)
        minimal_ssh, minimal_ci, minimal_healthy = boot_times(settings, role, has_stack=False)
        (images / f"{role}.yaml").write_text(yaml.safe_dump(definition))
        execute_build(settings, plan_build(settings, role))
        role_mib = image_mib(settings, role)
        role_ssh, role_ci, role_healthy = boot_times(settings, role, has_stack=bool(definition.get("compose")))
    report([("minimal: image MiB (qcow2)", minimal_mib), (f"{role}: image MiB (qcow2)", role_mib),
            ("minimal: ssh", minimal_ssh), ("minimal: cloud-init done", minimal_ci),
            ("minimal: all healthy (= cloud-init done)", minimal_healthy),
            (f"{role}: ssh", role_ssh), (f"{role}: cloud-init done", role_ci), (f"{role}: all healthy", role_healthy)],
           "boot-to-ssh role / minimal", role_ssh, minimal_ssh, "<= 1.5x")
    print(f"boot-to-cloud-init-done role / minimal: {role_ci / minimal_ci:.2f}x (goal <= 1.5x)")
    # No goal is set for this one: it is what the role's stack costs on top of the base boot (the stand-ins'
    # images loaded from the image, never pulled: the VM has no route to a registry).
    print(f"boot-to-all-healthy role / minimal: {role_healthy / minimal_healthy:.2f}x")
    print(f"image size role / minimal: {role_mib / minimal_mib:.2f}x")


if __name__ == "__main__":
    main(*sys.argv[1:])
