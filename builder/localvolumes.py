"""Data volumes of a role on this machine (the local provider) and how the image finds them.

The image side (images/files/common/homelab-volumes, homelab-volumes.service) mounts each volume of the
definition, baked by the build as /etc/homelab/volumes.json, at its mount point before the stack starts:

- a `disk` volume is a qcow2 file, build/<role>/volumes/<name>.qcow2, created once (sparse) and never deleted by
  the tool. QEMU gives it to the guest as virtio-blk with `serial=<name>`: /dev/disk/by-id/virtio-<name>. On
  Proxmox VE the same serial on a virtio or virtio-scsi disk gives virtio-<name> or
  scsi-0QEMU_QEMU_HARDDISK_<name>; the guest looks for both. ext4, made only on a blank device.
- a `share` volume is a directory, build/<role>/volumes/<name>/, exported by one virtiofsd per VM and share with
  the virtiofs tag <name>. On Proxmox VE the tag is the directory mapping's ID (the site's
  hosts.<role>.volumes.<name>.mapping); cloud-init then writes /etc/homelab/volume-tags.json {name: tag}.

Snapshots (the swap snapshots the disks green is about to run with; a rollback restores them): qcow2 internal
snapshots (`qemu-img snapshot -c/-a/-d` while no QEMU has the file open; QMP blockdev-snapshot-internal-sync and
its delete while one does). The file keeps its path, the VM's
command line never changes, a restore is in place and no chain grows: the shape of a ZFS snapshot and rollback of a
zvol on Proxmox VE. A backing-file (overlay) snapshot would move the live data to a new file at every swap, and the
chain would have to be tracked, pointed at and flattened. Shares are not snapshotted by a swap (as on Proxmox VE,
where a directory mapping has no snapshot call): the backups cover them.

Share lock: build/<role>/volumes/<name>.lock names the VM whose guest may mount a share: the running VM holding the
production identity (its NIC's link up; an isolated green has the share attached, its virtiofsd running, and mounts
nothing). A second VM is refused while the holder's QEMU runs; a dead holder's entry is stale and replaced.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .definition import ImageDefinition
from .errors import HomelabError
from .runner import run
from .settings import Settings

VOLUMES_DEST = "/etc/homelab/volumes.json"
# cloud-init markers (written through render_seed's extra_files):
EPHEMERAL_PATH = "/etc/homelab/volumes.ephemeral"  # `homelab boot` without volumes: mount nothing
TAGS_PATH = "/etc/homelab/volume-tags.json"  # share name -> virtiofs tag when they differ (Proxmox VE)
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"  # Debian 12's QEMU 7.2 ships the C virtiofsd here
LOCAL_DISK_SIZE = "32G"  # sparse: a qcow2 takes only what the guest writes
SNAPSHOT_PREFIX = "homelab-"
KEEP_SNAPSHOTS = 3


class ShareBusyError(HomelabError):
    """A share is held by another running VM."""


@dataclass(frozen=True)
class Volume:
    name: str
    kind: str  # disk | share
    mount: str
    read_only: bool = False


def volumes_of(definition: ImageDefinition) -> list[Volume]:
    return [Volume(v["name"], v["kind"], v["mount"], bool(v["read_only"])) for v in definition["volumes"]]


def volumes_json(definition: ImageDefinition) -> str:
    """/etc/homelab/volumes.json: what homelab-volumes mounts, in the definition's order."""
    entries = [{"name": v.name, "kind": v.kind, "mount": v.mount, "read_only": v.read_only}
               for v in volumes_of(definition)]
    return json.dumps({"volumes": entries}, indent=2) + "\n"


def volume_tags_file(volumes: Mapping[str, Mapping[str, str | None]]) -> dict[str, str] | None:
    """The cloud-init file naming each share's virtiofs tag where it is not the volume's name (Proxmox VE: the
    directory mapping's ID, the site's hosts.<role>.volumes.<name>.mapping), for render_seed(extra_files=...);
    None when every tag is the name (the local provider)."""
    tags = {name: str(place["mapping"]) for name, place in sorted(volumes.items())
            if place.get("mapping") and place["mapping"] != name}
    if not tags:
        return None
    return {"path": TAGS_PATH, "permissions": "0644", "content": json.dumps(tags, indent=2, sort_keys=True) + "\n"}


def marker_file(path: str, why: str) -> dict[str, str]:
    """A cloud-init file for render_seed(extra_files=...)."""
    return {"path": path, "permissions": "0644", "content": why + "\n"}


