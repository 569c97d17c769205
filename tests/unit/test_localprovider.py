"""LocalProvider: the deploy engine's Provider on this machine (QEMU), with every process and QMP call recorded."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from builder import localprovider as lp
from builder import localvolumes as lv
from builder.definition import load_role
from builder.deploy import VmSpec, volume_keys
from builder.errors import DeployError
from builder.settings import Settings
from builder.site import load_site
from tests.conftest import FIXTURES, PROJECT

ROLE = "intranet"
SITE = FIXTURES / "site" / "test-site.yaml"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """The real project's definitions (the intranet's six volumes), build and cache dirs of the test's own."""
    project = tmp_path / "project"
    shutil.copytree(PROJECT / "images", project / "images")
    shutil.copytree(PROJECT / "compose", project / "compose")
    shutil.copytree(PROJECT / "cloudinit", project / "cloudinit")
    return Settings(project=project, build_dir=tmp_path / "build", cache_dir=tmp_path / "cache",
                    mirror="http://mirror.test/debian", security_mirror="http://mirror.test/debian-security")


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[Any], **kwargs: Any) -> Any:
        self.calls.append([str(a) for a in argv])

        class Result:
            stdout = json.dumps({"snapshots": []})
            returncode = 0

        return Result()


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    fake = Recorder()
    monkeypatch.setattr(lp, "run", fake)
    monkeypatch.setattr(lv, "run", fake)
    return fake


@pytest.fixture
def provider(settings: Settings, recorder: Recorder) -> lp.LocalProvider:
    return lp.LocalProvider(settings, ROLE, bridge="br-test")


def _spec(settings: Settings, vmid: int, drives: dict[str, str] | None = None, link_down: bool = False) -> VmSpec:
    image = settings.build_dir / ROLE / "intranet-v1.qcow2"
    seed = settings.build_dir / ROLE / "seed.iso"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(b"image")
    seed.write_bytes(b"seed")
    return VmSpec(vmid, "intranet", 3, 12288, str(image), str(seed), "br-test", ("homelab", "role-intranet", "green"),
                  link_down, drives or {})


ALL_DRIVES = {"scsi1": "local:postgres", "virtiofs0": "appdata", "virtiofs1": "photos", "virtiofs2": "media",
              "virtiofs3": "backups", "virtiofs4": "logs"}


# --- the site and the seed -------------------------------------------------------------------------------------------


def test_site_for_a_local_deploy_names_every_volume_locally(settings: Settings) -> None:
    site = lp.site_for_local_deploy(settings, load_site(SITE), ROLE, "br-test")
    assert site.host(ROLE).vmid == 100
    assert site.proxmox()["bridge"] == "br-test"
    keys = volume_keys(ROLE, load_role(settings.project, ROLE)["volumes"], site)
    assert [(v.name, v.key, v.volid or v.mapping) for v in keys] == [
        ("appdata", "virtiofs0", "appdata"), ("postgres", "scsi1", "local:postgres"), ("photos", "virtiofs1", "photos"),
        ("media", "virtiofs2", "media"), ("backups", "virtiofs3", "backups"), ("logs", "virtiofs4", "logs")]
    assert load_site(SITE).host(ROLE).volumes == {}  # the site itself is unchanged
    assert lp.site_for_local_deploy(settings, load_site(SITE), ROLE, None).proxmox()["bridge"] == "none"


def test_local_journal_is_not_the_proxmox_one(settings: Settings) -> None:
    assert lp.journal_path(settings, ROLE) == settings.build_dir / ROLE / "local" / "deploy-journal.json"


# --- the guest agent ------------------------------------------------------------------------------------------------


def test_guest_exec_request_and_results() -> None:
    assert lp.guest_exec_request(("systemctl", "stop", "homelab-stack.service")) == {
        "execute": "guest-exec",
        "arguments": {"path": "systemctl", "arg": ["stop", "homelab-stack.service"], "capture-output": True}}
    assert lp.guest_exec_result({"exited": False}) is None
    done = lp.guest_exec_result({"exited": True, "exitcode": 3, "out-data": base64.b64encode(b"inactive\n").decode()})
    assert done is not None and (done.exitcode, done.out, done.err) == (3, "inactive\n", "")
    killed = lp.guest_exec_result({"exited": True, "signal": 9})
    assert killed is not None and killed.exitcode == 137


