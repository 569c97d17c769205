"""Local data volumes: qcow2 disks, virtiofs shares, their snapshots, share locks, and the image's mount script."""

from __future__ import annotations

import importlib.util
import json
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from builder import localvolumes as lv
from builder.definition import load_role
from builder.settings import Settings
from tests.conftest import PROJECT

FILES = PROJECT / "images" / "files" / "common"


def _script() -> ModuleType:
    loader = SourceFileLoader("homelab_volumes", str(FILES / "homelab-volumes"))
    spec = importlib.util.spec_from_loader("homelab_volumes", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


INTRANET = lv.volumes_of(load_role(PROJECT, "intranet"))


# --- what the image is told ------------------------------------------------------------------------------------------


def test_volumes_json_lists_the_definitions_volumes_in_order() -> None:
    data = json.loads(lv.volumes_json(load_role(PROJECT, "intranet")))
    assert [v["name"] for v in data["volumes"]] == ["appdata", "postgres", "photos", "media", "backups", "logs"]
    assert data["volumes"][1] == {"name": "postgres", "kind": "disk", "mount": "/srv/postgres", "read_only": False}
    assert data["volumes"][3]["read_only"] is True


@pytest.mark.parametrize("role", ["intranet", "extranet"])
def test_both_roles_bake_and_enable_the_volumes_unit_and_script(role: str) -> None:
    definition = load_role(PROJECT, role)
    dests = {entry["dest"]: entry["src"] for entry in definition["files"]}
    assert dests["/etc/systemd/system/homelab-volumes.service"] == "images/files/common/homelab-volumes.service"
    assert dests["/usr/local/libexec/homelab/volumes"] == "images/files/common/homelab-volumes"
    units = definition["units"]
    assert units.index("homelab-volumes.service") < units.index("homelab-stack.service")


def _unit_lines(name: str) -> list[tuple[str, str]]:
    lines = []
    for line in (FILES / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            lines.append((key, value))
    return lines


def test_volumes_unit_runs_before_docker_and_the_stack_and_is_required_by_the_stack() -> None:
    lines = _unit_lines("homelab-volumes.service")
    assert ("Before", "docker.service homelab-stack.service") in lines
    assert ("RequiredBy", "homelab-stack.service") in lines
    assert ("ExecStart", "/usr/local/libexec/homelab/volumes mount") in lines
    assert ("ExecCondition", "/usr/local/libexec/homelab/volumes serving") in lines
    assert any(key == "After" and "cloud-init" in value for key, value in lines)


def test_stack_waits_for_the_volumes_and_is_skipped_while_isolated() -> None:
    lines = _unit_lines("homelab-stack.service")
    after = next(value for key, value in lines if key == "After")
    assert "homelab-volumes.service" in after.split()
    assert ("ExecCondition", "/usr/local/libexec/homelab/volumes serving") in lines


def test_every_definition_baking_the_common_stack_unit_bakes_the_volumes_script() -> None:
    for role in ("intranet", "extranet"):
        dests = {e["dest"]: e["src"] for e in load_role(PROJECT, role)["files"]}
        if dests.get("/etc/systemd/system/homelab-stack.service") == "images/files/common/homelab-stack.service":
            assert "/usr/local/libexec/homelab/volumes" in dests


# --- the image's mount script (its external commands recorded) -------------------------------------------------------


class FakeSystem:
    """subprocess.run for the mount script: blkid answers from `signatures`, mounts are recorded."""

    def __init__(self, signatures: dict[str, str] | None = None, fail_mount: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.signatures = signatures or {}
        self.fail_mount = fail_mount

    def __call__(self, argv: list[str], **kwargs: Any) -> Any:
        self.calls.append(argv)

        class Result:
            returncode = 0
            stdout = ""
            stderr = ""

        result = Result()
        if argv[0] == "blkid":
            kind = self.signatures.get(argv[-1], "")
            if kind:
                result.stdout = f"DEVNAME={argv[-1]}\nTYPE={kind}\n"
            else:
                result.returncode = 2
        elif argv[0] == "mountpoint":
            result.returncode = 1
        elif argv[0] == "mount" and self.fail_mount:
            result.returncode = 32
            result.stderr = "wrong fs type"
        return result


@pytest.fixture
def script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    module = _script()
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    monkeypatch.setattr(module, "BY_ID", by_id)
    monkeypatch.setattr(module, "DEVICE_WAIT_SECONDS", 0)
    monkeypatch.setattr(module.os, "makedirs", lambda *a, **k: None)
    return module


def _volumes(*entries: tuple[str, str, str, bool]) -> list[dict[str, Any]]:
    return [{"name": n, "kind": k, "mount": m, "read_only": ro} for n, k, m, ro in entries]


def test_script_formats_a_blank_disk_once_and_mounts_shares_by_tag(script: ModuleType,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (script.BY_ID / "virtio-postgres").touch()
    fake = FakeSystem()
    monkeypatch.setattr(script.subprocess, "run", fake)
    script.mount_all(_volumes(("postgres", "disk", "/srv/postgres", False), ("media", "share", "/srv/media", True)),
                     {})
    device = str(script.BY_ID / "virtio-postgres")
    assert ["mkfs.ext4", "-q", "-L", "postgres", device] in fake.calls
    assert ["mount", "-t", "ext4", "-o", "defaults", device, "/srv/postgres"] in fake.calls
    assert ["mount", "-t", "virtiofs", "-o", "ro", "media", "/srv/media"] in fake.calls


def test_script_never_formats_a_disk_that_holds_anything(script: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    device = script.BY_ID / "scsi-0QEMU_QEMU_HARDDISK_postgres"  # Proxmox VE's virtio-scsi with serial=postgres
    device.touch()
    fake = FakeSystem({str(device): "ext4"})
    monkeypatch.setattr(script.subprocess, "run", fake)
    script.mount_all(_volumes(("postgres", "disk", "/srv/postgres", False)), {})
    assert not [c for c in fake.calls if c[0] == "mkfs.ext4"]
    assert ["mount", "-t", "ext4", "-o", "defaults", str(device), "/srv/postgres"] in fake.calls

    other = FakeSystem({str(device): "xfs"})
    monkeypatch.setattr(script.subprocess, "run", other)
    with pytest.raises(RuntimeError, match="holds xfs, not ext4: refusing"):
        script.mount_all(_volumes(("postgres", "disk", "/srv/postgres", False)), {})
    assert not [c for c in other.calls if c[0] in ("mkfs.ext4", "mount")]


def test_script_refuses_a_blank_read_only_disk_and_a_missing_one(script: ModuleType,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (script.BY_ID / "virtio-archive").touch()
    fake = FakeSystem()
    monkeypatch.setattr(script.subprocess, "run", fake)
    with pytest.raises(RuntimeError, match="blank and read-only"):
        script.mount_all(_volumes(("archive", "disk", "/srv/archive", True)), {})
    with pytest.raises(RuntimeError, match="no device with serial postgres"):
        script.mount_all(_volumes(("postgres", "disk", "/srv/postgres", False)), {})
    assert not [c for c in fake.calls if c[0] in ("mkfs.ext4", "mount")]


def test_script_uses_the_proxmox_tag_of_a_share_when_given(script: ModuleType,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSystem()
    monkeypatch.setattr(script.subprocess, "run", fake)
    script.mount_all(_volumes(("photos", "share", "/srv/photos", False)), {"photos": "intranet-photos"})
    assert ["mount", "-t", "virtiofs", "-o", "defaults", "intranet-photos", "/srv/photos"] in fake.calls


def test_script_fails_naming_the_share_it_cannot_mount(script: ModuleType, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    volumes = tmp_path / "volumes.json"
    volumes.write_text(json.dumps({"volumes": _volumes(("logs", "share", "/srv/logs", False))}))
    monkeypatch.setattr(script, "VOLUMES", volumes)
    monkeypatch.setattr(script, "TAGS", tmp_path / "none.json")
    monkeypatch.setattr(script, "EPHEMERAL", tmp_path / "no-ephemeral")
    monkeypatch.setattr(script.subprocess, "run", FakeSystem(fail_mount=True))
    assert script.main(["volumes", "mount"]) == 1
    assert "share volume logs: mount of virtiofs tag logs failed: wrong fs type" in capsys.readouterr().err


def test_script_mounts_nothing_on_an_ephemeral_boot(script: ModuleType, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    volumes = tmp_path / "volumes.json"
    volumes.write_text(json.dumps({"volumes": _volumes(("logs", "share", "/srv/logs", False))}))
    (tmp_path / "ephemeral").touch()
    monkeypatch.setattr(script, "VOLUMES", volumes)
    monkeypatch.setattr(script, "EPHEMERAL", tmp_path / "ephemeral")
    fake = FakeSystem()
    monkeypatch.setattr(script.subprocess, "run", fake)
    assert script.main(["volumes", "mount"]) == 0
    assert fake.calls == []


def test_serving_follows_the_link_of_the_production_nic(script: ModuleType, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Green boots isolated with blue's shares attached: its link down, it mounts nothing and its stack waits."""
    fake = FakeSystem()
    monkeypatch.setattr(script.subprocess, "run", fake)
    monkeypatch.setattr(script, "EPHEMERAL", tmp_path / "no-ephemeral")
    monkeypatch.setattr(script, "LINK_WAIT_SECONDS", 0.3)
    net = tmp_path / "net"
    monkeypatch.setattr(script, "NET", net)
    host = tmp_path / "host.json"
    host.write_text(json.dumps({"role": "intranet", "address": "10.99.0.101/24", "interface": "eth1"}))
    monkeypatch.setattr(script, "HOST", host)
    (net / "eth0").mkdir(parents=True)
    (net / "eth0" / "carrier").write_text("1\n")  # QEMU's user network: not the production NIC here
    (net / "eth1").mkdir()
    (net / "eth1" / "carrier").write_text("0\n")
    share = _volumes(("photos", "share", "/srv/photos", False))
    assert script.serving([]) is True  # nothing to guard
    assert script.serving(share) is False  # link down: isolated
    (net / "eth1" / "carrier").write_text("1\n")
    assert script.serving(share) is True  # the swap brought the link up
    # An interface administratively down cannot tell its carrier (EINVAL): brought up, then read; a missing one
    # (or one that stays unreadable) is not serving.
    host.write_text(json.dumps({"interface": "eth9"}))
    assert script.serving(share) is False
    assert ["ip", "link", "set", "dev", "eth9", "up"] in fake.calls
    host.write_text("{}")  # an older seed: eth0
    assert script.production_interface() == "eth0" and script.serving(share) is True
    (tmp_path / "ephemeral").touch()
    monkeypatch.setattr(script, "EPHEMERAL", tmp_path / "ephemeral")
    host.write_text(json.dumps({"interface": "eth1"}))
    (net / "eth1" / "carrier").write_text("0\n")
    assert script.serving(share) is True  # `homelab boot`: throwaway, nothing to guard


def test_serving_exits_1_with_a_reason_when_isolated(script: ModuleType, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    volumes = tmp_path / "volumes.json"
    volumes.write_text(json.dumps({"volumes": _volumes(("logs", "share", "/srv/logs", False))}))
    monkeypatch.setattr(script, "VOLUMES", volumes)
    monkeypatch.setattr(script, "EPHEMERAL", tmp_path / "no-ephemeral")
    monkeypatch.setattr(script, "HOST", tmp_path / "absent.json")
    monkeypatch.setattr(script, "NET", tmp_path / "net")
    (tmp_path / "net" / "eth0").mkdir(parents=True)
    (tmp_path / "net" / "eth0" / "carrier").write_text("0\n")
    assert script.main(["volumes", "serving"]) == 1
    assert "the link of eth0 is down" in capsys.readouterr().out
    (tmp_path / "net" / "eth0" / "carrier").write_text("1\n")
    assert script.main(["volumes", "serving"]) == 0


# --- QEMU and virtiofsd command lines -----------------------------------------------------------------------------


def test_virtiofsd_argv_is_the_measured_one(tmp_path: Path) -> None:
    assert lv.virtiofsd_argv(tmp_path / "fs-photos.sock", tmp_path / "photos") == [
        "/usr/lib/qemu/virtiofsd", f"--socket-path={tmp_path / 'fs-photos.sock'}",
        "-o", f"source={tmp_path / 'photos'}", "-o", "cache=auto",
    ]


def test_share_argv_shares_guest_memory_and_tags_each_device_with_the_volume_name(tmp_path: Path) -> None:
    argv = lv.share_qemu_argv(2048, [("appdata", tmp_path / "a.sock"), ("photos", tmp_path / "p.sock")])
    assert argv[:4] == ["-object", "memory-backend-memfd,id=mem,size=2048M,share=on", "-numa", "node,memdev=mem"]
    assert argv[4:] == [
        "-chardev", f"socket,id=fs-appdata,path={tmp_path / 'a.sock'}",
        "-device", "vhost-user-fs-pci,chardev=fs-appdata,tag=appdata,id=fs-appdata",
        "-chardev", f"socket,id=fs-photos,path={tmp_path / 'p.sock'}",
        "-device", "vhost-user-fs-pci,chardev=fs-photos,tag=photos,id=fs-photos",
    ]
    assert lv.share_qemu_argv(2048, []) == []


def test_disk_argv_and_hotplug_give_the_same_node_device_and_serial() -> None:
    path = Path("/b/intranet/volumes/postgres,1.qcow2")
    assert lv.disk_qemu_argv("postgres", path, read_only=False) == [
        "-blockdev", "driver=qcow2,node-name=vol-postgres,read-only=off,file.driver=file,"
                     "file.filename=/b/intranet/volumes/postgres,,1.qcow2",
        "-device", "virtio-blk-pci,drive=vol-postgres,serial=postgres,id=vol-postgres",
    ]
    assert lv.hotplug_disk_commands("postgres", path, read_only=True) == [
        ("blockdev-add", {"driver": "qcow2", "node-name": "vol-postgres", "read-only": True,
                          "file": {"driver": "file", "filename": str(path)}}),
        ("device_add", {"driver": "virtio-blk-pci", "id": "vol-postgres", "drive": "vol-postgres",
                        "serial": "postgres"}),
    ]
    assert lv.unplug_disk_commands("postgres") == [("device_del", {"id": "vol-postgres"}),
                                                   ("blockdev-del", {"node-name": "vol-postgres"})]
    assert lv.set_link_command("net1", False) == ("set_link", {"name": "net1", "up": False})


# --- creating, snapshots, restore ---------------------------------------------------------------------------------


class Recorder:
    def __init__(self, info: dict[str, Any] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.info = info or {}

    def __call__(self, argv: list[str], **kwargs: Any) -> Any:
        self.calls.append([str(a) for a in argv])

        class Result:
            stdout = json.dumps(self.info)
            returncode = 0

        return Result()


def test_volumes_are_created_once_and_never_again(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Recorder()
    monkeypatch.setattr(lv, "run", fake)
    made = lv.ensure_volumes(settings, "intranet", INTRANET)
    disk = settings.build_dir / "intranet" / "volumes" / "postgres.qcow2"
    assert fake.calls == [["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "32G"]]
    assert (settings.build_dir / "intranet" / "volumes" / "photos").is_dir()
    assert len(made) == 6
    disk.touch()  # as qemu-img would have
    fake.calls.clear()
    assert lv.ensure_volumes(settings, "intranet", INTRANET) == []
    assert fake.calls == []


def test_disk_snapshot_is_internal_and_old_ones_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snaps = [{"name": f"homelab-s{i}", "date-sec": i, "date-nsec": 0} for i in range(5)]
    fake = Recorder({"snapshots": [*snaps, {"name": "by-hand", "date-sec": 0}]})
    monkeypatch.setattr(lv, "run", fake)
    disk = tmp_path / "postgres.qcow2"
    lv.snapshot_disk(disk, "s4")
    assert fake.calls[:2] == [["qemu-img", "snapshot", "-c", "homelab-s4", str(disk)],
                              ["qemu-img", "info", "-U", "--output=json", str(disk)]]
    deleted = [c[3] for c in fake.calls if c[:3] == ["qemu-img", "snapshot", "-d"]]
    assert deleted == ["homelab-s0", "homelab-s1"]  # three kept, a snapshot made by hand never touched


def test_disk_restore_and_delete_name_the_same_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Recorder()
    monkeypatch.setattr(lv, "run", fake)
    disk = tmp_path / "postgres.qcow2"
    lv.restore_disk(disk, "homelab-20261125-1")
    lv.delete_disk_snapshot(disk, "20261125-1")
    assert fake.calls == [["qemu-img", "snapshot", "-a", "homelab-20261125-1", str(disk)],
                          ["qemu-img", "snapshot", "-d", "homelab-20261125-1", str(disk)]]


# --- share locks ------------------------------------------------------------------------------------------------------


def _alive(*pids: int) -> Any:
    return lambda pid: pid in pids


def test_a_second_running_vm_cannot_hold_a_share(tmp_path: Path) -> None:
    lock = tmp_path / "photos.lock"
    lv.acquire_share(lock, "intranet-a", 100, alive=_alive(100))
    assert lv.share_holders(lock)["holder"] == {"vm": "intranet-a", "pid": 100}
    with pytest.raises(lv.ShareBusyError, match="share photos is held by the running VM intranet-a"):
        lv.acquire_share(lock, "intranet-b", 200, alive=_alive(100, 200))
    lv.acquire_share(lock, "intranet-a", 100, alive=_alive(100))  # the holder again: fine


def test_a_dead_holder_is_stale_and_a_released_share_is_free(tmp_path: Path) -> None:
    lock = tmp_path / "photos.lock"
    lv.acquire_share(lock, "intranet-a", 100, alive=_alive(100))
    lv.acquire_share(lock, "intranet-b", 200, alive=_alive(200))  # 100 died without releasing
    assert lv.share_holders(lock)["holder"]["vm"] == "intranet-b"
    lv.release_share(lock, "intranet-a")  # not the holder: nothing changes
    assert lv.share_holders(lock)["holder"]["vm"] == "intranet-b"
    lv.release_share(lock, "intranet-b")
    lv.acquire_share(lock, "intranet-c", 300, alive=_alive(200, 300))


# --- the seed's markers -------------------------------------------------------------------------------------------


def test_seed_carries_the_ephemeral_marker_only_when_asked() -> None:
    import yaml

    from builder.cloudinit import render_seed
    from builder.site import load_secrets, load_site
    from tests.conftest import FIXTURES

    site = load_site(FIXTURES / "site" / "test-site.yaml")
    secrets = load_secrets(FIXTURES / "site" / "test-secrets.yaml")

    def paths(seed_files: list[dict[str, str]]) -> dict[str, str]:
        data = yaml.safe_load(render_seed(PROJECT, "intranet", site, secrets, extra_files=seed_files).user_data)
        return {entry["path"]: entry["permissions"] for entry in data["write_files"]}

    assert lv.EPHEMERAL_PATH not in paths([])
    assert paths([lv.EPHEMERAL_FILE])[lv.EPHEMERAL_PATH] == "0644"


def test_proxmox_disk_without_serial_is_found_by_its_deploy_key(script: ModuleType,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The second disk of the definition is scsi2 on every VM of the role (builder/deploy.volume_keys).
    device = script.BY_ID / "scsi-0QEMU_QEMU_HARDDISK_drive-scsi2"
    device.touch()
    fake = FakeSystem({str(device): "ext4"})
    monkeypatch.setattr(script.subprocess, "run", fake)
    volumes = _volumes(("media", "share", "/srv/media", True), ("postgres", "disk", "/srv/postgres", False),
                       ("redis", "disk", "/srv/redis", False))
    (script.BY_ID / "virtio-postgres").touch()
    script.mount_all(volumes, {})
    assert ["mount", "-t", "ext4", "-o", "defaults", str(device), "/srv/redis"] in fake.calls


def test_volume_tags_file_only_where_a_tag_is_not_the_name() -> None:
    assert lv.volume_tags_file({"photos": {"volid": None, "mapping": "photos"}}) is None
    entry = lv.volume_tags_file({"photos": {"volid": None, "mapping": "intranet-photos"},
                                 "postgres": {"volid": "local-zfs:vm-101-disk-1", "mapping": None}})
    assert entry is not None and entry["path"] == lv.TAGS_PATH
    assert json.loads(entry["content"]) == {"photos": "intranet-photos"}


def test_pid_alive_sees_this_process_and_not_a_free_pid() -> None:
    import os

    assert lv.pid_alive(os.getpid())
    assert not lv.pid_alive(0)
    assert not lv.pid_alive(2**22 + 1)  # above pid_max's ceiling: never a process
