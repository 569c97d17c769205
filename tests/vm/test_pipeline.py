"""Build → boot → verify, for real: diskimage-builder, QEMU, cloud-init, testinfra."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder import localvm
from builder.build import latest_build, sha256_file
from builder.cloudinit import read_seed_iso
from builder.definition import load_role
from builder.firewall import allowed
from builder.settings import Settings
from builder.site import load_site
from tests.netlab import ZoneNetwork

from .conftest import TEST_SECRETS, TEST_SITE, homelab

pytestmark = pytest.mark.vm


class RoleImage:
    role = ""

    def test_build_is_complete_and_unchanged_inputs_keep_the_version(self, booted: localvm.VMState,
                                                                     settings: Settings) -> None:
        manifest = latest_build(settings, self.role)
        assert manifest is not None and manifest["version"] == booted.version
        assert manifest["packages"]["cloud-init"] and manifest["packages"]["docker.io"]
        # Nothing half-written is left beside the outputs.
        assert not list(settings.role_dir(self.role).glob(".build-*"))
        again = homelab("build", "image", self.role)
        assert booted.version in again.stdout and "up to date" in again.stderr

    def test_dry_run_prints_the_exact_command(self, booted: localvm.VMState) -> None:
        out = homelab("build", "image", self.role, "--dry-run").stdout
        assert f"version:  {booted.version}" in out
        assert "disk-image-create -a amd64 -t qcow2" in out
        assert "DIB_RELEASE=trixie" in out

    def test_seed_carries_the_host_identity(self, booted: localvm.VMState) -> None:
        seed = read_seed_iso(Path(booted.run_dir) / "seed.iso")
        assert f"hostname: \"{booted.hostname}\"" in seed.user_data
        assert "10.0.2.15/24" in seed.network_config
        assert load_site(TEST_SITE).host(self.role).address in seed.network_config

    def test_testinfra_suite_passes(self, booted: localvm.VMState) -> None:
        result = homelab("verify", self.role, "--site", str(TEST_SITE), "--secrets", str(TEST_SECRETS),
                         check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "verified" in result.stdout

    def test_firewall_matrix_from_outside(self, booted: localvm.VMState, network: ZoneNetwork,
                                          settings: Settings) -> None:
        # Every (zone, port) pair probed from the test network's namespaces against the site address: open where
        # the matrix (images/<role>.yaml ports, README) allows, dropped everywhere else — container ports too.
        definition = load_role(settings.project, self.role)
        site = load_site(TEST_SITE)
        ports = sorted({e["port"] for e in definition["ports"] if e["proto"] == "tcp"} | {5432, 6379})
        address = site.host(self.role).address.split("/")[0]
        got = network.probe_all(address, ports)
        expected = {(c.zone, port): "open" if allowed(definition, site.zones, c.ip, port) else "filtered"
                    for c in network.clients for port in ports}
        assert got == expected

    def test_the_built_image_is_never_modified_by_booting(self, booted: localvm.VMState) -> None:
        manifest = json.loads(Path(booted.image).with_name(Path(booted.image).stem + ".manifest.json").read_text())
        assert sha256_file(Path(booted.image)) == manifest["sha256"]

    def test_graceful_powerdown(self, booted: localvm.VMState, settings: Settings) -> None:
        # Last in the class: powers the VM down through ACPI and checks QEMU is gone.
        assert localvm.stop(settings, self.role, timeout=90)
        assert localvm.running_vm(settings, self.role) is None


class TestExtranet(RoleImage):
    role = "extranet"


class TestIntranet(RoleImage):
    role = "intranet"