# --- create, hand-over, tags, destroy -------------------------------------------------------------------------------


def test_create_makes_an_overlay_and_a_pve_shaped_config(settings: Settings, provider: lp.LocalProvider,
                                                         recorder: Recorder) -> None:
    spec = _spec(settings, 101, link_down=True)
    provider.create_vm(spec)
    vmdir = settings.build_dir / ROLE / "vm-101"
    assert ["qemu-img", "create", "-q", "-f", "qcow2", "-b", spec.image_volid, "-F", "qcow2",
            str(vmdir / "overlay.qcow2")] in recorder.calls
    assert (vmdir / "seed.iso").read_bytes() == b"seed"
    vm = provider.vm(101)
    assert vm is not None and vm.status == "stopped"
    assert vm.config["net0"] == f"virtio={lp.bridge_mac(ROLE)},bridge=br-test,link_down=1"
    assert vm.tags == {"homelab", "role-intranet", "green"}
    assert provider.owned_volumes(101) == [str(vmdir / "overlay.qcow2")]
    # the data volumes were made outside the VM's directory
    assert (settings.build_dir / ROLE / "volumes" / "photos").is_dir()
    assert [c for c in recorder.calls if c[-2].endswith("postgres.qcow2")]
    with pytest.raises(DeployError, match="exists already"):
        provider.create_vm(spec)


def test_volumes_move_between_stopped_vms_as_config_edits(settings: Settings, provider: lp.LocalProvider) -> None:
    provider.create_vm(_spec(settings, 100, ALL_DRIVES))
    provider.create_vm(_spec(settings, 101))
    assert provider.move_disk(100, "scsi1", 101) == {"volid": "local:postgres", "hotplugged": False}
    with pytest.raises(DeployError, match="still attached to local VM 100"):
        provider.attach_share(101, "virtiofs1", "photos")
    provider.detach(100, "virtiofs1")
    provider.attach_share(101, "virtiofs1", "photos")
    blue, green = provider.vm(100), provider.vm(101)
    assert blue is not None and green is not None
    assert "scsi1" not in blue.config and green.config["scsi1"] == "local:postgres"
    assert green.config["virtiofs1"] == "photos" and "virtiofs1" not in blue.config
    with pytest.raises(DeployError, match="not a share volume"):
        provider.attach_share(101, "virtiofs9", "postgres")


