"""`homelab boot|down`: run a built image locally under QEMU with a NoCloud seed, controlled through QMP.

The built image is never written to: the VM runs on a qcow2 overlay in build/<role>/run/. KVM is used
when a guest really boots under it; where /dev/kvm exists but guests hang (nested setups), the first
boot finds out by trying, falls back to TCG and remembers that for this host kernel and QEMU.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from . import qmp
from .build import built_image
from .cloudinit import HostNetwork, primary_address, render_seed, write_seed_iso
from .errors import BootError, GuestPanic, HomelabError
from .localvolumes import EPHEMERAL_FILE
from .progress import Reporter, Silent
from .runner import require_tool, run, start
from .settings import Settings
from .site import Site, load_secrets, load_site

T = TypeVar("T")
# QEMU user networking: the guest's fixed address, gateway and DNS, given to it as static config.
QEMU_USER_NETWORK = HostNetwork(address="10.0.2.15/24", gateway="10.0.2.2", dns=["10.0.2.3"])
QEMU_USER_HOST = "10.0.2.2/32"
# The host logs in through QEMU's user network (forwarded ssh), which the guest sees coming from 10.0.2.2:
# a local VM counts this machine as part of its LAN zone, or the firewall would shut the tool out.
LOCAL_ZONES = {"lan": [QEMU_USER_HOST]}
# With a second NIC on a bridge, each NIC is pinned to its MAC (locally administered, fixed per role).
USER_NIC_MAC = "52:54:00:00:02:0f"
# Under KVM the kernel prints within seconds; no output by then means KVM guests hang on this host.
KVM_PROBE_SECONDS = 25
KERNEL_MARKERS = ("Linux version", "Booting Linux", "systemd[1]")
SERIAL_TAIL_LINES = 15
# What the kernel prints when it stops for good: a guest that printed it will never answer ssh.
PANIC_MARKER = "Kernel panic - not syncing"
# Boots tried when the guest kernel panics. Under TCG with 2 vCPUs, QEMU 7.2 races the kernel's live code patching
# early in boot (an int3 left in sched_clock_cpu right after "sched_clock: Marking stable": Oops, panic): 1 boot in
# 20 of one image here, and 2 CI runs; the same image boots the next time. An image that cannot boot panics each time.
PANIC_ATTEMPTS = 3
# The kernel has finished its own initialisation (where those panics happen) once it starts init.
INIT_MARKER = "as init process"
EARLY_BOOT_SECONDS = 180


@dataclass
class VMState:
    role: str
    pid: int
    accel: str
    image: str
    version: str
    ssh_port: int
    user: str
    hostname: str
    address: str
    run_dir: str
    # Measured from QEMU's start: first ssh login, cloud-init done (0 until reached).
    ssh_seconds: float = 0.0
    cloud_init_seconds: float = 0.0
    # The tap device on a host bridge (BootOptions.bridge), removed by `stop`; "" without one.
    tap: str = ""

    @property
    def ssh_config(self) -> Path:
        return Path(self.run_dir) / "ssh_config"

    @property
    def ssh_alias(self) -> str:
        return f"homelab-{self.role}"

    @property
    def qmp_socket(self) -> Path:
        return Path(self.run_dir) / "qmp.sock"

    @property
    def qga_socket(self) -> Path:
        return Path(self.run_dir) / "qga.sock"

    @property
    def serial_log(self) -> Path:
        return Path(self.run_dir) / "serial.log"


def run_dir(settings: Settings, role: str) -> Path:
    return settings.role_dir(role) / "run"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return "qemu" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def running_vm(settings: Settings, role: str) -> VMState | None:
    """The local VM of a role if its QEMU is still running."""
    try:
        state = VMState(**json.loads((run_dir(settings, role) / "state.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return state if _alive(state.pid) else None


def _serial_text(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""


def panic_line(path: Path) -> str | None:
    """The kernel's panic line in a serial log, or None while the guest has not panicked."""
    return _panic_in(_serial_text(path))


def _panic_in(text: str) -> str | None:
    found = text.find(PANIC_MARKER)
    if found < 0:
        return None
    return text[found:].splitlines()[0].strip()


