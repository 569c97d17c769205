"""LocalProvider: the deploy's Provider (builder/deploy.py) on this machine, with QEMU, so the same swap plan runs here.

An owner rehearses a swap before doing it on Proxmox VE, and the VM tests run it with real VMs. Each VM of a role
lives in build/<role>/vm-<vmid>/: vm.json (its config, shaped like a Proxmox VE VM config: `scsi0` the root
overlay, `ide2` the seed ISO, `net0` the bridge NIC, `tags`, and the data volumes under the keys the plan gives
them, `scsiN` = `local:<name>` for a disk, `virtiofsN` = `<name>` for a share), and while it runs what
builder/localvm.py keeps for `homelab boot`: overlay, seed, serial log, QMP and guest-agent sockets, state.json,
ssh_config. The data volumes are builder/localvolumes.py's, in build/<role>/volumes/, never inside a VM's directory:
destroying a VM never touches them.

How the swap's steps map here:
- create: an overlay over the built image, the seed ISO, vm.json. Nothing runs.
- start: one virtiofsd per share in the config, QEMU with the disks (virtio-blk, serial=<name>) and shares
  (vhost-user-fs, tag=<name>) of the config, started paused so that a NIC whose config says link_down is cut (QMP
  set_link) before the guest runs. The bridge NIC of every VM of the role has the role's MAC (a swap's green has
  blue's MAC anyway; with green's link down the bridge never sees two). ssh and the guest agent do not use the
  bridge: ssh is QEMU's user network, the agent a virtio-serial socket, so an isolated green is still reachable.
  Without a bridge the user network is the only NIC, the production one: it is the one cut (no ssh while isolated).
- share locks follow the production identity, the link: a VM starting with its link up, or whose link is brought up
  (set_link), takes the lock of each of its shares (refused while another running VM holds one); its link cut or
  the VM stopped, it lets go. A swap's green runs isolated with blue's shares attached and unmounted (the guest's
  homelab-volumes mounts only while its production NIC has a carrier) and takes them at the cutover, blue stopped.
- hand-over: a disk moved to a running VM (the swap's green) is hot-plugged through QMP (blockdev-add +
  device_add, measured to work here); between stopped VMs (a rollback) it is a config edit. A share cannot be
  hot-plugged: vhost-user-fs hot-plug (chardev-add + device_add) is not something QEMU 7.2 is known to do reliably
  (public reports show the vhost ring set-up failing), and PVE 8.4 cannot either, so green gets its shares at its
  creation and attach_share refuses a running VM.
- snapshot/rollback of the disks: qcow2 internal snapshots (localvolumes), taken and dropped by QEMU itself (QMP)
  while a running VM holds the disk; a rollback restores with qemu-img, the VM stopped.
- shutdown: ACPI power-down through QMP, then quit; stop: quit at once. Both end the VM's virtiofsd and release
  its share locks.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from . import localvolumes as lv
from . import qmp
from .build import sha256_file
from .cloudinit import Seed, render_seed
from .definition import load_role
from .deploy import (
    KEEP_ROLLBACKS,
    DeployPlan,
    Endpoint,
    GuestResult,
    Journal,
    Outcome,
    VmInfo,
    VmSpec,
    abandon,
    abandon_steps,
    execute,
    health_gate,
    parse_net,
    plan_deploy,
    render_net,
    resumable_plan,
    unfinished_plan,
)
from .errors import BootError, DeployError, GuestPanic, HomelabError
from .localvm import (
    LOCAL_ZONES,
    PANIC_ATTEMPTS,
    QEMU_USER_NETWORK,
    VMState,
    _alive,
    _free_port,
    _kill,
    _remove_tap,
    _write_ssh_config,
    boot_again_after_panic,
    bridge_mac,
    choose_accel,
    ensure_ssh_key,
    guest_networks,
    kernel_initialised,
    launch_with_fallback,
    panic_line,
    qemu_argv,
)
from .runner import require_tool, run, start
from .settings import Settings
from .site import Site, load_secrets, load_site
from .verify import SshSuite, SuiteRunner, deploy_context

# The bridge NIC is QEMU's netdev net1 (net0 is the user network for ssh), as in localvm._nic_argv. Without a
# bridge the user network is the only NIC, and so the production one: its link is the one cut while isolated.
BRIDGE_NETDEV = "net1"
USER_NETDEV = "net0"
LOCAL_STORAGE = "local"  # volume IDs of local disks: local:<name>
MEMORY_CAP_MB = 4096  # like `homelab boot`: a local VM gets at most this much
VIRTIOFSD_WAIT = 15.0
QGA_TIMEOUT = 10.0
DATA_KEYS = ("scsi", "virtio", "sata", "virtiofs")


# --- the site, as the deploy engine needs it for a local deploy --------------------------------------------------


def site_for_local_deploy(settings: Settings, site: Site, role: str, bridge: str | None, vmid: int = 100) -> Site:
    """The site with what a deploy needs filled in for this machine: the role's VMID (when the site has none), each
    volume of the definition as local:<name> (a disk) or the share <name> (unless the site names them), and a
    `proxmox.bridge` naming the local bridge (or `none`). The site file is not changed."""
    host = site.host(role)
    volumes = dict(host.volumes)
    for volume in load_role(settings.project, role)["volumes"]:
        volumes.setdefault(volume["name"], {"volid": f"{LOCAL_STORAGE}:{volume['name']}", "mapping": None}
                           if volume["kind"] == "disk" else {"volid": None, "mapping": volume["name"]})
    local_host = replace(host, vmid=host.vmid if host.vmid is not None else vmid, name=host.name or host.hostname,
                         volumes=volumes)
    proxmox = dict(site.values.get("proxmox") or {})
    proxmox["bridge"] = bridge or "none"
    return replace(site, hosts={**site.hosts, role: local_host}, values={**site.values, "proxmox": proxmox})


def local_seed(settings: Settings, site: Site, role: str, secrets: dict[str, dict[str, str]],
               bridge: str | None) -> Seed:
    """The seed of a local VM: like `homelab boot`'s (QEMU's user network for ssh, the tool's key, this machine in
    the LAN zone, the site's address on the bridge NIC) but without the ephemeral marker: its volumes are real."""
    key = ensure_ssh_key(settings)
    return render_seed(settings.project, role, site, secrets, networks=guest_networks(site, role, bridge),
                       extra_ssh_keys=[Path(f"{key}.pub").read_text().strip()], extra_zones=LOCAL_ZONES)