def test_nothing_moves_in_or_out_of_a_running_vm_but_a_disk_is_hot_plugged(
        settings: Settings, provider: lp.LocalProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    provider.create_vm(_spec(settings, 100, ALL_DRIVES))
    provider.create_vm(_spec(settings, 101))
    running = lp.VMState(role=ROLE, pid=os.getpid(), accel="tcg", image="", version="", ssh_port=2222,
                         user="homelab", hostname="intranet", address="", run_dir=str(provider.vm_dir(101)), tap="tap")
    monkeypatch.setattr(provider, "state", lambda vmid: running if vmid == 101 else None)
    sent: list[tuple[str, Any]] = []
    monkeypatch.setattr(lp.qmp, "execute", lambda sock, command, arguments=None, timeout=10: sent.append(
        (command, arguments)))
    with pytest.raises(DeployError, match="virtiofs cannot be hot-plugged"):
        provider.attach_share(101, "virtiofs9", "photos")
    with pytest.raises(DeployError, match="running"):
        provider.move_disk(101, "scsi1", 100)
    assert provider.move_disk(100, "scsi1", 101)["hotplugged"] is True
    assert [c for c, _a in sent] == ["blockdev-add", "device_add"]
    with pytest.raises(DeployError, match="its MAC cannot change"):
        provider.set_link(101, True, mac="52:54:00:aa:bb:cc")
    provider.set_link(101, False)
    assert sent[-1] == ("set_link", {"name": "net1", "up": False})


def test_the_share_locks_follow_the_link_of_a_running_vm(settings: Settings, provider: lp.LocalProvider,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Green runs isolated with the shares attached; it takes them with the production identity, not before."""
    provider.create_vm(_spec(settings, 101, {"virtiofs1": "photos"}, link_down=True))
    running = lp.VMState(role=ROLE, pid=os.getpid(), accel="tcg", image="", version="", ssh_port=2222,
                         user="homelab", hostname="intranet", address="", run_dir=str(provider.vm_dir(101)), tap="")
    monkeypatch.setattr(provider, "state", lambda vmid: running)
    sent: list[tuple[str, Any]] = []
    monkeypatch.setattr(lp.qmp, "execute", lambda sock, command, arguments=None, timeout=10: sent.append(
        (command, arguments)))
    lock = lv.lock_path(settings, ROLE, "photos")
    lv.acquire_share(lock, "intranet-100", os.getpid())  # blue, alive (this test's pid)
    with pytest.raises(lv.ShareBusyError, match="held by the running VM intranet-100"):
        provider.set_link(101, True)
    assert sent == [] and "link_down=1" in provider._record(101)["config"]["net0"]
    lv.release_share(lock, "intranet-100")  # blue stopped
    provider.set_link(101, True)
    assert sent == [("set_link", {"name": "net0", "up": True})]  # no bridge: the user network is the production NIC
    assert lv.share_holders(lock)["holder"] == {"vm": "intranet-101", "pid": os.getpid()}
    provider.set_link(101, False)
    assert lv.share_holders(lock)["holder"] is None


def test_identity_takes_the_mac_and_link_state(settings: Settings, provider: lp.LocalProvider) -> None:
    provider.create_vm(_spec(settings, 101, link_down=True))
    provider.set_link(101, True, mac=lp.bridge_mac(ROLE).upper())  # blue's MAC, as the engine reads it
    vm = provider.vm(101)
    assert vm is not None and vm.config["net0"] == f"virtio={lp.bridge_mac(ROLE).upper()},bridge=br-test"
    with pytest.raises(DeployError, match="all have the MAC"):
        provider.set_link(101, True, mac="52:54:00:12:34:56")
    provider.set_tags(101, ("homelab", "live"))
    vm = provider.vm(101)
    assert vm is not None and vm.tags == {"homelab", "live"}


def test_destroy_refuses_a_vm_holding_data_and_never_touches_the_volumes(
        settings: Settings, provider: lp.LocalProvider) -> None:
    provider.create_vm(_spec(settings, 100, {"scsi1": "local:postgres"}))
    with pytest.raises(DeployError, match="still has scsi1"):
        provider.destroy_vm(100)
    provider.create_vm(_spec(settings, 101))
    provider.move_disk(100, "scsi1", 101)
    provider.destroy_vm(100)
    assert provider.vm(100) is None and not provider.vm_dir(100).exists()
    assert (settings.build_dir / ROLE / "volumes" / "photos").is_dir()
    assert [v.vmid for v in provider.vms()] == [101]


def test_snapshots_are_taken_on_the_disks_of_a_stopped_vm(settings: Settings, provider: lp.LocalProvider,
                                                          recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    provider.create_vm(_spec(settings, 101, {"scsi1": "local:postgres", "virtiofs1": "photos"}))
    recorder.calls.clear()
    result = provider.snapshot_volumes(101, "homelab-20261125-1")
    disk = str(settings.build_dir / ROLE / "volumes" / "postgres.qcow2")
    assert result["disks"] == ["postgres"]
    assert recorder.calls[0] == ["qemu-img", "snapshot", "-c", "homelab-20261125-1", disk]
    provider.rollback_snapshot(101, "homelab-20261125-1")
    assert ["qemu-img", "snapshot", "-a", "homelab-20261125-1", disk] in recorder.calls

def test_the_snapshot_of_a_running_green_is_taken_by_qemu(settings: Settings, provider: lp.LocalProvider,
                                                          recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    """A swap's green runs when its hot-plugged disk is snapshotted: QEMU holds the write lock, QEMU snapshots."""
    provider.create_vm(_spec(settings, 101, {"scsi1": "local:postgres"}))
    old = [f"homelab-2026112{i}-1" for i in range(lv.KEEP_SNAPSHOTS + 1)]
    monkeypatch.setattr(lv, "disk_snapshots", lambda path: old)
    sent: list[tuple[str, Any]] = []
    monkeypatch.setattr(lp.qmp, "execute", lambda sock, command, arguments=None, timeout=10: sent.append(
        (command, arguments)))
    monkeypatch.setattr(provider, "state", lambda vmid: object())
    recorder.calls.clear()
    assert provider.snapshot_volumes(101, "homelab-x")["live"] is True
    assert sent == [("blockdev-snapshot-internal-sync", {"device": "vol-postgres", "name": "homelab-x"}),
                    ("blockdev-snapshot-delete-internal-sync", {"device": "vol-postgres", "name": old[0]})]
    assert recorder.calls == []


def test_the_snapshot_is_dropped_by_qemu_while_green_runs(settings: Settings, provider: lp.LocalProvider,
                                                           recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    provider.create_vm(_spec(settings, 101, {"scsi1": "local:postgres"}))
    monkeypatch.setattr(lv, "disk_snapshots", lambda path: ["homelab-20261125-1"])
    sent: list[tuple[str, Any]] = []
    monkeypatch.setattr(lp.qmp, "execute", lambda sock, command, arguments=None, timeout=10: sent.append(
        (command, arguments)))
    recorder.calls.clear()
    monkeypatch.setattr(provider, "state", lambda vmid: object())
    assert provider.delete_snapshot(101, "homelab-20261125-1")["deleted"] == ["postgres"]
    # QEMU holds the disk's write lock: qemu-img would fail (measured), QEMU deletes the snapshot itself.
    assert sent == [("blockdev-snapshot-delete-internal-sync", {"device": "vol-postgres",
                                                                 "name": "homelab-20261125-1"})]
    assert recorder.calls == []
    monkeypatch.setattr(provider, "state", lambda vmid: None)
    provider.delete_snapshot(101, "homelab-20261125-1")
    disk = str(settings.build_dir / ROLE / "volumes" / "postgres.qcow2")
    assert recorder.calls == [["qemu-img", "snapshot", "-d", "homelab-20261125-1", disk]]


# --- start: the share lock, then QEMU with the volumes, paused until the link is set -------------------------------


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> None:
        return None

    def kill(self) -> None:
        pass

    def wait(self) -> int:
        return 0


def test_a_share_held_by_another_running_vm_refuses_the_start(settings: Settings, provider: lp.LocalProvider,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    provider.create_vm(_spec(settings, 101, {"virtiofs1": "photos"}))
    lv.acquire_share(lv.lock_path(settings, ROLE, "photos"), "intranet-100", os.getpid())  # alive: this test
    started: list[Any] = []
    monkeypatch.setattr(lp, "start", lambda argv, **kw: started.append(argv))
    monkeypatch.setattr(lp, "require_tool", lambda name: name)
    with pytest.raises(lv.ShareBusyError, match="share photos is held by the running VM intranet-100"):
        provider.start(101)
    assert started == []
    assert lv.share_holders(lv.lock_path(settings, ROLE, "photos"))["holder"]["vm"] == "intranet-100"


def test_start_runs_virtiofsd_per_share_and_qemu_with_every_volume_then_cuts_the_link(
        settings: Settings, provider: lp.LocalProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    provider.create_vm(_spec(settings, 101, {"scsi1": "local:postgres", "virtiofs0": "appdata",
                                             "virtiofs2": "media"}, link_down=True))
    vmdir = provider.vm_dir(101)
    started: list[list[str]] = []

    def fake_start(argv: list[Any], **kwargs: Any) -> FakeProcess:
        started.append([str(a) for a in argv])
        if str(argv[0]).endswith("virtiofsd"):
            Path(str(argv[1]).removeprefix("--socket-path=")).touch()
        return FakeProcess(4242 + len(started))

    sent: list[tuple[str, Any]] = []
    monkeypatch.setattr(lp, "start", fake_start)
    monkeypatch.setattr(lp, "require_tool", lambda name: name)
    monkeypatch.setattr(provider, "_create_tap", lambda vmid: "hl101-intranet")
    monkeypatch.setattr(lp.qmp, "wait_for_monitor", lambda sock, timeout, alive: None)
    monkeypatch.setattr(lp.qmp, "execute", lambda sock, command, arguments=None, timeout=10: sent.append(
        (command, arguments)))
    monkeypatch.setattr(lp, "ensure_ssh_key", lambda s: settings.build_dir / "ssh" / "id_ed25519")
    monkeypatch.setattr(lp, "kernel_initialised", lambda state: None)  # its serial log: tests/unit/test_localvm.py
    provider.accel = "tcg"
    result = provider.start(101)
    volumes = settings.build_dir / ROLE / "volumes"
    assert started[0] == lv.virtiofsd_argv(vmdir / "fs-appdata.sock", volumes / "appdata")
    assert started[1] == lv.virtiofsd_argv(vmdir / "fs-media.sock", volumes / "media")
    qemu = started[2]
    assert qemu[0] == "qemu-system-x86_64"
    assert qemu[qemu.index("-m") + 1] == "4096"  # 12288 capped for a local VM
    tail = qemu[qemu.index("-pidfile") + 2:]
    assert tail == [*lv.share_qemu_argv(4096, [("appdata", vmdir / "fs-appdata.sock"),
                                                ("media", vmdir / "fs-media.sock")]),
                    *lv.disk_qemu_argv("postgres", volumes / "postgres.qcow2", False), "-S"]
    assert "tap,id=net1,ifname=hl101-intranet,script=no,downscript=no" in qemu
    # The root disk is the one boot device: SeaBIOS would otherwise try the blank data disk, then iPXE, and hang.
    assert [a for a in qemu if "bootindex" in a] == ["virtio-blk-pci,drive=root,bootindex=0"]
    assert all(a.endswith(",romfile=") for a in qemu if a.startswith("virtio-net-pci"))
    assert sent == [("set_link", {"name": "net1", "up": False}), ("cont", None)]
    assert result["pid"] == 4245
    # Isolated (its link down): the shares are attached but not taken; blue may hold them meanwhile.
    assert lv.share_holders(lv.lock_path(settings, ROLE, "appdata"))["holder"] is None
    state = json.loads((vmdir / "state.json").read_text())
    assert state["ssh_port"] == result["ssh_port"] and state["tap"] == "hl101-intranet"


@pytest.mark.parametrize(("bridge", "address"), [("br-test", "10.99.0.101/24"), (None, "10.0.2.15/24")])
def test_the_suite_runs_over_the_vms_forwarded_ssh(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                                    bridge: str | None, address: str) -> None:
    runs: list[tuple[str, dict[str, Any], str, Path | None]] = []

    class Suite:
        def run(self, role: str, context: dict[str, Any], hosts: str, ssh_config: Path | None) -> Path:
            runs.append((role, context, hosts, ssh_config))
            return settings.build_dir / "junit.xml"

        def reach(self, address: str, ssh_config: Path) -> str | None:
            raise AssertionError("a local VM is reached through its forwarded port, never on the site address")

    provider = lp.LocalProvider(settings, ROLE, bridge=bridge, suite=Suite())
    vmdir = provider.vm_dir(101)
    state = lp.VMState(role=ROLE, pid=1, accel="tcg", image="", version="", ssh_port=2222, user="admin",
                       hostname="intranet", address="", run_dir=str(vmdir))
    monkeypatch.setattr(provider, "state", lambda vmid: state if vmid == 101 else None)
    manifest = settings.build_dir / "intranet-v1.manifest.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text('{"version": "v1"}')
    expect = {"role": ROLE, "hostname": "intranet", "address": "10.99.0.101/24", "user": "admin",
              "manifest": str(manifest)}
    assert provider.run_suite(101, expect) == {"vmid": 101, "suite": "passed",
                                               "report": str(settings.build_dir / "junit.xml")}
    # Without a bridge the guest's only address is QEMU's user network: that is what the suite must find.
    assert runs == [(ROLE, {**expect, "address": address, "manifest": {"version": "v1"},
                            "qga_socket": str(state.qga_socket)}, f"paramiko://{state.ssh_alias}", state.ssh_config)]
    with pytest.raises(lp.HomelabError, match=r"^local VM 102 is not running$"):
        provider.run_suite(102, expect)
    assert provider.ssh_problem(101, expect) is None


class PanickyStarts:
    """QEMU launches (recorded) whose kernels panic before init the given number of times, then start init."""

    def __init__(self, settings: Settings, provider: lp.LocalProvider, monkeypatch: pytest.MonkeyPatch,
                 panics: int) -> None:
        self.panics = panics
        self.launched: list[str] = []
        self.halted: list[int] = []
        monkeypatch.setattr(lp, "launch_with_fallback", lambda s, accel, may, launch, halt: self.launch(accel))
        monkeypatch.setattr(lp, "kernel_initialised", self.kernel_initialised)
        monkeypatch.setattr(provider, "_halt", lambda vmid, state, graceful: self.halted.append(state.pid))
        self.run_dir = str(settings.build_dir)

    def launch(self, accel: str) -> lp.VMState:
        self.launched.append(accel)
        return lp.VMState(role=ROLE, pid=4000 + len(self.launched), accel=accel, image="", version="", ssh_port=1,
                          user="u", hostname="h", address="", run_dir=self.run_dir)

    def kernel_initialised(self, state: lp.VMState) -> str | None:
        if len(self.launched) > self.panics:
            return None
        return "Kernel panic - not syncing: Fatal exception in interrupt"


def test_a_kernel_that_panics_before_init_is_started_again(settings: Settings, provider: lp.LocalProvider,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    provider.create_vm(_spec(settings, 101, {}))
    provider.accel = "tcg"
    starts = PanickyStarts(settings, provider, monkeypatch, panics=2)
    result = provider.start(101)
    assert (starts.launched, starts.halted) == (["tcg", "tcg", "tcg"], [4001, 4002])
    assert result["pid"] == 4003
    assert result["panics"] == ["Kernel panic - not syncing: Fatal exception in interrupt"] * 2


def test_a_rerun_start_finds_the_panicked_vm_it_left_and_starts_it_again(
        settings: Settings, provider: lp.LocalProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    """The start was killed while it watched the boot: the VM runs, its kernel panicked; the rerun does not take
    "already running" for an answer."""
    provider.create_vm(_spec(settings, 101, {}))
    provider.accel = "tcg"
    starts = PanickyStarts(settings, provider, monkeypatch, panics=0)
    panicked = settings.build_dir / "panicked"
    panicked.mkdir(parents=True)
    shutil.copy(FIXTURES / "serial" / "panic-under-tcg.log", panicked / "serial.log")
    left = lp.VMState(role=ROLE, pid=3999, accel="tcg", image="", version="", ssh_port=1, user="u", hostname="h",
                      address="", run_dir=str(panicked))
    monkeypatch.setattr(provider, "state", lambda vmid: left)
    result = provider.start(101)
    assert (starts.halted, starts.launched) == ([3999], ["tcg"])
    assert result["panics"] == ["Kernel panic - not syncing: Fatal exception in interrupt"]
    shutil.copy(FIXTURES / "serial" / "booting.log", panicked / "serial.log")
    assert provider.start(101) == {"vmid": 101, "already": "running"}


def test_a_kernel_that_panics_at_every_start_is_the_error(settings: Settings, provider: lp.LocalProvider,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from builder.errors import GuestPanic

    provider.create_vm(_spec(settings, 101, {}))
    provider.accel = "tcg"
    starts = PanickyStarts(settings, provider, monkeypatch, panics=3)
    with pytest.raises(GuestPanic, match=r"^local VM 101's kernel panicked in each of 3 starts: Kernel panic - not "
                                         r"syncing: Fatal exception in interrupt$"):
        provider.start(101)
    assert starts.halted == [4001, 4002, 4003]  # nothing left running


# --- `homelab rehearse` ---------------------------------------------------------------------------------------------


def _fake_build(settings: Settings) -> Path:
    from builder.build import sha256_file

    role_dir = settings.build_dir / ROLE
    role_dir.mkdir(parents=True, exist_ok=True)
    (role_dir / "intranet-0123456789ab.qcow2").write_bytes(b"image")
    (role_dir / "intranet-0123456789ab.manifest.json").write_text(json.dumps({
        "version": "0123456789ab", "image": "intranet-0123456789ab.qcow2",
        "sha256": sha256_file(role_dir / "intranet-0123456789ab.qcow2")}))
    return role_dir


def test_the_deploys_seed_names_share_tags_that_differ_from_the_volume_names(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from builder.cloudinit import read_seed_iso
    from builder.deploy import plan_deploy

    _fake_build(settings)
    monkeypatch.setattr(lp.LocalProvider, "preflight", lambda self, role: [])
    # A mapping named unlike its volume, as on Proxmox: the provider is told it exists (the deploy checks that).
    monkeypatch.setattr(lp.LocalProvider, "mappings", lambda self: {"intranet-photos", "appdata", "media",
                                                                    "backups", "logs"})
    site = lp.site_for_local_deploy(settings, load_site(SITE), ROLE, None)
    host = site.host(ROLE)
    volumes = {**host.volumes, "photos": {"volid": None, "mapping": "intranet-photos"}}
    site = dataclasses.replace(site, hosts={**site.hosts, ROLE: dataclasses.replace(host, volumes=volumes)})
    plan = plan_deploy(settings, site, ROLE, None, False, provider=lp.LocalProvider(settings, ROLE),
                       secrets_path=FIXTURES / "site" / "test-secrets.yaml")
    user_data = read_seed_iso(Path(plan.seed)).user_data
    assert lv.TAGS_PATH in user_data and "intranet-photos" in user_data


def _tool_key(settings: Settings) -> None:
    key = settings.build_dir / "ssh" / "id_ed25519"  # the tool's key exists: no ssh-keygen
    key.parent.mkdir(parents=True)
    key.write_text("private\n")
    public = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKTyw7qlTCQ0cVhxqVa20CkFDXdHJ6FdTZ+djApxheZ2 local\n"
    key.with_suffix(".pub").write_text(public)


def test_abandon_runs_the_unfinished_plan_on_the_bridge_it_was_made_for(settings: Settings,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Blue comes back on the bridge it served on, whatever options the abandoning command was given."""
    _fake_build(settings)
    _tool_key(settings)
    monkeypatch.setattr(lp.LocalProvider, "preflight", lambda self, role: [])
    plan, resumed, _provider, journal = lp.plan_local(settings, ROLE, SITE, FIXTURES / "site" / "test-secrets.yaml",
                                                      bridge="br-served")
    assert not resumed
    with pytest.raises(DeployError, match="no deploy of intranet is unfinished"):
        lp.abandon_local(settings, ROLE, SITE)
    journal.record(plan)
    seen: list[lp.LocalProvider] = []
    monkeypatch.setattr(lp, "abandon", lambda journal, role, provider, on_step: seen.append(provider) or "undone")
    result: object = lp.abandon_local(settings, ROLE, SITE)
    assert result == "undone"
    assert [provider.bridge for provider in seen] == ["br-served"]
    with pytest.raises(DeployError, match=f"deploy {plan.deploy_id} cannot be abandoned: a first deploy"):
        lp.abandon_local_steps(settings, ROLE)


def test_a_resumed_rehearsal_runs_on_the_bridge_it_was_planned_for(settings: Settings,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_build(settings)
    _tool_key(settings)
    monkeypatch.setattr(lp.LocalProvider, "preflight", lambda self, role: [])
    secrets = FIXTURES / "site" / "test-secrets.yaml"
    plan, _resumed, _provider, journal = lp.plan_local(settings, ROLE, SITE, secrets, bridge="br-served")
    journal.record(plan)  # left unfinished

    def no_seed(*args: object) -> None:
        raise AssertionError("a resumed deploy renders no new seed: its plan names the one it uploaded")

    monkeypatch.setattr(lp, "local_seed", no_seed)
    again, resumed, provider, _journal = lp.plan_local(settings, ROLE, SITE, secrets)  # no --bridge this time
    assert resumed and again.deploy_id == plan.deploy_id and provider.bridge == "br-served"
    assert again.to_json() == plan.to_json()
    with pytest.raises(DeployError, match=rf"^deploy {plan.deploy_id} of .* is unfinished \(forward\): rerun "
                                          r"without --image to resume it first$"):
        lp.plan_local(settings, ROLE, SITE, secrets, image=settings.build_dir / "other.qcow2")
    with pytest.raises(DeployError, match=rf"^deploy {plan.deploy_id} of intranet is unfinished on bridge "
                                          r"br-served: rerun without --bridge to resume it there \(or add --abandon "
                                          r"to undo it\)$"):
        lp.plan_local(settings, ROLE, SITE, secrets, bridge="br-other")


def test_rehearse_dry_run_prints_the_engines_plan_and_starts_nothing(settings: Settings,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from click.testing import CliRunner

    from builder.cli import main

    role_dir = _fake_build(settings)
    _tool_key(settings)
    monkeypatch.setattr(lp.LocalProvider, "preflight", lambda self, role: [])  # tested below, host-dependent
    monkeypatch.setenv("HOMELAB_PROJECT", str(settings.project))
    monkeypatch.setenv("HOMELAB_BUILD_DIR", str(settings.build_dir))
    monkeypatch.setenv("HOMELAB_CACHE_DIR", str(settings.cache_dir))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        result = CliRunner().invoke(main, ["rehearse", ROLE, "--dry-run", "--site", str(SITE),
                                           "--secrets", str(FIXTURES / "site" / "test-secrets.yaml")])
    finally:
        root.handlers[:], root.level = handlers, level
    assert result.exit_code == 0, result.output
    assert "first deploy, version 0123456789ab, VM 100" in result.output
    assert "volume postgres: disk scsi1 = local:postgres -> /srv/postgres" in result.output
    assert "volume media: share virtiofs2 = mapping media -> /srv/media (read-only)" in result.output
    assert not (role_dir / "volumes").exists() and not list(role_dir.glob("vm-*"))


def test_preflight_names_what_is_missing(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise lp.HomelabError(f"{name} not found")

    monkeypatch.setattr(lp, "require_tool", missing)
    provider = lp.LocalProvider(settings, ROLE, bridge="no-such-bridge0")
    failures = provider.preflight(ROLE)
    assert "qemu-system-x86_64 not found" in failures
    assert "bridge no-such-bridge0 does not exist (ip link add no-such-bridge0 type bridge)" in failures


def test_a_kvm_that_kills_qemu_at_start_falls_back_to_tcg_and_is_remembered(settings: Settings,
                                                                            provider: lp.LocalProvider) -> None:
    from builder import localvm
    from builder.errors import BootError

    launched: list[str] = []

    def launch(accel: str) -> localvm.VMState:
        launched.append(accel)
        if accel == "kvm":  # as measured here: "kvm_buf_set_msrs: Assertion ... failed", QEMU exits
            raise BootError("QEMU did not start: failed to set MSR 0x10a")
        return localvm.VMState(role=ROLE, pid=1, accel=accel, image="", version="", ssh_port=1, user="u",
                               hostname="h", address="", run_dir=str(settings.build_dir))

    state = localvm.launch_with_fallback(settings, "kvm", True, launch, lambda running: None)
    assert (launched, state.accel) == (["kvm", "tcg"], "tcg")
    assert "kvm-hangs" in json.loads((settings.cache_dir / "accel.json").read_text()).values()
    launched.clear()
    with pytest.raises(BootError, match="MSR"):  # forced KVM (--accel kvm) is not second-guessed
        localvm.launch_with_fallback(settings, "kvm", False, launch, lambda running: None)
    assert launched == ["kvm"]