def serial_tail(path: Path, lines: int = SERIAL_TAIL_LINES) -> str:
    clean = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", _serial_text(path))
    kept = [line.strip() for line in clean.splitlines() if line.strip()][-lines:]
    return " | ".join(kept) or "(no serial output)"


# --- accelerator ---------------------------------------------------------------------------------


def _accel_cache(settings: Settings) -> Path:
    return settings.cache_dir / "accel.json"


def _host_key() -> str:
    return f"{platform.release()}"


def choose_accel(settings: Settings, forced: str | None) -> str:
    """kvm, unless forced, /dev/kvm is unusable, or a previous boot on this host found KVM guests hang."""
    if forced:
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    try:
        known = json.loads(_accel_cache(settings).read_text())
    except (OSError, ValueError):
        known = {}
    return "tcg" if known.get(_host_key()) == "kvm-hangs" else "kvm"


def remember_kvm_hangs(settings: Settings) -> None:
    path = _accel_cache(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known[_host_key()] = "kvm-hangs"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(known, indent=2) + "\n")
    os.replace(tmp, path)


# --- boot ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def ensure_ssh_key(settings: Settings) -> Path:
    """The key the tool logs into local VMs with (build/ssh/id_ed25519), made once."""
    key = settings.build_dir / "ssh" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "homelab-local", "-f", str(key)])
    return key


def tap_name(role: str) -> str:
    return f"hl-{role}"[:15]  # IFNAMSIZ