def journal_path(settings: Settings, role: str) -> Path:
    """Local deploys keep their own journal: never mixed with the Proxmox VE one (build/<role>/deploy-journal.json)."""
    return settings.role_dir(role) / "local" / "deploy-journal.json"


# --- the guest agent's exec -------------------------------------------------------------------------------------------


def guest_exec_request(argv: tuple[str, ...]) -> dict[str, Any]:
    return {"execute": "guest-exec", "arguments": {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}}


def guest_exec_result(status: dict[str, Any]) -> GuestResult | None:
    """A guest-exec-status answer as a GuestResult, None while the command runs."""
    if not status.get("exited"):
        return None

    def text(key: str) -> str:
        data = status.get(key)
        return base64.b64decode(data).decode(errors="replace") if data else ""

    code = status.get("exitcode")
    if code is None:  # killed by a signal
        code = 128 + int(status.get("signal", 0))
    return GuestResult(int(code), text("out-data"), text("err-data"))


class _Agent:
    """One conversation with qemu-guest-agent on its virtio-serial socket (JSON lines, guest-sync first)."""

    def __init__(self, sock: Path, timeout: float) -> None:
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.settimeout(timeout)
        self.buffer = b""
        try:
            self.conn.connect(str(sock))
            token = int(time.time() * 1000) % 1000000007
            self._send({"execute": "guest-sync", "arguments": {"id": token}})
            while self._answer().get("return") != token:  # drops answers left over from an earlier client
                pass
        except (OSError, ValueError):
            self.conn.close()
            raise

    def _send(self, message: dict[str, Any]) -> None:
        self.conn.sendall(json.dumps(message).encode() + b"\n")

    def _answer(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise ValueError("the guest agent closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line.strip() or b"{}")
        return answer

    def call(self, message: dict[str, Any]) -> Any:
        self._send(message)
        answer = self._answer()
        if "error" in answer:
            raise HomelabError(f"guest agent: {message['execute']}: {answer['error'].get('desc', answer['error'])}")
        return answer.get("return")

    def close(self) -> None:
        self.conn.close()


# --- the provider -----------------------------------------------------------------------------------------------------


class LocalProvider:
    """The Provider of builder/deploy.py for one role on this machine."""

    def __init__(self, settings: Settings, role: str, *, user: str = "homelab", bridge: str | None = None,
                 accel: str | None = None, memory_mb: int | None = None, clock: Callable[[], float] = time.monotonic,
                 sleeper: Callable[[float], None] = time.sleep, suite: SuiteRunner | None = None) -> None:
        self.settings = settings
        self.suite = suite or SshSuite(settings)
        self.role = role
        self.user = user  # the site's admin_user: the ssh login of state.json's ssh_config
        self.bridge = bridge
        self.accel = accel
        self.memory_mb = memory_mb
        self.clock = clock
        self.sleeper = sleeper
        self.volumes = {v.name: v for v in lv.volumes_of(load_role(settings.project, role))}

    # --- time

    def now(self) -> float:
        return self.clock()

    def sleep(self, seconds: float) -> None:
        self.sleeper(seconds)

    # --- places

    def vm_dir(self, vmid: int) -> Path:
        return self.settings.role_dir(self.role) / f"vm-{vmid}"

    def _record_path(self, vmid: int) -> Path:
        return self.vm_dir(vmid) / "vm.json"

    def _load(self, vmid: int) -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads(self._record_path(vmid).read_text())
        except (OSError, ValueError):
            return None
        return record

    def _save(self, vmid: int, record: dict[str, Any]) -> None:
        path = self._record_path(vmid)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    def _record(self, vmid: int) -> dict[str, Any]:
        record = self._load(vmid)
        if record is None:
            raise DeployError(f"local VM {vmid} of {self.role} does not exist ({self._record_path(vmid)})")
        return record

    def state(self, vmid: int) -> VMState | None:
        """The running VM's ssh and socket facts (localvm.VMState), None when it is not running."""
        try:
            state = VMState(**json.loads((self.vm_dir(vmid) / "state.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return state if _alive(state.pid) else None

    def _vm_name(self, vmid: int) -> str:
        return f"{self.role}-{vmid}"

    def _tap(self, vmid: int) -> str:
        return f"hl{vmid}-{self.role}"[:15]  # IFNAMSIZ

    # --- reading

    def preflight(self, role: str) -> list[str]:
        failures = []
        for tool in ("qemu-system-x86_64", "qemu-img", "ssh"):
            try:
                require_tool(tool)
            except HomelabError as exc:
                failures.append(str(exc))
        if any(v.kind == "share" for v in self.volumes.values()) and not os.access(lv.VIRTIOFSD, os.X_OK):
            failures.append(f"{lv.VIRTIOFSD} not found: install the Debian package qemu-system-common")
        if self.bridge and not Path(f"/sys/class/net/{self.bridge}/bridge").is_dir():
            failures.append(f"bridge {self.bridge} does not exist (ip link add {self.bridge} type bridge)")
        return failures

    def vm(self, vmid: int) -> VmInfo | None:
        record = self._load(vmid)
        if record is None:
            return None
        status = "running" if self.state(vmid) is not None else "stopped"
        return VmInfo(vmid, status, dict(record["config"]))

    def vms(self) -> list[VmInfo]:
        out = []
        for path in sorted(self.settings.role_dir(self.role).glob("vm-*/vm.json")):
            with contextlib.suppress(ValueError):
                vm = self.vm(int(path.parent.name.removeprefix("vm-")))
                if vm is not None:
                    out.append(vm)
        return out

    def _disk_name(self, volid: str) -> str:
        storage, _, name = volid.partition(":")
        if storage != LOCAL_STORAGE or name not in self.volumes or self.volumes[name].kind != "disk":
            raise DeployError(f"{volid} is not a local disk volume of {self.role} (local:<name> of images/"
                              f"{self.role}.yaml)")
        return name

    def volume_exists(self, volid: str) -> bool:
        """A local disk of the definition exists or is made (empty, once) when the first VM is created."""
        try:
            self._disk_name(volid)
        except DeployError:
            return False
        return True

    def owned_volumes(self, vmid: int) -> list[str]:
        """What destroy_vm frees: the VM's root overlay only (data volumes live outside its directory)."""
        record = self._load(vmid)
        return [record["config"]["scsi0"]] if record else []

    def _disks(self, config: dict[str, str]) -> list[tuple[str, str]]:
        """(key, volume name) of the data disks in a VM's config."""
        return sorted((key, self._disk_name(value.split(",")[0])) for key, value in config.items()
                      if key.startswith(("scsi", "virtio")) and not key.startswith("virtiofs") and key != "scsi0")

    def _shares(self, config: dict[str, str]) -> list[tuple[str, str]]:
        return sorted((key, value.split(",")[0].removeprefix("dirid=")) for key, value in config.items()
                      if key.startswith("virtiofs"))

    def snapshots(self, vmid: int) -> list[str]:
        record = self._load(vmid)
        if record is None:
            return []
        names: set[str] = set()
        for _key, name in self._disks(record["config"]):
            names.update(lv.disk_snapshots(lv.disk_path(self.settings, self.role, name)))
        return sorted(names)

    # --- images and VMs

    def upload_image(self, path: Path, sha256: str) -> dict[str, Any]:
        """Nothing to upload: the VM's overlay is backed by the build itself. Its checksum is checked."""
        if not path.is_file() or sha256_file(path) != sha256:
            raise DeployError(f"{path} does not match its manifest's sha256")
        return {"volid": str(path.resolve())}

    def upload_seed(self, path: Path, sha256: str) -> dict[str, Any]:
        if not path.is_file() or sha256_file(path) != sha256:
            raise DeployError(f"seed {path} does not match its sha256")
        return {"volid": str(path.resolve())}

    def create_vm(self, spec: VmSpec) -> dict[str, Any]:
        vmdir = self.vm_dir(spec.vmid)
        if self._load(spec.vmid) is not None:
            raise DeployError(f"local VM {spec.vmid} of {self.role} exists already")
        vmdir.mkdir(parents=True, exist_ok=True)
        lv.ensure_volumes(self.settings, self.role, list(self.volumes.values()))
        overlay, seed = vmdir / "overlay.qcow2", vmdir / "seed.iso"
        overlay.unlink(missing_ok=True)
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", spec.image_volid, "-F", "qcow2", str(overlay)])
        seed.write_bytes(Path(spec.seed_volid).read_bytes())
        if spec.mac is not None and spec.mac.lower() != bridge_mac(self.role):
            raise DeployError(f"local VMs of {self.role} all have the MAC {bridge_mac(self.role)}, not {spec.mac}")
        options = {"bridge": spec.bridge}
        if spec.link_down:
            options["link_down"] = "1"
        config = {"name": spec.name, "cores": str(spec.cores), "memory": str(spec.memory_mb),
                  "scsi0": str(overlay), "ide2": str(seed), "agent": "1",
                  "net0": render_net("virtio", bridge_mac(self.role), options), "tags": ";".join(spec.tags)}
        for key, value in spec.drives.items():
            if key.startswith("virtiofs"):
                self._share_volume(value)
            else:
                self._disk_name(value)
            config[key] = value
        self._save(spec.vmid, {"vmid": spec.vmid, "image": spec.image_volid, "config": config})
        return {"vmid": spec.vmid, "dir": str(vmdir)}

    def mappings(self) -> set[str]:
        """A local share's "directory mapping" is its volume name (its directory under build/<role>/volumes/)."""
        return {name for name, volume in self.volumes.items() if volume.kind == "share"}

    def _share_volume(self, mapping: str) -> lv.Volume:
        volume = self.volumes.get(mapping)
        if volume is None or volume.kind != "share":
            raise DeployError(f"{mapping} is not a share volume of images/{self.role}.yaml")
        return volume

    # --- power

    def start(self, vmid: int) -> dict[str, Any]:
        record = self._record(vmid)
        panics: list[str] = []
        running = self.state(vmid)
        if running is not None:
            panic = panic_line(running.serial_log)  # a rerun of a start killed while it watched the boot
            if panic is None:
                return {"vmid": vmid, "already": "running"}
            self._halt(vmid, running, graceful=False)
            panics.append(panic)
        accel = self.accel or choose_accel(self.settings, None)

        def until_init() -> VMState:
            nonlocal accel
            state = launch_with_fallback(self.settings, accel, self.accel is None,
                                         lambda chosen: self._launch(vmid, record, chosen),
                                         lambda running: self._halt(vmid, running, graceful=False))
            accel = state.accel
            panic = kernel_initialised(state)
            if panic is not None:
                # Before init nothing has mounted the root or data disks: starting again from here is a clean start.
                self._halt(vmid, state, graceful=False)
                raise GuestPanic(panic)
            return state

        try:
            state = boot_again_after_panic(until_init, lambda panic: panics.append(str(panic)),
                                           PANIC_ATTEMPTS - len(panics))
        except GuestPanic as last:
            raise GuestPanic(f"local VM {vmid}'s kernel panicked in each of {PANIC_ATTEMPTS} starts: {last}") from None
        started = {"vmid": vmid, "pid": state.pid, "accel": state.accel, "ssh_port": state.ssh_port}
        return {**started, "panics": panics} if panics else started

    def _launch(self, vmid: int, record: dict[str, Any], accel: str) -> VMState:
        require_tool("qemu-system-x86_64")
        config = record["config"]
        vmdir = self.vm_dir(vmid)
        for stale in ("serial.log", "qmp.sock", "qga.sock", "qemu.pid", "state.json"):
            (vmdir / stale).unlink(missing_ok=True)
        memory = min(int(config["memory"]), self.memory_mb or MEMORY_CAP_MB)
        cores = min(int(config["cores"]), os.cpu_count() or 1)
        name = self._vm_name(vmid)
        shares = self._shares(config)
        link_down = parse_net(config["net0"])[2].get("link_down") == "1"
        # The share locks follow the production identity (the link): an isolated green has the shares attached
        # but its guest mounts nothing (homelab-volumes `serving`), so only a VM starting with its link up takes them.
        locked = [] if link_down else shares
        tap, helpers = "", []
        try:
            for _key, share in locked:  # first the locks: nothing starts while another VM holds a share
                lv.acquire_share(lv.lock_path(self.settings, self.role, share), name, os.getpid())
            tap = self._create_tap(vmid) if self.bridge else ""
            sockets = []
            for _key, share in shares:
                sock = vmdir / f"fs-{share}.sock"
                helpers.append(self._start_virtiofsd(vmdir, share, sock))
                sockets.append((share, sock))
            extra = lv.share_qemu_argv(memory, sockets)
            for _key, disk in self._disks(config):
                extra += lv.disk_qemu_argv(disk, lv.disk_path(self.settings, self.role, disk),
                                           self.volumes[disk].read_only)
            extra.append("-S")  # paused: the NIC's link is set before the guest runs
            ssh_port = _free_port()
            with (vmdir / "qemu.log").open("w") as qemu_log:
                proc = start(qemu_argv(vmdir, accel, memory, cores, ssh_port, tap, extra=extra), stdout=qemu_log)
            try:
                qmp.wait_for_monitor(vmdir / "qmp.sock", 30, lambda: proc.poll() is None)
            except BootError:
                proc.kill()
                proc.wait()
                tail = (vmdir / "qemu.log").read_text(errors="replace").strip().splitlines()[-3:]
                raise BootError(f"QEMU did not start: {' | '.join(tail) or 'no output'}") from None
            if link_down:
                self._qmp(vmdir, *lv.set_link_command(self._netdev(tap), False))
            self._qmp(vmdir, "cont", {})
        except BaseException:
            for helper in helpers:
                _kill(helper)
            for _key, share in locked:
                lv.release_share(lv.lock_path(self.settings, self.role, share), name)
            _remove_tap(tap)
            raise
        for _key, share in locked:  # the lock now names QEMU itself: it is stale once QEMU is gone
            lv.acquire_share(lv.lock_path(self.settings, self.role, share), name, proc.pid)
        state = VMState(role=self.role, pid=proc.pid, accel=accel, image=record["image"], version="",
                        ssh_port=ssh_port, user=self.user, hostname=config["name"], address="",
                        run_dir=str(vmdir), tap=tap)
        _write_ssh_config(state, ensure_ssh_key(self.settings))
        (vmdir / "state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
        record["helpers"] = helpers
        self._save(vmid, record)
        return state

    @staticmethod
    def _netdev(tap: str) -> str:
        return BRIDGE_NETDEV if tap else USER_NETDEV

    def _start_virtiofsd(self, vmdir: Path, share: str, sock: Path) -> int:
        sock.unlink(missing_ok=True)
        with (vmdir / f"virtiofsd-{share}.log").open("w") as log:
            proc = start(lv.virtiofsd_argv(sock, lv.share_path(self.settings, self.role, share)), stdout=log)
        deadline = time.monotonic() + VIRTIOFSD_WAIT
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                _kill(proc.pid)
                tail = (vmdir / f"virtiofsd-{share}.log").read_text(errors="replace").strip().splitlines()[-2:]
                raise BootError(f"virtiofsd for share {share} did not start: {' | '.join(tail) or 'no output'}")
            time.sleep(0.1)
        return proc.pid

    def _create_tap(self, vmid: int) -> str:
        assert self.bridge is not None
        if not Path(f"/sys/class/net/{self.bridge}/bridge").is_dir():
            raise BootError(f"bridge {self.bridge} does not exist (ip link add {self.bridge} type bridge)")
        tap = self._tap(vmid)
        _remove_tap(tap)
        run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
        run(["ip", "link", "set", "dev", tap, "master", self.bridge, "up"])
        return tap

    def _qmp(self, vmdir: Path, command: str, arguments: dict[str, Any]) -> Any:
        return qmp.execute(vmdir / "qmp.sock", command, arguments or None)

    def stop(self, vmid: int) -> dict[str, Any]:
        state = self.state(vmid)
        if state is None:
            self._cleanup(vmid, None)
            return {"vmid": vmid, "already": "stopped"}
        self._halt(vmid, state, graceful=False)
        return {"vmid": vmid, "stopped": True}

    def shutdown(self, vmid: int, timeout: float) -> dict[str, Any]:
        state = self.state(vmid)
        if state is None:
            self._cleanup(vmid, None)
            return {"vmid": vmid, "already": "stopped"}
        forced = self._halt(vmid, state, graceful=True, timeout=timeout)
        return {"vmid": vmid, "forced": forced}

    def _halt(self, vmid: int, state: VMState, *, graceful: bool, timeout: float = 60) -> bool:
        """Power the VM off (ACPI first when graceful) and clean up after it; True when it had to be forced."""
        forced = True
        if graceful and qmp.powerdown(state.qmp_socket, timeout):
            for _ in range(int(timeout * 10)):
                if not _alive(state.pid):
                    forced = False
                    break
                time.sleep(0.1)
        if _alive(state.pid):
            with contextlib.suppress(BootError):
                qmp.execute(state.qmp_socket, "quit", timeout=5)
            for _ in range(50):
                if not _alive(state.pid):
                    break
                time.sleep(0.1)
            _kill(state.pid)
        self._cleanup(vmid, state)
        return forced

    def _cleanup(self, vmid: int, state: VMState | None) -> None:
        record = self._load(vmid)
        if record is None:
            return
        for pid in record.pop("helpers", []):
            if lv.pid_alive(pid):
                _kill(pid)
        for _key, share in self._shares(record["config"]):
            lv.release_share(lv.lock_path(self.settings, self.role, share), self._vm_name(vmid))
        _remove_tap(state.tap if state else self._tap(vmid))
        (self.vm_dir(vmid) / "state.json").unlink(missing_ok=True)
        self._save(vmid, record)

    # --- guest agent

    def _agent(self, vmid: int, timeout: float = QGA_TIMEOUT) -> _Agent:
        state = self.state(vmid)
        if state is None:
            raise HomelabError(f"local VM {vmid} is not running")
        try:
            return _Agent(state.qga_socket, timeout)
        except (OSError, ValueError) as exc:
            raise HomelabError(f"guest agent of local VM {vmid} does not answer: {exc}") from None

    def agent_ping(self, vmid: int) -> None:
        agent = self._agent(vmid)
        try:
            agent.call({"execute": "guest-ping"})
        except (OSError, ValueError) as exc:
            raise HomelabError(f"guest agent of local VM {vmid}: {exc}") from None
        finally:
            agent.close()

    def agent_exec(self, vmid: int, argv: tuple[str, ...], timeout: float) -> GuestResult:
        agent = self._agent(vmid)
        try:
            pid = agent.call(guest_exec_request(argv))["pid"]
            deadline = time.monotonic() + timeout
            while True:
                result = guest_exec_result(agent.call({"execute": "guest-exec-status", "arguments": {"pid": pid}}))
                if result is not None:
                    return result
                if time.monotonic() > deadline:
                    raise HomelabError(f"local VM {vmid}: `{' '.join(argv)}` still running after {timeout:.0f} s")
                time.sleep(0.5)
        except (OSError, ValueError) as exc:
            raise HomelabError(f"guest agent of local VM {vmid}: {exc}") from None
        finally:
            agent.close()

    def health_gate(self, vmid: int, deadline: float, endpoints: tuple[Endpoint, ...] = ()) -> dict[str, Any]:
        return health_gate(self, vmid, deadline, endpoints)

    def ssh_problem(self, vmid: int, expect: dict[str, Any]) -> str | None:
        return None  # the suite logs in through QEMU's forwarded port with the tool's own key, never the site address

    def run_suite(self, vmid: int, expect: dict[str, Any]) -> dict[str, Any]:
        """The role's testinfra suite over the VM's forwarded ssh (its ssh_config, the tool's key)."""
        state = self.state(vmid)
        if state is None:
            raise HomelabError(f"local VM {vmid} is not running")
        # Without a bridge the guest's one address is QEMU's user network, not the site's.
        address = expect["address"] if self.bridge else QEMU_USER_NETWORK.address
        context = deploy_context({**expect, "address": address}, state.qga_socket)
        report = self.suite.run(self.role, context, f"paramiko://{state.ssh_alias}", state.ssh_config)
        return {"vmid": vmid, "suite": "passed", "report": str(report)}

    # --- data volumes

    def _stopped(self, vmid: int, what: str) -> dict[str, Any]:
        if self.state(vmid) is not None:
            raise DeployError(f"{what}: local VM {vmid} is running")
        return self._record(vmid)

    def snapshot_volumes(self, vmid: int, name: str) -> dict[str, Any]:
        """Like PVE's, also of the running VM (a swap's green, its disks hot-plugged but not mounted): then QEMU, which
        holds the disks' write lock, takes the internal snapshot itself."""
        record = self._record(vmid)
        running = self.state(vmid)
        disks = [disk for _key, disk in self._disks(record["config"])]
        for disk in disks:
            path = lv.disk_path(self.settings, self.role, disk)
            if running is None:
                lv.snapshot_disk(path, name)
                continue
            self._qmp(self.vm_dir(vmid), *lv.create_snapshot_command(disk, name))
            for old in lv.stale_snapshots(path):
                self._qmp(self.vm_dir(vmid), *lv.delete_snapshot_command(disk, old))
        return {"vmid": vmid, "snapshot": lv.snapshot_tag(name), "disks": disks, "live": running is not None}

    def rollback_snapshot(self, vmid: int, name: str) -> dict[str, Any]:
        record = self._stopped(vmid, f"rollback to {name}")
        disks = [disk for _key, disk in self._disks(record["config"])]
        for disk in disks:
            lv.restore_disk(lv.disk_path(self.settings, self.role, disk), name)
        return {"vmid": vmid, "snapshot": lv.snapshot_tag(name), "disks": disks}

    def delete_snapshot(self, vmid: int, name: str) -> dict[str, Any]:
        """Like PVE's, also on the running VM (the swap drops it once green is healthy): then QEMU, which holds the
        disks' write lock, deletes the internal snapshot itself."""
        record = self._record(vmid)
        running = self.state(vmid) is not None
        disks = []
        for _key, disk in self._disks(record["config"]):
            path = lv.disk_path(self.settings, self.role, disk)
            if lv.snapshot_tag(name) in lv.disk_snapshots(path):
                if running:
                    self._qmp(self.vm_dir(vmid), *lv.delete_snapshot_command(disk, name))
                else:
                    lv.delete_disk_snapshot(path, name)
                disks.append(disk)
        return {"vmid": vmid, "deleted": disks}

    def move_disk(self, vmid: int, key: str, target: int) -> dict[str, Any]:
        source = self._stopped(vmid, f"move_disk {key}")
        dest = self._record(target)
        volid = source["config"].get(key)
        if volid is None:
            raise DeployError(f"local VM {vmid} has no {key}")
        if key in dest["config"]:
            raise DeployError(f"local VM {target} has a {key} already")
        name = self._disk_name(volid.split(",")[0])
        running = self.state(target)
        if running is not None:  # hot-plug into the running target (blockdev-add + device_add)
            for command, arguments in lv.hotplug_disk_commands(name, lv.disk_path(self.settings, self.role, name),
                                                               self.volumes[name].read_only):
                qmp.execute(running.qmp_socket, command, arguments)
        del source["config"][key]
        self._save(vmid, source)
        dest["config"][key] = volid
        self._save(target, dest)
        return {"volid": volid, "hotplugged": running is not None}

    def attach_share(self, vmid: int, key: str, mapping: str) -> dict[str, Any]:
        record = self._stopped(vmid, f"attach share {mapping} (virtiofs cannot be hot-plugged here)")
        self._share_volume(mapping)
        for other in self.vms():
            if other.vmid != vmid and mapping in [s for _k, s in self._shares(dict(other.config))]:
                raise DeployError(f"share {mapping} is still attached to local VM {other.vmid}: one share, one VM")
        record["config"][key] = mapping
        self._save(vmid, record)
        return {"vmid": vmid, key: mapping}

    def detach(self, vmid: int, key: str) -> dict[str, Any]:
        record = self._stopped(vmid, f"detach {key}")
        value = record["config"].pop(key, None)
        self._save(vmid, record)
        return {"vmid": vmid, "detached": value}

    def set_link(self, vmid: int, up: bool, mac: str | None = None) -> dict[str, Any]:
        record = self._record(vmid)
        model, current_mac, options = parse_net(record["config"]["net0"])
        running = self.state(vmid)
        if mac is not None and mac.lower() != (current_mac or "").lower():
            if running is not None:
                raise DeployError(f"local VM {vmid} is running: its MAC cannot change")
            if mac.lower() != bridge_mac(self.role):
                # QEMU gives the bridge NIC the role's MAC (localvm._nic_argv), which the guest's network config
                # is pinned to: every local VM of the role already has the MAC blue has.
                raise DeployError(f"local VMs of {self.role} all have the MAC {bridge_mac(self.role)}, not {mac}")
        options.pop("link_down", None)
        if not up:
            options["link_down"] = "1"
        locks = [lv.lock_path(self.settings, self.role, share) for _key, share in self._shares(record["config"])]
        if running is not None and up:  # the shares go with the production identity: refused if another VM has them
            for lock in locks:
                lv.acquire_share(lock, self._vm_name(vmid), running.pid)
        record["config"]["net0"] = render_net(model, mac or current_mac, options)
        self._save(vmid, record)
        if running is not None:
            qmp.execute(running.qmp_socket, *lv.set_link_command(self._netdev(running.tap), up))
            if not up:
                for lock in locks:
                    lv.release_share(lock, self._vm_name(vmid))
        return {"vmid": vmid, "net0": record["config"]["net0"]}

    def set_tags(self, vmid: int, tags: tuple[str, ...]) -> dict[str, Any]:
        record = self._record(vmid)
        record["config"]["tags"] = ";".join(tags)
        self._save(vmid, record)
        return {"vmid": vmid}

    def destroy_vm(self, vmid: int) -> dict[str, Any]:
        record = self._stopped(vmid, "destroy")
        data = sorted(k for k in record["config"] if k.startswith(DATA_KEYS) and k not in ("scsi0",))
        if data:
            raise DeployError(f"local VM {vmid} still has {', '.join(data)}: not destroyed")
        vmdir = self.vm_dir(vmid)
        for path in sorted(vmdir.iterdir(), reverse=True):
            if path.is_file() or path.is_socket() or path.is_symlink():
                path.unlink()
        vmdir.rmdir()
        return {"vmid": vmid, "destroyed": True}


# --- a local deploy -------------------------------------------------------------------------------------------------


def plan_local(settings: Settings, role: str, site_path: Path, secrets_path: Path | None, *, image: Path | None = None,
               swap: bool = False, bridge: str | None = None, accel: str | None = None, memory_mb: int | None = None,
               keep: int = KEEP_ROLLBACKS) -> tuple[DeployPlan, bool, LocalProvider, Journal]:
    """The deploy engine's plan (or the unfinished one it resumes) for this machine: the site completed for a local
    deploy, the seed of a local VM, the local journal. The data volumes are made (once) when a VM is created."""
    site = load_site(site_path)
    journal = Journal(journal_path(settings, role))
    pending = resumable_plan(journal, image)
    if pending is not None:  # resumed as planned: on the bridge its VMs were created on
        planned = planned_bridge(pending)
        if bridge is not None and bridge != planned:
            raise DeployError(f"deploy {pending.deploy_id} of {role} is unfinished on bridge {planned or 'none'}: "
                              "rerun without --bridge to resume it there (or add --abandon to undo it)")
        bridge = planned
    provider = LocalProvider(settings, role, user=site.admin_user, bridge=bridge, accel=accel, memory_mb=memory_mb)
    if pending is not None:
        return pending, True, provider, journal
    seed = local_seed(settings, site, role, load_secrets(secrets_path), bridge)
    plan = plan_deploy(settings, site_for_local_deploy(settings, site, role, bridge), role, image, swap,
                       provider=provider, seed=seed, keep=keep)
    return plan, False, provider, journal


def deploy_local(settings: Settings, role: str, site_path: Path, secrets_path: Path | None, *,
                 image: Path | None = None, swap: bool = False, bridge: str | None = None, accel: str | None = None,
                 memory_mb: int | None = None, keep: int = KEEP_ROLLBACKS,
                 on_step: Callable[[str], None] | None = None) -> Outcome:
    """`homelab rehearse`: the same first deploy or swap as on Proxmox VE, with QEMU VMs on this machine."""
    plan, _resumed, provider, journal = plan_local(settings, role, site_path, secrets_path, image=image, swap=swap,
                                                   bridge=bridge, accel=accel, memory_mb=memory_mb, keep=keep)
    return execute(plan, provider, journal, on_step)


def abandon_local(settings: Settings, role: str, site_path: Path, *, accel: str | None = None,
                  memory_mb: int | None = None, on_step: Callable[[str], None] | None = None) -> tuple[Outcome, str]:
    """`homelab rehearse ROLE --abandon`: undo the unfinished local deploy (deploy.abandon) on the bridge its plan
    names, so blue comes back where it served."""
    journal = Journal(journal_path(settings, role))
    plan = unfinished_plan(journal, role)
    provider = LocalProvider(settings, role, user=load_site(site_path).admin_user, bridge=planned_bridge(plan),
                             accel=accel, memory_mb=memory_mb)
    return abandon(journal, role, provider, on_step)


def planned_bridge(plan: DeployPlan) -> str | None:
    """The local bridge a plan's VMs are on (None: QEMU's user network only)."""
    create = next((s for s in plan.steps if s.action == "create_vm"), None)
    bridge = str(create.args["bridge"]) if create is not None else "none"
    return None if bridge == "none" else bridge


def abandon_local_steps(settings: Settings, role: str) -> list[str]:
    """What `homelab rehearse ROLE --abandon` would still do (--dry-run)."""
    return abandon_steps(Journal(journal_path(settings, role)), role)
