"""Checks every role's VM must pass (run by `homelab verify <role>`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from testinfra.host import Host

from builder.qmp import guest_agent_ping


def test_debian_13(host: Host) -> None:
    assert host.system_info.distribution == "debian"
    assert host.file("/etc/debian_version").content_string.startswith("13.")


def test_image_is_the_expected_build(host: Host, expected: dict[str, Any]) -> None:
    info = json.loads(host.file("/etc/homelab/image.json").content_string)
    assert info["role"] == expected["role"]
    assert info["version"] == expected["manifest"]["version"]


def test_cloud_init_finished_without_errors(host: Host) -> None:
    status = json.loads(host.check_output("cloud-init status --format json"))
    assert status["status"] == "done", status
    assert status["errors"] == [], status["errors"]
    assert status.get("recoverable_errors", {}) == {}, status["recoverable_errors"]


def test_system_is_running_with_no_failed_unit(host: Host) -> None:
    state = host.run("systemctl is-system-running --wait").stdout.strip()
    failed = host.check_output("systemctl --failed --no-legend --plain")
    assert state == "running", f"{state}; failed units: {failed}"
    assert failed.strip() == ""


def test_logins_are_key_only(host: Host, expected: dict[str, Any]) -> None:
    config = host.check_output("sudo sshd -T")
    settings = dict(line.split(" ", 1) for line in config.splitlines() if " " in line)
    assert settings["passwordauthentication"] == "no"
    assert settings["kbdinteractiveauthentication"] == "no"
    assert settings["permitrootlogin"] == "no"
    # The admin user has no usable password, so a console login cannot be guessed either.
    shadow = host.check_output(f"sudo getent shadow {expected['user']}").split(":")
    assert shadow[1].startswith(("!", "*")), "the admin user has a password"


def test_guest_agent_is_running(host: Host) -> None:
    assert host.service("qemu-guest-agent").is_running


def test_docker_and_compose_v2(host: Host) -> None:
    assert host.service("docker").is_running
    assert host.service("docker").is_enabled
    version = host.check_output("sudo docker compose version --short")
    assert version.split(".")[0] == "2", version


def test_hostname_from_cloud_init(host: Host, expected: dict[str, Any]) -> None:
    assert host.check_output("hostname") == expected["hostname"]


def test_address_from_cloud_init(host: Host, expected: dict[str, Any]) -> None:
    addresses = host.check_output("ip -4 -o addr show")
    assert f"inet {expected['address']} " in addresses


def test_site_nic_is_configured_and_online_without_carrier(host: Host, expected: dict[str, Any]) -> None:
    """A swap's green boots with its link down: its address must not wait for the carrier, nor the boot for it."""
    nic = host.check_output(f"ip -4 -o addr show to {expected['address']}").split()[1]
    config = host.check_output(f"networkctl cat 10-cloud-init-{nic}.network")
    assert "ConfigureWithoutCarrier=yes" in config and "RequiredForOnline=no-carrier" in config, config


def test_baked_files_in_place(host: Host, expected: dict[str, Any]) -> None:
    baked: dict[str, str] = expected["manifest"]["baked_files"]
    assert baked, "the manifest lists no baked files"
    for path, digest in baked.items():
        assert host.file(path).exists, path
        assert host.check_output(f"sudo sha256sum {path}").split()[0] == digest, path


def test_installed_packages_match_the_manifest(host: Host, expected: dict[str, Any]) -> None:
    for name in ("docker.io", "cloud-init", "qemu-guest-agent", "openssh-server"):
        package = host.package(name)
        assert package.is_installed, name
        assert package.version == expected["manifest"]["packages"][name], name


def _is_cloud_kernel(name: str) -> bool:
    return name.endswith("-cloud-amd64")


def test_only_the_chosen_kernel_is_installed(host: Host, expected: dict[str, Any]) -> None:
    want_cloud = expected["manifest"]["kernel"] == "cloud"
    assert _is_cloud_kernel(host.check_output("uname -r")) == want_cloud
    listing = host.check_output("dpkg-query -W -f '${db:Status-Abbrev} ${Package}\\n' 'linux-image-[0-9]*'")
    kernels = [line.split()[1] for line in listing.splitlines() if line.startswith("ii ")]
    assert kernels, "no kernel package installed"
    assert all(_is_cloud_kernel(k) == want_cloud for k in kernels), kernels


def test_guest_agent_answers_the_host(expected: dict[str, Any]) -> None:
    if not expected.get("qga_socket"):
        pytest.skip("no guest agent socket for a remote host (Proxmox checks it through its API)")
    assert guest_agent_ping(Path(expected["qga_socket"])), "qemu-guest-agent did not answer guest-ping"


def test_firewall_is_loaded_with_the_zones(host: Host) -> None:
    # Our table, both chains closed by default, the zones cloud-init wrote loaded; Debian's nftables.service
    # (whose stop flushes every table, Docker's too) is not used.
    for unit in ("homelab-firewall.service", "homelab-firewall-zones.service"):
        assert host.service(unit).is_enabled, unit
        assert host.run(f"systemctl is-active {unit}").stdout.strip() == "active", unit
    assert not host.service("nftables.service").is_enabled
    table = host.check_output("sudo nft list table inet homelab")
    assert table.count("policy drop;") == 2
    assert "elements" in host.check_output("sudo nft list set inet homelab zone_lan")
    # Docker's own tables coexist with ours.
    assert "table ip nat" in host.check_output("sudo nft list tables")


def test_data_volumes_unit_ran_before_the_stack(host: Host) -> None:
    # The definition's volumes are baked; the unit mounted them (a deployed VM) or, on a throwaway `homelab boot`,
    # mounted nothing by the seed's ephemeral marker. Either way it is active, never failed or skipped.
    volumes = json.loads(host.file("/etc/homelab/volumes.json").content_string)["volumes"]
    assert volumes, "the role's definition has volumes"
    assert host.service("homelab-volumes.service").is_enabled
    assert host.run("systemctl is-active homelab-volumes.service").stdout.strip() == "active"
    if not host.file("/etc/homelab/volumes.ephemeral").exists:
        mounts = host.check_output("findmnt -rn -o TARGET")
        assert all(v["mount"] in mounts.split() for v in volumes), mounts


def test_stack_env_is_written_by_its_own_unit(host: Host) -> None:
    """Also when the stack skips itself (a swap's green without data): its config is checked with this file."""
    assert host.service("homelab-stack-env.service").is_enabled
    assert host.file("/run/homelab/stack.env").exists