def bridge_mac(role: str) -> str:
    digest = hashlib.sha256(role.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def _nic_argv(tap: str, role: str) -> list[str]:
    if not tap:
        return ["-device", "virtio-net-pci,netdev=net0,romfile="]
    # romfile= : no iPXE option ROM, the VMs never boot from the network.
    return [
        "-device", f"virtio-net-pci,netdev=net0,mac={USER_NIC_MAC},romfile=",
        "-netdev", f"tap,id=net1,ifname={tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=net1,mac={bridge_mac(role)},romfile=",
    ]


def qemu_argv(rundir: Path, accel: str, memory_mb: int, cores: int, ssh_port: int, tap: str = "",
              extra: Sequence[str] = ()) -> list[str]:
    """QEMU for a run directory build/<role>/<run dir>; `extra` adds devices (the local provider's volumes)."""
    role = rundir.parent.name
    return [
        "qemu-system-x86_64",
        "-name", f"homelab-{role}",
        "-machine", "pc",
        "-accel", accel,
        "-cpu", "host" if accel == "kvm" else "max",
        "-m", str(memory_mb),
        "-smp", str(cores),
        "-nodefaults",
        "-display", "none",
        "-serial", f"file:{rundir / 'serial.log'}",
        # The root disk is the boot device by name: with data disks attached (the local provider's) SeaBIOS would
        # otherwise try a blank one first, then the NICs' iPXE, and hang silently (nothing reaches the serial).
        "-drive", f"file={rundir / 'overlay.qcow2'},if=none,id=root,format=qcow2,discard=unmap",
        "-device", "virtio-blk-pci,drive=root,bootindex=0",
        "-drive", f"file={rundir / 'seed.iso'},media=cdrom,if=ide,readonly=on",
        "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        *_nic_argv(tap, role),
        "-device", "virtio-rng-pci",
        # A GPU with a DRM render node (/dev/dri/renderD128) for kernels that have DRM: what the intranet's
        # Jellyfin is given on Proxmox (the passed-through Intel GPU) exists locally too, minus VAAPI.
        "-device", "virtio-gpu-pci",
        # The guest agent's port: the same name Proxmox gives it.
        "-chardev", f"socket,id=qga0,path={rundir / 'qga.sock'},server=on,wait=off",
        "-device", "virtio-serial-pci",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-qmp", f"unix:{rundir / 'qmp.sock'},server=on,wait=off",
        "-pidfile", str(rundir / "qemu.pid"),
        *extra,
    ]


def _write_ssh_config(state: VMState, key: Path) -> None:
    state.ssh_config.write_text(
        f"Host {state.ssh_alias}\n"
        f"  HostName 127.0.0.1\n  Port {state.ssh_port}\n  User {state.user}\n"
        f"  IdentityFile {key}\n  IdentitiesOnly yes\n"
        # A new VM has new host keys on the same forwarded port: nothing to pin locally.
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
        "  ConnectTimeout 5\n  BatchMode yes\n"
    )


def ssh_argv(state: VMState, command: str) -> list[str]:
    return ["ssh", "-F", str(state.ssh_config), state.ssh_alias, command]


@dataclass
class BootOptions:
    site_path: Path
    secrets_path: Path | None = None
    image: Path | None = None
    accel: str | None = None
    memory_mb: int | None = None
    cores: int | None = None
    boot_timeout: float = 600
    wait_cloud_init: bool = True
    # A host bridge to put the VM on with the site's address (a second NIC; ssh stays on QEMU's user network).
    bridge: str | None = None


def guest_networks(site: Site, role: str, bridge: str | None) -> list[HostNetwork]:
    """QEMU's user network alone, or with a bridge: the site's address and gateway there, the user network
    kept on-link for the forwarded ssh."""
    if bridge is None:
        return [QEMU_USER_NETWORK]
    host = site.host(role)
    return [
        HostNetwork(QEMU_USER_NETWORK.address, None, [], name="eth0", mac=USER_NIC_MAC),
        HostNetwork(host.address, site.gateway, list(site.dns), name="eth1", mac=bridge_mac(role)),
    ]


def boot(settings: Settings, role: str, options: BootOptions, reporter: Reporter | None = None) -> VMState:
    reporter = reporter or Silent()
    if running_vm(settings, role) is not None:
        raise HomelabError(f"a local {role} VM is already running: `homelab down {role}` first")
    image, manifest = built_image(settings, role, options.image, BootError)
    site = load_site(options.site_path)
    secrets = load_secrets(options.secrets_path)
    rundir = run_dir(settings, role)
    networks = guest_networks(site, role, options.bridge)
    with reporter.step("Prepare seed and overlay"):
        key = ensure_ssh_key(settings)
        _prepare_run_dir(settings, role, rundir, image, site, secrets, key, networks)
    tap = _create_tap(role, options.bridge) if options.bridge else ""
    try:
        state = boot_again_after_panic(
            lambda: _boot_vm(settings, role, options, reporter, VMState(
                role=role, pid=0, accel=choose_accel(settings, options.accel), image=str(image),
                version=manifest["version"], ssh_port=_free_port(), user=site.admin_user,
                hostname=site.host(role).hostname, address=primary_address(networks), run_dir=str(rundir), tap=tap,
            ), key, manifest),
            lambda panic: _fresh_start(image, rundir, role, options.bridge, reporter, panic))
    except BaseException:
        if running_vm(settings, role) is None:  # a VM left running (Ctrl-C) keeps its NIC until `homelab down`
            _remove_tap(tap)
        raise
    _state_path(state).write_text(json.dumps(asdict(state), indent=2) + "\n")
    return state


def _boot_vm(settings: Settings, role: str, options: BootOptions, reporter: Reporter, state: VMState, key: Path,
             manifest: dict[str, Any]) -> VMState:
    memory = options.memory_mb or min(manifest["vm"]["memory_mb"], 4096)
    cores = options.cores or min(manifest["vm"]["cores"], os.cpu_count() or 1)
    _write_ssh_config(state, key)
    with reporter.step(f"Start QEMU ({state.accel})"):
        state = _start_qemu(settings, state, memory, cores, options.accel is None, reporter)
    started = time.monotonic()
    reporter.info(f"accelerator: {state.accel}" + (" (KVM guests hang on this host)" if state.accel == "tcg" else ""))
    try:
        with reporter.step("Wait for ssh"):
            _wait_for_ssh(state, options.boot_timeout, reporter)
        state.ssh_seconds = round(time.monotonic() - started, 1)
        if options.wait_cloud_init:
            with reporter.step("Wait for cloud-init"):
                _wait_for_cloud_init(state, options.boot_timeout)
            state.cloud_init_seconds = round(time.monotonic() - started, 1)
    except GuestPanic:
        stop(settings, role, timeout=0)  # a panicked kernel does not answer ACPI: quit at once
        raise
    except HomelabError:
        stop(settings, role)
        raise
    return state


def _prepare_run_dir(
    settings: Settings, role: str, rundir: Path, image: Path, site: Site, secrets: dict[str, dict[str, str]], key: Path,
    networks: list[HostNetwork], extra_files: Sequence[Mapping[str, str]] = (EPHEMERAL_FILE,),
) -> None:
    # `homelab boot` attaches no data volumes: the image is told so (EPHEMERAL_FILE) and mounts none. The local
    # provider (builder/localprovider.py) attaches them and passes its own markers.
    seed = render_seed(
        settings.project, role, site, secrets,
        networks=networks, extra_ssh_keys=[Path(f"{key}.pub").read_text().strip()], extra_zones=LOCAL_ZONES,
        extra_files=extra_files,
    )
    rundir.mkdir(parents=True, exist_ok=True)
    for stale in ("overlay.qcow2", "serial.log", "qmp.sock", "qga.sock", "qemu.pid", "state.json"):
        (rundir / stale).unlink(missing_ok=True)
    write_seed_iso(seed, rundir / "seed.iso")
    _create_overlay(image, rundir)


def _create_overlay(image: Path, rundir: Path) -> None:
    """A fresh, empty overlay on the built image (replacing any earlier one): the guest's first boot."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.resolve()), "-F", "qcow2",
         str(rundir / "overlay.qcow2")])


def _fresh_start(image: Path, rundir: Path, role: str, bridge: str | None, reporter: Reporter,
                 panic: GuestPanic) -> None:
    """What a boot again needs after a panicked one (stopped): a fresh overlay, and the tap device `stop` removed."""
    reporter.info(f"{panic}: booting again from a fresh overlay")
    _create_overlay(image, rundir)
    if bridge:
        _create_tap(role, bridge)


def boot_again_after_panic(attempt: Callable[[], T], after_panic: Callable[[GuestPanic], None],
                           attempts: int = PANIC_ATTEMPTS) -> T:
    """Boot; each time the guest kernel panics, `after_panic` makes a clean start possible (a fresh overlay, the
    panicked QEMU gone) and it boots again, up to `attempts` boots. The last panic is the error; any other error
    is not retried."""
    for _ in range(attempts - 1):
        try:
            return attempt()
        except GuestPanic as panic:
            after_panic(panic)
    return attempt()


def kernel_initialised(state: VMState, timeout: float = EARLY_BOOT_SECONDS) -> str | None:
    """Wait until the guest kernel starts init; the panic line if it panicked first. A QEMU that exits or a
    kernel still initialising after `timeout` is left to whoever waits for the guest next."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(state.pid):
        text = _serial_text(state.serial_log)  # one read per poll for both markers
        panic = _panic_in(text)
        if panic is not None:
            return panic
        if INIT_MARKER in text:
            return None
        time.sleep(0.5)
    return None


def _launch(state: VMState, memory: int, cores: int) -> VMState:
    require_tool("qemu-system-x86_64")
    rundir = Path(state.run_dir)
    for stale in ("serial.log", "qmp.sock", "qga.sock"):
        (rundir / stale).unlink(missing_ok=True)
    with (rundir / "qemu.log").open("w") as qemu_log:
        proc = start(qemu_argv(rundir, state.accel, memory, cores, state.ssh_port, state.tap), stdout=qemu_log)
    state.pid = proc.pid
    try:
        qmp.wait_for_monitor(state.qmp_socket, 30, lambda: proc.poll() is None)
    except BootError:
        # Never leave a QEMU running without a state file (down could not find it, boot would reuse its overlay).
        proc.kill()
        proc.wait()
        log_text = (rundir / "qemu.log").read_text(errors="replace").strip().splitlines()[-3:]
        raise BootError(f"QEMU did not start: {' | '.join(log_text) or 'no output'}") from None
    _state_path(state).write_text(json.dumps(asdict(state), indent=2) + "\n")
    return state


def _state_path(state: VMState) -> Path:
    return Path(state.run_dir) / "state.json"


def kernel_runs(state: VMState) -> bool:
    """Whether the guest kernel printed on the serial console within KVM_PROBE_SECONDS (KVM guests that hang
    print nothing)."""
    deadline = time.monotonic() + KVM_PROBE_SECONDS
    while time.monotonic() < deadline:
        text = _serial_text(state.serial_log)
        if any(marker in text for marker in KERNEL_MARKERS):
            return True
        time.sleep(0.5)
    return False


def launch_with_fallback(settings: Settings, accel: str, may_fall_back: bool, launch: Callable[[str], VMState],
                         halt: Callable[[VMState], object]) -> VMState:
    """Launch under `accel`. Under a KVM nobody forced, fall back to TCG (and remember it for this host) when QEMU
    dies starting or the guest kernel prints nothing: /dev/kvm answering does not mean KVM works (nested hosts:
    guests hang silently, or QEMU aborts setting an MSR)."""
    if accel != "kvm" or not may_fall_back:
        return launch(accel)
    try:
        state = launch("kvm")
    except BootError:
        pass  # QEMU exited at start under KVM
    else:
        if kernel_runs(state):
            return state
        halt(state)
    remember_kvm_hangs(settings)
    return launch("tcg")


def _start_qemu(settings: Settings, state: VMState, memory: int, cores: int, may_fall_back: bool,
                reporter: Reporter) -> VMState:
    if state.accel == "kvm" and may_fall_back:
        reporter.update("checking that the guest kernel runs under KVM")
    return launch_with_fallback(settings, state.accel, may_fall_back,
                                lambda accel: _launch(replace(state, accel=accel), memory, cores),
                                lambda running: _kill(running.pid))


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(50):
        if not _alive(pid):
            return
        time.sleep(0.1)


def _wait_for_ssh(state: VMState, timeout: float, reporter: Reporter) -> None:
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    while time.monotonic() < deadline:
        panic = panic_line(state.serial_log)  # first: a kernel booted with panic=N makes QEMU exit after it
        if panic is not None:
            raise GuestPanic(f"the {state.role} VM's kernel panicked {time.monotonic() - started:.0f} s into "
                             f"its boot ({state.accel}): {panic}")
        if not _alive(state.pid):
            raise BootError(f"QEMU exited while booting; serial log: {serial_tail(state.serial_log)}")
        result = run(ssh_argv(state, "true"), check=False, timeout=20)
        if result.returncode == 0:
            return
        reporter.update(f"no ssh yet ({time.monotonic() - started:.0f} s)")
        time.sleep(2)
    raise BootError(f"no ssh after {timeout:.0f} s; serial log: {serial_tail(state.serial_log)}")


def _wait_for_cloud_init(state: VMState, timeout: float) -> None:
    # Exit 0: done; 2: done with recoverable errors (verify reports those); 1: failed.
    result = run(ssh_argv(state, "cloud-init status --wait"), check=False, timeout=timeout)
    if result.returncode == 1:
        detail = run(ssh_argv(state, "cloud-init status --long"), check=False, timeout=30).stdout
        raise BootError(f"cloud-init failed in the {state.role} VM: {' | '.join(detail.strip().splitlines()[-4:])}")


# --- stop ------------------------------------------------------------------------------------------


def stop(settings: Settings, role: str, timeout: float = 60) -> bool:
    """ACPI power-down through QMP, waiting up to timeout; then quit. False when no VM was running."""
    state = running_vm(settings, role)
    if state is None:
        return False
    if not qmp.powerdown(state.qmp_socket, timeout):
        _quit(state)
    for _ in range(int(timeout * 10)):
        if not _alive(state.pid):
            break
        time.sleep(0.1)
    else:
        _quit(state)
        _kill(state.pid)
    _state_path(state).unlink(missing_ok=True)
    _remove_tap(state.tap)
    return True


# --- bridge ----------------------------------------------------------------------------------------


def _create_tap(role: str, bridge: str) -> str:
    """A tap device for the VM's second NIC, enslaved to `bridge` (which the caller made, e.g. a test network)."""
    if not Path(f"/sys/class/net/{bridge}/bridge").is_dir():
        raise BootError(f"bridge {bridge} does not exist (ip link add {bridge} type bridge)")
    tap = tap_name(role)
    _remove_tap(tap)
    run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
    run(["ip", "link", "set", "dev", tap, "master", bridge, "up"])
    return tap


def _remove_tap(tap: str) -> None:
    if tap and Path(f"/sys/class/net/{tap}").exists():
        run(["ip", "link", "del", "dev", tap], check=False)


def _quit(state: VMState) -> None:
    try:
        qmp.execute(state.qmp_socket, "quit", timeout=5)
    except BootError:
        _kill(state.pid)