EPHEMERAL_FILE = marker_file(EPHEMERAL_PATH, "local boot without data volumes (homelab boot)")


# --- places -----------------------------------------------------------------------------------------------------


def volumes_dir(settings: Settings, role: str) -> Path:
    return settings.role_dir(role) / "volumes"


def disk_path(settings: Settings, role: str, name: str) -> Path:
    return volumes_dir(settings, role) / f"{name}.qcow2"


def share_path(settings: Settings, role: str, name: str) -> Path:
    return volumes_dir(settings, role) / name


def lock_path(settings: Settings, role: str, name: str) -> Path:
    return volumes_dir(settings, role) / f"{name}.lock"


# --- commands (pure) --------------------------------------------------------------------------------------------


def qemu_img_create_argv(path: Path, size: str = LOCAL_DISK_SIZE) -> list[str]:
    return ["qemu-img", "create", "-q", "-f", "qcow2", str(path), size]


def snapshot_create_argv(path: Path, snapshot: str) -> list[str]:
    return ["qemu-img", "snapshot", "-c", snapshot, str(path)]


def snapshot_apply_argv(path: Path, snapshot: str) -> list[str]:
    return ["qemu-img", "snapshot", "-a", snapshot, str(path)]


def snapshot_delete_argv(path: Path, snapshot: str) -> list[str]:
    return ["qemu-img", "snapshot", "-d", snapshot, str(path)]


def qemu_img_info_argv(path: Path) -> list[str]:
    # -U: readable while a QEMU holds the image (listing only).
    return ["qemu-img", "info", "-U", "--output=json", str(path)]


def snapshot_names(info: dict[str, Any]) -> list[str]:
    """The tool's snapshots in a `qemu-img info --output=json`, oldest first."""
    snaps = sorted(info.get("snapshots", []), key=lambda s: (s.get("date-sec", 0), s.get("date-nsec", 0)))
    return [s["name"] for s in snaps if str(s.get("name", "")).startswith(SNAPSHOT_PREFIX)]


def virtiofsd_argv(socket: Path, source: Path) -> list[str]:
    """One virtiofsd per VM and share (as measured here: the C virtiofsd of QEMU 7.2, cache=auto). It has no
    read-only export: read_only shares are mounted read-only by the guest."""
    return [VIRTIOFSD, f"--socket-path={socket}", "-o", f"source={source}", "-o", "cache=auto"]


def _opt(value: str | Path) -> str:
    """A value inside QEMU's key=value option syntax (a comma is doubled)."""
    return str(value).replace(",", ",,")


def node_name(name: str) -> str:
    return f"vol-{name}"


def share_qemu_argv(memory_mb: int, shares: Sequence[tuple[str, Path]]) -> list[str]:
    """Shared guest memory (vhost-user needs it) and one vhost-user-fs device per (name, virtiofsd socket)."""
    if not shares:
        return []
    argv = ["-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on", "-numa", "node,memdev=mem"]
    for name, socket in shares:
        argv += ["-chardev", f"socket,id=fs-{name},path={_opt(socket)}",
                 "-device", f"vhost-user-fs-pci,chardev=fs-{name},tag={name},id=fs-{name}"]
    return argv


def disk_qemu_argv(name: str, path: Path, read_only: bool) -> list[str]:
    """A disk volume present from boot (first deploy, rollback): the same node and device as a hot-plug."""
    ro = "on" if read_only else "off"
    return ["-blockdev", f"driver=qcow2,node-name={node_name(name)},read-only={ro},"
                         f"file.driver=file,file.filename={_opt(path)}",
            "-device", f"virtio-blk-pci,drive={node_name(name)},serial={name},id={node_name(name)}"]


QmpCommand = tuple[str, dict[str, Any]]


def hotplug_disk_commands(name: str, path: Path, read_only: bool) -> list[QmpCommand]:
    """QMP to plug a disk volume into a running VM (measured here: the guest sees /dev/disk/by-id/virtio-NAME)."""
    return [
        ("blockdev-add", {"driver": "qcow2", "node-name": node_name(name), "read-only": read_only,
                          "file": {"driver": "file", "filename": str(path)}}),
        ("device_add", {"driver": "virtio-blk-pci", "id": node_name(name), "drive": node_name(name),
                        "serial": name}),
    ]


def unplug_disk_commands(name: str) -> list[QmpCommand]:
    """QMP to take a disk volume out: device_del (the guest acknowledges, DEVICE_DELETED) then blockdev-del."""
    return [("device_del", {"id": node_name(name)}), ("blockdev-del", {"node-name": node_name(name)})]


