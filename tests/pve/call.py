"""One API call as a handler sees it, and the lookups every handler shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .permissions import require
from .schema import ApiError, Endpoint
from .state import PveState, Storage, Task, Vm


class WorkerFailure(Exception):
    """What a PVE worker dies with: the task ends with this exitstatus instead of the call failing."""


@dataclass
class Upload:
    """The file part of a multipart upload, already streamed to `path`."""

    path: Path
    filename: str
    size: int


@dataclass
class Call:
    state: PveState
    endpoint: Endpoint
    params: dict[str, Any]
    user: str  # the token id, user@realm!tokenid
    workdir: Path
    task_error: str | None = None  # fault injection: the next task of this call fails with this
    upload: Upload | None = None
    tasks: list[Task] = field(default_factory=list)

    def privileges(self, path: str) -> set[str]:
        return self.state.privileges(self.user, path)

    def require(self, path: str, privs: list[str], any_of: bool = False) -> None:
        require(self.privileges, path, privs, any_of)

    def task(self, kind: str, ident: object = "", error: str | None = None, log: list[str] | None = None) -> str:
        """Start a worker task (PVE's fork_worker) and return its UPID; an injected error wins over `error`."""
        task = self.state.new_task(self.node, kind, str(ident), self.user, self.task_error or error)
        task.log = list(log or [])
        self.tasks.append(task)
        return task.upid

    @property
    def node(self) -> str:
        node = self.params.get("node", self.state.nodes[0])
        if node not in self.state.nodes:
            raise ApiError(500, f"hostname lookup '{node}' failed - failed to get address info for: {node}: "
                                "Name or service not known")
        return str(node)

    @property
    def vm(self) -> Vm:
        return find_vm(self.state, int(self.params["vmid"]), self.node)

    @property
    def storage(self) -> Storage:
        return find_storage(self.state, self.params["storage"])


def find_vm(state: PveState, vmid: int, node: str) -> Vm:
    """The VM, or PVE's error for a config file that is not on this node."""
    vm = state.vms.get(vmid)
    if vm is None or vm.node != node:
        raise ApiError(500, f"Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist")
    return vm


def find_storage(state: PveState, name: str) -> Storage:
    storage = state.storages.get(name)
    if storage is None:
        raise ApiError(500, f"storage '{name}' does not exist")
    return storage


def boolean(value: Any) -> bool:
    return str(value).lower() in {"1", "on", "yes", "true"}


def size_text(size: int) -> str:
    """PVE's size notation in drive strings (PVE::JSONSchema::format_size): 32G, 2252M, 4K or bytes."""
    for unit, factor in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)
