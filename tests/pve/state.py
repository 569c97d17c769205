"""The emulated node's state: storages and volumes, VMs, snapshots, guest agents, tasks, tokens and ACLs.

Everything lives in plain dataclasses a test can read and change directly (`emulator.state`); the HTTP
handlers (handlers.py) only go through the helpers here. One lock serialises all changes.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Every privilege of PVE 8.4 (pve-access-control, PVE::AccessControl's $privgroups + special privileges).
ALL_PRIVILEGES = frozenset(
    [
        "Datastore.Allocate", "Datastore.AllocateSpace", "Datastore.AllocateTemplate", "Datastore.Audit",
        "Group.Allocate", "Mapping.Audit", "Mapping.Modify", "Mapping.Use", "Permissions.Modify",
        "Pool.Allocate", "Pool.Audit", "Realm.Allocate", "Realm.AllocateUser", "SDN.Allocate", "SDN.Audit",
        "SDN.Use", "Sys.AccessNetwork", "Sys.Audit", "Sys.Console", "Sys.Incoming", "Sys.Modify",
        "Sys.PowerMgmt", "Sys.Syslog", "User.Modify", "VM.Allocate", "VM.Audit", "VM.Backup", "VM.Clone",
        "VM.Config.CDROM", "VM.Config.CPU", "VM.Config.Cloudinit", "VM.Config.Disk", "VM.Config.HWType",
        "VM.Config.Memory", "VM.Config.Network", "VM.Config.Options", "VM.Console", "VM.Migrate", "VM.Monitor",
        "VM.PowerMgmt", "VM.Snapshot", "VM.Snapshot.Rollback",
    ]
)

GiB = 1024**3
DEFAULT_SECRET = "0e8c5b1a-5c6d-4f0a-9d8e-3b2a1c0f9e8d"


@dataclass
class Volume:
    """One volume of a storage, as GET .../storage/{storage}/content lists it."""

    volid: str
    content: str
    format: str
    size: int
    vmid: int | None = None
    ctime: int = field(default_factory=lambda: int(time.time()))
    path: Path | None = None  # uploaded data, when there is some

    @property
    def storage(self) -> str:
        return self.volid.split(":", 1)[0]


@dataclass
class Storage:
    """A storage: `content` is what it may hold (PVE's storage.cfg `content` line)."""

    name: str
    type: str
    content: set[str]
    total: int = 100 * GiB
    snapshots: bool = True  # zfspool and qcow2 support snapshots; PVE refuses snapshots otherwise
    rename: bool = True  # volume_has_feature(rename), needed to move a disk to another VM
    volumes: dict[str, Volume] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return sum(v.size for v in self.volumes.values())

    def volume_name(self, vmid: int, suffix: str) -> str:
        """How PVE names a VM's volume: zfspool `vm-100-disk-0`, directory storages `100/vm-100-disk-0.qcow2`."""
        if self.type == "dir":
            return f"{self.name}:{vmid}/vm-{vmid}-{suffix}.qcow2"
        return f"{self.name}:vm-{vmid}-{suffix}"


@dataclass
class ExecResult:
    """What one guest-agent exec answers: exec-status says `exited: 0` for `polls` queries, then the result."""

    exitcode: int = 0
    out: str = ""
    err: str = ""
    polls: int = 0


@dataclass
class Agent:
    """A scripted QEMU guest agent: whether it answers, its interfaces, and exec answers by command line."""

    responding: bool = True
    interfaces: list[dict[str, object]] = field(default_factory=list)
    commands: dict[str, ExecResult] = field(default_factory=dict)
    unknown: ExecResult = field(default_factory=lambda: ExecResult(exitcode=127, err="command not found\n"))
    running: dict[int, tuple[ExecResult, int]] = field(default_factory=dict)

    def answer(self, command: list[str]) -> ExecResult:
        """The scripted result for a command: by its full line ("systemctl is-active x"), else by program."""
        line = " ".join(command)
        return self.commands.get(line) or self.commands.get(command[0] if command else "") or self.unknown


@dataclass
class Snapshot:
    name: str
    config: dict[str, str]
    description: str = ""
    parent: str | None = None
    snaptime: int = field(default_factory=lambda: int(time.time()))
    vmstate: bool = False


@dataclass
class Vm:
    """A VM as its config file holds it: `config` is what is in effect (the running VM's hardware), `pending`
    and `pending_delete` the file's [PENDING] section: new values, and keys to delete (key -> force), that
    qemu-server could not hot-plug and applies at the next start (see qemu.py, "pending changes")."""

    vmid: int
    node: str
    config: dict[str, str]
    status: str = "stopped"
    snapshots: dict[str, Snapshot] = field(default_factory=dict)
    agent: Agent = field(default_factory=Agent)
    pending: dict[str, str] = field(default_factory=dict)
    pending_delete: dict[str, bool] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.get("name", f"VM {self.vmid}")

    @property
    def digest(self) -> str:
        """SHA1 of the config file, as PVE's `digest`: the [PENDING] section is part of the file, so a pending
        change changes it too (the text differs from PVE's, the use does not)."""
        text = "".join(f"{k}: {v}\n" for k, v in sorted(self.config.items()))
        if self.pending or self.pending_delete:
            text += "\n[PENDING]\n" + "".join(f"{k}: {v}\n" for k, v in sorted(self.pending.items()))
            deletes = sorted(self.pending_delete.items())
            text += "delete: " + ",".join(("!" if force else "") + k for k, force in deletes)
        return hashlib.sha1(text.encode()).hexdigest()

    def with_pending(self) -> dict[str, str]:
        """The config with the pending changes taken in (PVE::AbstractConfig::load_current_config without
        `current`): what GET .../config shows by default and what the next start will run."""
        merged = {**self.config, **self.pending}
        for key in self.pending_delete:
            merged.pop(key, None)
        return merged

    @property
    def parent_snapshot(self) -> str | None:
        return self.config.get("parent")


@dataclass
class Task:
    """A worker task: `running` for `polls_left` status reads, then `stopped` with its exitstatus."""

    upid: str
    node: str
    type: str
    id: str
    user: str
    pid: int
    pstart: int
    starttime: int
    exitstatus: str = "OK"
    log: list[str] = field(default_factory=list)
    polls_left: int = 1

    @property
    def running(self) -> bool:
        return self.polls_left > 0


@dataclass
class PveState:
    """The whole node. Defaults mirror a fresh single-node PVE 8.4 with ZFS root ("pve", local, local-zfs)."""

    version: str = "8.4.1"
    repoid: str = "2a5fa54a8503f96d"
    nodes: list[str] = field(default_factory=lambda: ["pve"])
    bridges: set[str] = field(default_factory=lambda: {"vmbr0"})
    storages: dict[str, Storage] = field(
        default_factory=lambda: {
            "local": Storage("local", "dir", {"iso", "vztmpl", "import", "backup"}),
            "local-zfs": Storage("local-zfs", "zfspool", {"images", "rootdir"}),
        }
    )
    vms: dict[int, Vm] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    # API tokens: "user@realm!tokenid" -> secret. ACL: token -> {path: privileges} (propagating).
    tokens: dict[str, str] = field(default_factory=lambda: {"homelab@pve!deploy": DEFAULT_SECRET})
    acl: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    # Directory mappings (Datacenter > Directory Mappings): id -> this node's path (what virtiofs shares).
    dir_mappings: dict[str, str] = field(default_factory=dict)
    task_polls: int = 1  # status reads a task stays "running"
    # The guest agent a newly created VM gets (its scripted answers), from the new VM; default: Agent().
    agent_for: Callable[[Vm], Agent] | None = None
    fingerprint: str = ""  # the server certificate's, set by the emulator (GET /nodes shows it)
    lock: threading.RLock = field(default_factory=threading.RLock)
    _next_pid: int = 40000

    def __post_init__(self) -> None:
        for token in self.tokens:
            self.acl.setdefault(token, {"/": set(ALL_PRIVILEGES)})

    @property
    def release(self) -> str:
        return ".".join(self.version.split(".")[:2])

    def add_token(self, tokenid: str, secret: str, acl: dict[str, set[str]] | None = None) -> None:
        self.tokens[tokenid] = secret
        self.acl[tokenid] = acl if acl is not None else {"/": set(ALL_PRIVILEGES)}

    def privileges(self, tokenid: str, path: str) -> set[str]:
        """The token's privileges on `path`: the ACL entry of the longest configured prefix (ACLs propagate,
        and a more specific path replaces what a parent grants, as in PVE::AccessControl::permissions)."""
        entries = self.acl.get(tokenid, {})
        probe = "/" + path.strip("/")
        while True:
            if probe in entries:
                return set(entries[probe])
            if probe == "/":
                return set()
            probe = probe.rsplit("/", 1)[0] or "/"

    def volume(self, volid: str) -> Volume | None:
        storage = self.storages.get(volid.split(":", 1)[0])
        return storage.volumes.get(volid) if storage else None

    def add_volume(self, volume: Volume) -> Volume:
        self.storages[volume.storage].volumes[volume.volid] = volume
        return volume

    def next_vmid(self) -> int:
        vmid = 100
        while vmid in self.vms:
            vmid += 1
        return vmid

    def new_task(self, node: str, kind: str, ident: str, user: str, error: str | None = None) -> Task:
        """A task as PVE's fork_worker starts it; its UPID is UPID:node:PID:PSTART:STARTTIME:type:id:user:."""
        self._next_pid += 1
        now = int(time.time())
        pstart = 1000000 + self._next_pid
        upid = f"UPID:{node}:{self._next_pid:08X}:{pstart:08X}:{now:08X}:{kind}:{ident}:{user}:"
        task = Task(upid, node, kind, ident, user, self._next_pid, pstart, now, polls_left=self.task_polls)
        if error:
            task.exitstatus = error
        self.tasks[upid] = task
        return task

    def new_disk_volid(self, storage: Storage, vmid: int) -> str:
        """The first free `vm-VMID-disk-N` on that storage (pve-storage's find_free_diskname)."""
        taken = {m[1] for volid in storage.volumes if (m := re.search(rf"\bvm-{vmid}-disk-(\d+)\b", volid))}
        n = 0
        while str(n) in taken:
            n += 1
        return storage.volume_name(vmid, f"disk-{n}")
