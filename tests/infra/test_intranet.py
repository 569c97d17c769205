"""VM-INTRANET: its stack runs from baked images, every service healthy, only the users' ports published."""

from __future__ import annotations

from typing import Any

from testinfra.host import Host

from . import stack

SERVICES = {"jellyfin", "immich-server", "database", "valkey", "prometheus", "grafana"}


def test_compose_config_is_valid(host: Host) -> None:
    stack.compose_config_is_valid(host)


def test_images_are_the_locked_ones(host: Host, expected: dict[str, Any]) -> None:
    stack.images_are_the_locked_ones(host, expected)


def test_every_service_is_running_and_healthy(host: Host) -> None:
    stack.every_service_is_running_and_healthy(host, SERVICES)


def test_published_ports_listen(host: Host) -> None:
    stack.listening(host, [8096, 2283, 3000, 9090, 9100])


def test_database_and_cache_are_not_published(host: Host) -> None:
    for port in (5432, 6379):
        assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening, port


def test_env_files_are_private(host: Host) -> None:
    stack.env_files_are_private(host, ["/etc/homelab/immich.env", "/etc/homelab/grafana.env"])


def test_render_gid_is_resolved_on_the_vm(host: Host) -> None:
    gid = host.check_output("getent group render | cut -d: -f3")
    assert host.file("/run/homelab/stack.env").content_string.strip() == f"RENDER_GID={gid}"


def test_gpu_render_node_for_jellyfin(host: Host) -> None:
    # VAAPI needs a DRM render node: no `nomodeset` on the kernel command line, the generic kernel's driver bound
    # (i915 for the passed-through GPU on Proxmox, virtio_gpu under local QEMU), the node owned by group render.
    assert "nomodeset" not in host.file("/proc/cmdline").content_string
    node = host.file("/dev/dri/renderD128")
    assert node.exists and node.group == "render"


def test_nothing_is_pulled(host: Host, expected: dict[str, Any]) -> None:
    stack.nothing_is_pulled(host, expected)


def test_gpu_firmware_for_the_hd_530(host: Host) -> None:
    # Skylake's GuC, HuC and DMC firmware, from Debian 13's non-free-firmware (firmware-intel-graphics).
    assert host.package("firmware-intel-graphics").is_installed
    for name in ("skl_guc_70.1.1.bin", "skl_huc_2.0.0.bin", "skl_dmc_ver1_27.bin"):
        assert host.file(f"/lib/firmware/i915/{name}").is_file, name
    # debian-minimal writes DIB_DEBIAN_COMPONENTS into the image's apt sources as well as bootstrapping from them.
    assert host.run("grep -rqs non-free-firmware /etc/apt/sources.list /etc/apt/sources.list.d/").rc == 0


BACKUP_TIMERS = ["homelab-backup.timer", "homelab-backup-forget.timer", "homelab-backup-check.timer",
                 "homelab-backup-verify.timer"]


def test_backup_timers_are_enabled_and_waiting(host: Host) -> None:
    for timer in BACKUP_TIMERS:
        assert host.service(timer).is_enabled, timer
        assert host.service(timer).is_running, f"{timer} is not active (waiting for its next run)"
    # Each has a next run scheduled (systemctl prints one row per timer; NEXT is "-" when none is).
    listed = host.check_output("systemctl list-timers --all --no-legend --plain " + " ".join(BACKUP_TIMERS))
    assert len(listed.splitlines()) == len(BACKUP_TIMERS), listed
    assert not any(line.startswith("-") for line in listed.splitlines()), listed


def test_backup_script_and_its_settings(host: Host) -> None:
    script = host.file("/usr/local/libexec/homelab/backup")
    assert script.is_file and script.user == "root" and script.mode == 0o755
    assert script.content_string.startswith("#!/usr/bin/python3\n")
    # The restic 0.17+ flag the database backup relies on (a failing dump fails the backup).
    assert "--stdin-from-command" in host.check_output("restic backup --help")
    # The settings arrive at boot, private; the repository password is never baked.
    stack.env_files_are_private(host, ["/etc/homelab/backup.env"])
    assert "RESTIC_REPOSITORY='/srv/backups/restic'" in host.check_output("sudo cat /etc/homelab/backup.env")
    # Without arguments it prints its usage and exits 2: python3 runs it, nothing is started.
    assert host.run("/usr/local/libexec/homelab/backup").rc == 2