def set_link_command(netdev: str, up: bool) -> QmpCommand:
    return ("set_link", {"name": netdev, "up": up})


# --- creating and snapshotting ------------------------------------------------------------------------------------


def ensure_volumes(settings: Settings, role: str, volumes: Sequence[Volume]) -> list[Path]:
    """Create what does not exist yet (an empty qcow2, an empty directory); never touch what does."""
    made = []
    base = volumes_dir(settings, role)
    base.mkdir(parents=True, exist_ok=True)
    for volume in volumes:
        if volume.kind == "disk":
            path = disk_path(settings, role, volume.name)
            if not path.exists():
                run(qemu_img_create_argv(path))
                made.append(path)
        else:
            path = share_path(settings, role, volume.name)
            if not path.exists():
                path.mkdir(mode=0o755)
                made.append(path)
    return made


def snapshot_tag(snapshot: str) -> str:
    return snapshot if snapshot.startswith(SNAPSHOT_PREFIX) else SNAPSHOT_PREFIX + snapshot


def disk_snapshots(path: Path) -> list[str]:
    return snapshot_names(json.loads(run(qemu_img_info_argv(path)).stdout))


def snapshot_disk(path: Path, snapshot: str) -> None:
    """Snapshot one disk volume (no QEMU may have it open) and prune the tool's older ones past KEEP_SNAPSHOTS."""
    snapshot = snapshot_tag(snapshot)
    run(snapshot_create_argv(path, snapshot))
    for old in stale_snapshots(path):
        run(snapshot_delete_argv(path, old))


def stale_snapshots(path: Path) -> list[str]:
    """The tool's snapshots of a disk past the newest KEEP_SNAPSHOTS, oldest first: what a new snapshot prunes."""
    return disk_snapshots(path)[:-KEEP_SNAPSHOTS]


def restore_disk(path: Path, snapshot: str) -> None:
    """Put a disk volume back as it was at `snapshot` (no QEMU may have it open)."""
    run(snapshot_apply_argv(path, snapshot_tag(snapshot)))


def delete_disk_snapshot(path: Path, snapshot: str) -> None:
    run(snapshot_delete_argv(path, snapshot_tag(snapshot)))


def create_snapshot_command(name: str, snapshot: str) -> QmpCommand:
    """QMP taking a disk volume's internal snapshot while a running QEMU holds the disk (its node is the root)."""
    return ("blockdev-snapshot-internal-sync", {"device": node_name(name), "name": snapshot_tag(snapshot)})


def delete_snapshot_command(name: str, snapshot: str) -> QmpCommand:
    """QMP deleting a disk volume's internal snapshot while a running QEMU holds the disk (its node is the root)."""
    return ("blockdev-snapshot-delete-internal-sync", {"device": node_name(name), "name": snapshot_tag(snapshot)})


# --- share locks --------------------------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """The process runs (a zombie, exited but not yet reaped by the tool that started it, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@contextmanager
def _locked(path: Path) -> Iterator[dict[str, Any]]:
    """The lock file's content, rewritten on exit, under an flock (two tools at once cannot both win)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        text = handle.read()
        try:
            state: dict[str, Any] = json.loads(text) if text.strip() else {}
        except ValueError:
            state = {}
        state.setdefault("holder", None)
        yield state
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(state, indent=2, sort_keys=True) + "\n")
        handle.flush()


def _live(entry: dict[str, Any] | None, alive: Callable[[int], bool]) -> dict[str, Any] | None:
    return entry if entry is not None and alive(int(entry.get("pid", 0))) else None


def acquire_share(path: Path, vm: str, pid: int, *, alive: Callable[[int], bool] = pid_alive) -> None:
    """Take a share for `vm` (whose QEMU, or the tool starting it, is `pid`). Refused while another VM's process
    lives; the entry of a dead one is stale and replaced."""
    with _locked(path) as state:
        holder = _live(state["holder"], alive)
        if holder is not None and holder["vm"] != vm:
            raise ShareBusyError(f"share {path.stem} is held by the running VM {holder['vm']} (pid {holder['pid']}): "
                                 "stop it first, two VMs never hold one share")
        state["holder"] = {"vm": vm, "pid": pid}


def release_share(path: Path, vm: str) -> None:
    """`vm` lets go of the share; another VM's entry is left alone."""
    if not path.exists():
        return
    with _locked(path) as state:
        if state["holder"] is not None and state["holder"]["vm"] == vm:
            state["holder"] = None


def share_holders(path: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"holder": None}
    return state
