"""Boot-to-ssh and boot-to-cloud-init-done: a role image vs a minimal image built the same way (goal <= 1.5x).

The minimal image is the role's definition stripped to the base (no extra packages, files, compose or
units), built by the same builder; both boot under the same accelerator with the same seed.

    .venv/bin/python -m bench.boot_role_vs_minimal [role]
"""

from __future__ import annotations

import sys
from dataclasses import replace

import yaml

from bench._common import PROJECT, project_copy, report
from builder import localvm
from builder.build import execute_build, plan_build

TEST_SITE = PROJECT / "tests" / "fixtures" / "site" / "test-site.yaml"
TEST_SECRETS = PROJECT / "tests" / "fixtures" / "site" / "test-secrets.yaml"


def boot_times(settings: localvm.Settings, role: str) -> tuple[float, float]:
    localvm.stop(settings, role)
    state = localvm.boot(settings, role, localvm.BootOptions(site_path=TEST_SITE, secrets_path=TEST_SECRETS))
    localvm.stop(settings, role)
    return state.ssh_seconds, state.cloud_init_seconds


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
        minimal_ssh, minimal_ci = boot_times(settings, role)
        (images / f"{role}.yaml").write_text(yaml.safe_dump(definition))
        execute_build(settings, plan_build(settings, role))
        role_ssh, role_ci = boot_times(settings, role)
    report([("minimal: ssh", minimal_ssh), ("minimal: cloud-init done", minimal_ci),
            (f"{role}: ssh", role_ssh), (f"{role}: cloud-init done", role_ci)],
           "boot-to-ssh role / minimal", role_ssh, minimal_ssh, "<= 1.5x")
    print(f"boot-to-cloud-init-done role / minimal: {role_ci / minimal_ci:.2f}x (goal <= 1.5x)")


if __name__ == "__main__":
    main(*sys.argv[1:])
