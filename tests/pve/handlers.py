"""What each emulated API call does to the state, mirroring PVE 8.4 (pve-manager, qemu-server, pve-storage).

Each handler gets a `Call` (state, checked parameters, the token, its privileges) and returns the `data`
of the answer, or raises ApiError. Errors a PVE handler raises before forking a worker are HTTP errors
here too (500 with PVE's message, 400 for raise_param_exc); errors raised inside a worker end the task
with that exitstatus instead (`Call.task`).
"""

from __future__ import annotations

import copy
import hashlib
import random
import re
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import qemu
from .call import Call, WorkerFailure, boolean, find_storage
from .qemu import drive_file, is_cdrom, is_drive, parse_options, referenced_by_snapshot, render_options
from .schema import ApiError, ParamError
from .state import ExecResult, PveState, Snapshot, Storage, Task, Vm, Volume

Handler = Callable[["Call"], Any]
ROUTES: dict[tuple[str, str], Handler] = {}


def route(method: str, template: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        ROUTES[(method, template)] = handler
        return handler

    return register


# --- cluster, version, access ------------------------------------------------------------------------------


@route("GET", "/version")
def version(call: Call) -> Any:
    """pve-manager's API2::Version: version, release, repoid."""
    state = call.state
    return {"version": state.version, "release": state.release, "repoid": state.repoid}


@route("GET", "/nodes")
def nodes(call: Call) -> Any:
    return [
        {"node": n, "status": "online", "type": "node", "id": f"node/{n}", "level": "",
         "ssl_fingerprint": call.state.fingerprint, "maxcpu": 4, "maxmem": 16 * 1024**3}
        for n in call.state.nodes
    ]


@route("GET", "/cluster/nextid")
def nextid(call: Call) -> Any:
    """The lowest free VMID from 100; with `vmid`, that one if free, else 400 (PVE returns it as a string)."""
    if "vmid" in call.params:
        vmid = int(call.params["vmid"])
        if vmid in call.state.vms:
            raise ParamError({"vmid": f"VM {vmid} already exists"})
        return str(vmid)
    return str(call.state.next_vmid())


@route("GET", "/cluster/resources")
def resources(call: Call) -> Any:
    """Cluster resources, each shown only with the privilege PVE asks for (VM.Audit, Datastore.Audit ...)."""
    kind = call.params.get("type")
    out: list[dict[str, Any]] = []
    if kind in (None, "vm"):
        out += [vm_resource(vm) for vm in call.state.vms.values() if "VM.Audit" in call.privileges(f"/vms/{vm.vmid}")]
    if kind in (None, "storage"):
        for node in call.state.nodes:
            out += [storage_resource(s, node) for s in call.state.storages.values()
                    if call.privileges(f"/storage/{s.name}") & {"Datastore.Audit", "Datastore.AllocateSpace"}]
    if kind in (None, "node"):
        out += [{"id": f"node/{n}", "type": "node", "node": n, "status": "online", "level": ""}
                for n in call.state.nodes]
    return out


def vm_resource(vm: Vm) -> dict[str, Any]:
    return {
        "id": f"qemu/{vm.vmid}", "type": "qemu", "vmid": vm.vmid, "name": vm.name, "node": vm.node,
        "status": vm.status, "tags": vm.config.get("tags", ""), "template": int(boolean(vm.config.get("template"))),
        "maxmem": int(vm.config.get("memory", "2048").split(",")[0].split("=")[-1]) * 1024**2,
        "maxcpu": int(vm.config.get("cores", "1")), "uptime": 0,
    }


def storage_resource(storage: Storage, node: str) -> dict[str, Any]:
    return {
        "id": f"storage/{node}/{storage.name}", "type": "storage", "storage": storage.name, "node": node,
        "content": ",".join(sorted(storage.content)), "plugintype": storage.type, "status": "available",
        "disk": storage.used, "maxdisk": storage.total, "shared": 0,
    }


@route("GET", "/cluster/mapping/dir")
def dir_mappings(call: Call) -> Any:
    """pve-manager's API2::Cluster::Mapping::Dir index: only mappings the token may modify, use or audit."""
    return [{"id": ident, "description": "", "map": [f"node={call.state.nodes[0]},path={path}"]}
            for ident, path in sorted(call.state.dir_mappings.items())
            if call.privileges(f"/mapping/dir/{ident}") & {"Mapping.Modify", "Mapping.Use", "Mapping.Audit"}]


@route("GET", "/access/permissions")
def permissions(call: Call) -> Any:
    """The token's effective privileges per path ({path: {priv: 1}}), or for `path` only."""
    if "path" in call.params:
        path = call.params["path"]
        return {path: {p: 1 for p in sorted(call.privileges(path))}}
    entries = call.state.acl.get(call.user, {})
    return {path: {p: 1 for p in sorted(privs)} for path, privs in entries.items()}


# --- storage -----------------------------------------------------------------------------------------------


def storage_entry(storage: Storage) -> dict[str, Any]:
    return {
        "storage": storage.name, "type": storage.type, "content": ",".join(sorted(storage.content)),
        "active": 1, "enabled": 1, "shared": 0, "total": storage.total, "used": storage.used,
        "avail": storage.total - storage.used, "used_fraction": storage.used / storage.total,
    }


def visible_storages(call: Call) -> list[Storage]:
    """Only storages with Datastore.Audit or Datastore.AllocateSpace (the schema's description)."""
    return [s for s in call.state.storages.values()
            if call.privileges(f"/storage/{s.name}") & {"Datastore.Audit", "Datastore.AllocateSpace"}]


@route("GET", "/storage")
def storage_config(call: Call) -> Any:
    return [{"storage": s.name, "type": s.type, "content": ",".join(sorted(s.content))}
            for s in visible_storages(call) if call.params.get("type") in (None, s.type)]


@route("GET", "/storage/{storage}")
def storage_config_one(call: Call) -> Any:
    s = call.storage
    call.require(f"/storage/{s.name}", ["Datastore.Allocate"])
    return {"storage": s.name, "type": s.type, "content": ",".join(sorted(s.content)), "digest": "0" * 40}


@route("GET", "/nodes/{node}/network")
def node_network(call: Call) -> Any:
    """pve-manager's network index: the node's interfaces, filtered by `type` (`any_bridge` = Linux and OVS
    bridges). The emulated node has its `bridges` and one physical NIC."""
    _ = call.node
    interfaces = [{"iface": "eno1", "type": "eth", "active": 1, "autostart": 1, "families": ["inet"]}]
    interfaces += [{"iface": b, "type": "bridge", "active": 1, "autostart": 1, "families": ["inet"],
                    "bridge_ports": "eno1"} for b in sorted(call.state.bridges)]
    kind = call.params.get("type")
    if kind in (None, "any_local_bridge"):
        wanted = {"eth", "bridge"} if kind is None else {"bridge"}
    else:
        wanted = {"bridge", "OVSBridge"} if kind == "any_bridge" else {kind}
    return [i for i in interfaces if i["type"] in wanted]


@route("GET", "/nodes/{node}/storage")
def node_storages(call: Call) -> Any:
    _ = call.node
    content = call.params.get("content")
    wanted = set(content.split(",")) if content else set()
    return [storage_entry(s) for s in visible_storages(call)
            if wanted <= s.content and call.params.get("storage") in (None, s.name)]


@route("GET", "/nodes/{node}/storage/{storage}/status")
def storage_status(call: Call) -> Any:
    _ = call.node
    return storage_entry(call.storage)


@route("GET", "/nodes/{node}/storage/{storage}/content")
def storage_content(call: Call) -> Any:
    """Volumes with volid, format, size, content (and vmid for VM disks), filtered by content and vmid. As
    pve-storage's volume_list and content index: only the content types the storage is configured for, and only
    the volumes the token may read (a volume it may not is left out, not refused)."""
    _ = call.node
    storage = call.storage
    out = []
    for v in sorted(storage.volumes.values(), key=lambda v: v.volid):
        if call.params.get("content") not in (None, v.content) or v.content not in storage.content:
            continue
        if not readable(call, v):
            continue
        if "vmid" in call.params and v.vmid != int(call.params["vmid"]):
            continue
        entry = {"volid": v.volid, "format": v.format, "size": v.size, "content": v.content, "ctime": v.ctime}
        if v.vmid is not None:
            entry["vmid"] = v.vmid
        out.append(entry)
    return out


def readable(call: Call, volume: Volume) -> bool:
    """PVE::Storage::check_volume_access as the content index calls it (no VMID of its own): Datastore.Allocate on
    the storage reads everything; ISOs, templates and imports need Datastore.AllocateSpace or Datastore.Audit; a
    VM's disk Datastore.Audit on the storage and VM.Config.Disk on its VM; a backup Datastore.AllocateSpace and
    VM.Backup on its VM; anything else nothing less than Datastore.Allocate."""
    have = call.privileges(f"/storage/{volume.storage}")
    if "Datastore.Allocate" in have:
        return True
    if volume.content in ("iso", "vztmpl", "import"):
        return bool(have & {"Datastore.AllocateSpace", "Datastore.Audit"})
    if volume.vmid is None:
        return False
    owner = call.privileges(f"/vms/{volume.vmid}")
    if volume.content == "backup":
        return "Datastore.AllocateSpace" in have and "VM.Backup" in owner
    return volume.content in ("images", "rootdir") and "Datastore.Audit" in have and "VM.Config.Disk" in owner


def volume_of(call: Call) -> Volume:
    volume = call.params["volume"]
    volid = volume if ":" in volume else f"{call.params['storage']}:{volume}"
    found = call.state.volume(volid)
    if found is None:
        raise ApiError(500, f"volume '{volid}' does not exist")
    return found


@route("GET", "/nodes/{node}/storage/{storage}/content/{volume}")
def volume_attributes(call: Call) -> Any:
    v = volume_of(call)
    return {"format": v.format, "size": v.size, "used": v.size, "path": str(v.path or f"/emulated/{v.volid}"),
            "protected": 0}


@route("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}")
def delete_volume(call: Call) -> Any:
    """Needs Datastore.Allocate on the storage (the schema's description); a VM's disk in use is refused."""
    v = volume_of(call)
    call.require(f"/storage/{v.storage}", ["Datastore.Allocate"])
    for vm in call.state.vms.values():
        if qemu.volume_in_use(vm, v.volid):
            raise ApiError(500, f"unable to delete '{v.volid}' - volume is still in use by VM {vm.vmid}")
    del call.state.storages[v.storage].volumes[v.volid]
    return call.task("imgdel", "", log=[f"Removed volume '{v.volid}'"])


SAFE_CHARS = r"[a-zA-Z0-9\-.+=_]"  # PVE::Storage's SAFE_CHAR_CLASS_RE

# pve-storage: PVE::Storage's ISO_EXT_RE_0, VZTMPL_EXT_RE_1 and (8.4) UPLOAD_IMPORT_EXT_RE_1, as the upload
# handler (API2::Storage::Status) matches them against the normalized name.
UPLOAD_EXTENSIONS = {
    "iso": (re.compile(r"[^/]+\.(?:iso|img)$", re.IGNORECASE), "wrong file extension"),
    "vztmpl": (re.compile(r"[^/]+\.(tar\.(?:gz|xz|zst|bz2))$", re.IGNORECASE), "wrong file extension"),
    "import": (re.compile(f"{SAFE_CHARS}+\\.(ova|qcow2|raw|vmdk)$"), "invalid filename or wrong extension"),
}


def normalize_filename(name: str) -> str:
    """PVE::Storage::normalize_content_filename: no directory, every unsafe character becomes '_'."""
    return re.sub(f"(?!{SAFE_CHARS}).", "_", re.sub(r"^.*[/\\]", "", name.rstrip("\n")))


@route("POST", "/nodes/{node}/storage/{storage}/upload")
def upload(call: Call) -> Any:
    """pve-storage API2::Storage::Status upload, in its order: a file-based storage, the extension rule of the
    content type, the storage configured for it; then an imgcopy task that verifies the checksum (a mismatch
    fails the task, not the request) and that a qcow2 really is one."""
    _ = call.node
    storage = call.storage
    content = call.params["content"]
    if call.upload is None:
        raise ApiError(500, "missing temporary file name")
    if storage.type != "dir":
        raise ApiError(500, f"can't upload to storage type '{storage.type}'")
    filename = normalize_filename(call.params["filename"])
    pattern, reason = UPLOAD_EXTENSIONS[content]
    match = pattern.search(filename)
    if not match:
        raise ParamError({"filename": reason})
    if content not in storage.content:
        raise ApiError(500, f"storage '{storage.name}' does not support '{content}' content")
    log = [f"starting file import from: /var/tmp/pveupload-{random.getrandbits(64):016x}"]
    error = upload_error(call, content, match.group(1) if content == "import" else "", log)
    if error:
        return call.task("imgcopy", "", error=error, log=log)
    kept = call.workdir / f"{storage.name}-{content}-{filename}"
    shutil.move(call.upload.path, kept)
    fmt = {"iso": "iso", "vztmpl": "t" + filename.rsplit(".", 1)[-1]}.get(content) or match.group(1)
    call.state.add_volume(Volume(f"{storage.name}:{content}/{filename}", content, fmt, image_size(kept), path=kept))
    log += [f"target node: {call.node}", f"target file: /var/lib/vz/template/{content}/{filename}",
            f"file size is: {call.upload.size}", "finished file import successfully"]
    return call.task("imgcopy", "", log=log)


def upload_error(call: Call, content: str, image_format: str, log: list[str]) -> str | None:
    """What the upload worker dies with: a checksum mismatch, or an image that is not what its name says."""
    assert call.upload is not None
    if "checksum-algorithm" in call.params:
        got = file_hash(call.upload.path, call.params["checksum-algorithm"])
        want = call.params["checksum"]
        if got != want.lower():
            log.append("calculating checksum...")
            return f"checksum mismatch: got '{got}' != expect '{want}'"
        log.append("calculating checksum...OK, checksum verified")
    if image_format == "qcow2" and image_magic(call.upload.path) != b"QFI\xfb":
        return f"qemu-img: Could not open '{call.upload.path}': Image is not in qcow2 format"
    return None


def file_hash(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def image_size(path: Path) -> int:
    """The virtual size of a qcow2 (its header), else the file size (what pve-storage's file_size_info says)."""
    with open(path, "rb") as f:
        header = f.read(32)
    if len(header) == 32 and header[:4] == b"QFI\xfb":
        return int(struct.unpack(">Q", header[24:32])[0])
    return path.stat().st_size


# --- VMs: config and disks ---------------------------------------------------------------------------------

MODIFIED = "detected modified configuration - file changed by other user? Try again."


def check_digest(vm: Vm, digest: str | None) -> None:
    """PVE::Tools::assert_if_modified."""
    if digest and digest != vm.digest:
        raise ApiError(500, MODIFIED)


def typed_config(call: Call, config: dict[str, str], digest: str) -> dict[str, Any]:
    """The config as GET .../config returns it: integers and booleans as numbers (per the returns schema)."""
    returns = call.endpoint.info.get("returns", {}).get("properties", {})
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key == "parent":
            continue
        kind = returns.get(key, {}).get("type")
        out[key] = int(value) if kind in ("integer", "boolean") and re.fullmatch(r"-?\d+", value) else value
    out["digest"] = digest
    return out


@route("GET", "/nodes/{node}/qemu")
def list_vms(call: Call) -> Any:
    """Only VMs the token may audit (VM.Audit on /vms/VMID)."""
    node = call.node
    return [{"vmid": vm.vmid, "name": vm.name, "status": vm.status, "tags": vm.config.get("tags", ""),
             "cpus": int(vm.config.get("cores", "1")), "uptime": 0}
            for vm in call.state.vms.values() if vm.node == node and "VM.Audit" in call.privileges(f"/vms/{vm.vmid}")]


@route("POST", "/nodes/{node}/qemu")
def create_vm(call: Call) -> Any:
    """qemu-server create_vm: the checks before the worker (see qemu.py), then a qmcreate task whose failure
    ("unable to create VM N - ...") leaves no VM and no volume behind."""
    node = call.node
    vmid = int(call.params["vmid"])
    storage = call.params.get("storage")
    if storage:
        call.require(f"/storage/{storage}", ["Datastore.AllocateSpace"])
    if boolean(call.params.get("start")):
        call.require(f"/vms/{vmid}", ["VM.PowerMgmt"])
    qemu.require_vm_allocate(call, vmid)
    config = qemu.config_only(call.params)
    check_new_config(call, vmid, config, storage)
    if vmid in call.state.vms:
        other = call.state.vms[vmid].node
        raise ApiError(500, f"unable to create VM {vmid} - VM {vmid} already exists on node '{other}'")
    vm = Vm(vmid, node, {})
    try:
        disks = qemu.create_disks(call, vm, config, storage)
    except WorkerFailure as e:
        return call.task("qmcreate", vmid, error=f"unable to create VM {vmid} - {e}")
    vm.config = qemu.new_vm_config(config, disks)
    if call.state.agent_for is not None:
        vm.agent = call.state.agent_for(vm)
    call.state.vms[vmid] = vm
    log = [f"{k}: successfully created disk '{v}'" for k, v in disks.items()]
    if boolean(call.params.get("start")):
        log.append("Execute autostart")
        error = start_error(call.state, vm)
        if error:
            log.append(f"WARN: {error}")
        else:
            vm.status = "running"
    return call.task("qmcreate", vmid, log=log)


def check_new_config(call: Call, vmid: int, config: dict[str, str], storage: str | None = None) -> None:
    """The checks create_vm and update_vm_api both make before changing anything."""
    qemu.check_storage_access(call, config, storage)
    qemu.check_modify_config_perm(call, vmid, list(config))
    qemu.check_dir_perm(call, vmid, config)
    qemu.check_bridge_access(call, config)
    qemu.check_drive_params(config)
    qemu.add_random_macs(config)


def drop_volumes(state: PveState, vm: Vm, unreferenced: bool = False) -> None:
    """destroy_vm: every volume the config or a snapshot references (drives, unusedN) that the VM owns (a volume
    of another VMID stays); with destroy-unreferenced-disks, also every other volume named after the VMID."""
    configs = [vm.config, vm.pending, *(snap.config for snap in vm.snapshots.values())]
    referenced = {drive_file(value) for config in configs for key, value in config.items() if qemu.is_disk_key(key)}
    for storage in state.storages.values():
        for volid in [v for v, vol in storage.volumes.items()
                      if vol.vmid == vm.vmid and (unreferenced or v in referenced)]:
            del storage.volumes[volid]


@route("GET", "/nodes/{node}/qemu/{vmid}/config")
def get_config(call: Call) -> Any:
    """vm_config: with pending changes taken in, unless `current` (load_current_config); or a snapshot's."""
    vm = call.vm
    snapname = call.params.get("snapshot")
    current = boolean(call.params.get("current"))
    if snapname and current:
        message = "cannot use 'snapshot' parameter with 'current'"
        raise ParamError({"snapshot": message, "current": message})
    if snapname:
        return {**find_snapshot(vm, snapname).config, "digest": vm.digest}
    return typed_config(call, vm.config if current else vm.with_pending(), vm.digest)


def update_config(call: Call) -> Vm:
    """update_vm_api: digest, the checks (each key's privilege, drives by kind, storages, bridges), then every
    change is written to the config's [PENDING] section and applied - all of it on a stopped VM, on a running
    one what qemu-server can hot-plug (qemu.py, "pending changes"); the rest waits for the next start. What
    failed to apply fails the call (raise_param_exc) after the config is written."""
    vm = call.vm
    check_digest(vm, call.params.get("digest"))
    config, deletes = checked_changes(call, vm)
    restore = revert(vm, qemu.split_list(call.params.get("revert")), deletes)
    force = boolean(call.params.get("force"))
    modified = {key for key in deletes if qemu.stage_delete(call.state, vm, key, force)}
    if qemu.stage_boot_order(call.state, vm, modified, config):
        modified.add("boot")
    made = qemu.create_disks(call, vm, config)
    for key, value in {**config, **made, **restore}.items():
        qemu.stage_value(call.state, vm, key, value)
    modified |= set(config) | set(restore)
    errors = qemu.apply_changes(call.state, vm, modified)
    if errors:
        raise ParamError(errors)
    return vm


def checked_changes(call: Call, vm: Vm) -> tuple[dict[str, str], list[str]]:
    """update_vm_api's checks before it writes anything: the new values and the keys to delete (`cdrom` is
    ide2), each key in one role only, the privilege of each and of each drive (old and new), storages,
    bridges."""
    config = qemu.config_only(call.params)
    deletes = ["ide2" if k == "cdrom" else k for k in qemu.split_list(call.params.get("delete"))]
    check_exclusive(config, deletes, qemu.split_list(call.params.get("revert")))
    qemu.check_modify_config_perm(call, vm.vmid, deletes)
    for key in deletes:
        value = vm.config.get(key, vm.pending.get(key))
        if qemu.is_disk_key(key) and value is not None:
            qemu.check_drive_perm(call, vm.vmid, value)
    for key, value in config.items():
        if qemu.is_drive(key):
            qemu.check_drive_perm(call, vm.vmid, value)
    check_new_config(call, vm.vmid, config)
    return config, deletes


def check_exclusive(config: dict[str, str], deletes: list[str], reverts: list[str]) -> None:
    """update_vm_api: something to do, and no key both set and deleted or reverted (its messages, verbatim)."""
    if not config and not deletes and not reverts:
        raise ApiError(500, "no options specified")
    for key in reverts:
        if key in config:
            raise ParamError({"delete": f"you can't use '-{key}' and -revert {key}' at the same time"})
    for key in deletes:
        if key in config:
            raise ParamError({"delete": f"you can't use '-{key}' and -delete {key}' at the same time"})
        if key in reverts:
            raise ParamError({"revert": f"you can't use '-delete {key}' and -revert {key}' at the same time"})


def revert(vm: Vm, keys: list[str], deletes: list[str]) -> dict[str, str]:
    """update_vm_api's `revert`: a key the config has gets its current value back (which cleanup_pending then
    drops); a key only pending is deleted. Returns the values to restore; `deletes` grows."""
    restore = {k: vm.config[k] for k in keys if k in vm.config}
    deletes += [k for k in keys if k not in vm.config and k in vm.pending]
    return restore


@route("PUT", "/nodes/{node}/qemu/{vmid}/config")
def set_config_sync(call: Call) -> Any:
    """Synchronous update (returns null): a failure making a disk is an HTTP 500, one applying a change 400."""
    try:
        update_config(call)
    except WorkerFailure as e:
        raise ApiError(500, str(e)) from e
    return None


@route("POST", "/nodes/{node}/qemu/{vmid}/config")
def set_config_async(call: Call) -> Any:
    """Asynchronous update: a qmconfig task, which a failure making a disk or applying a change fails (the
    worker's error on one line, as fork_worker writes it)."""
    vmid = call.vm.vmid
    try:
        update_config(call)
    except WorkerFailure as e:
        return call.task("qmconfig", vmid, error=str(e))
    except ParamError as e:
        return call.task("qmconfig", vmid, error=worker_param_error(e.errors or {}))
    return call.task("qmconfig", vmid)


def worker_param_error(errors: dict[str, str]) -> str:
    """A raise_param_exc in a worker as the task's exitstatus: PVE::Exception's text on one line."""
    return "400 Parameter verification failed. " + " ".join(f"{k}: {v}" for k, v in errors.items())


@route("GET", "/nodes/{node}/qemu/{vmid}/pending")
def pending(call: Call) -> Any:
    """vm_pending (PVE::GuestHelpers::config_with_pending_array): one entry per key of the config file (the
    digest too) with its current `value`, its `pending` value, `delete` 1 (2: forced) for a pending deletion;
    then keys only pending, then deletions of keys the config lacks."""
    vm = call.vm
    entries = []
    for key, value in {**vm.config, "digest": vm.digest}.items():
        entry: dict[str, Any] = {"key": key, "value": value}
        if key in vm.pending:
            entry["pending"] = vm.pending[key]
        if key in vm.pending_delete:
            entry["delete"] = 2 if vm.pending_delete[key] else 1
        entries.append(entry)
    entries += [{"key": k, "pending": v} for k, v in vm.pending.items() if k not in vm.config]
    entries += [{"key": k, "delete": 2 if force else 1} for k, force in vm.pending_delete.items()
                if k not in vm.config and k not in vm.pending]
    return entries


@route("DELETE", "/nodes/{node}/qemu/{vmid}")
def destroy_vm(call: Call) -> Any:
    """qemu-server destroy_vm: refused while running; frees the VM's own volumes (task qmdestroy)."""
    vm = call.vm
    if vm.status == "running":
        raise ApiError(500, f"VM {vm.vmid} is running - destroy failed")
    drop_volumes(call.state, vm, boolean(call.params.get("destroy-unreferenced-disks")))
    del call.state.vms[vm.vmid]
    return call.task("qmdestroy", vm.vmid)


# --- VMs: power ----------------------------------------------------------------------------------------------


@route("GET", "/nodes/{node}/qemu/{vmid}/status/current")
def current_status(call: Call) -> Any:
    vm = call.vm
    out: dict[str, Any] = {"vmid": vm.vmid, "name": vm.name, "status": vm.status, "qmpstatus": vm.status,
                           "uptime": 0, "tags": vm.config.get("tags", ""), "cpus": int(vm.config.get("cores", "1"))}
    if agent_enabled(vm):
        out["agent"] = 1
    if "lock" in vm.config:
        out["lock"] = vm.config["lock"]
    return out


def start_error(state: PveState, vm: Vm) -> str | None:
    """Why qemu-server's vm_start would fail in its worker: already running, a missing bridge or volume."""
    if vm.status == "running":
        return f"VM {vm.vmid} already running"
    for key, value in vm.config.items():
        if re.fullmatch(r"net\d+", key):
            bridge = parse_options(value)[1].get("bridge")
            if bridge and bridge not in state.bridges:
                return f"bridge '{bridge}' does not exist"
        elif is_drive(key) and not key.startswith("unused"):
            file = drive_file(value)
            if ":" in file and state.volume(file) is None:
                return f"volume '{file}' does not exist"
    return None


@route("POST", "/nodes/{node}/qemu/{vmid}/status/start")
def start(call: Call) -> Any:
    """vm_start: a VM not running gets its pending changes first (vm_start_nolock's vmconfig_apply_pending,
    before QEMU is started - so they are applied even when the start then fails)."""
    vm = call.vm
    if vm.status != "running":
        qemu.apply_pending(call.state, vm)
    error = start_error(call.state, vm) or call.task_error
    if error is None:
        vm.status = "running"
    return call.task("qmstart", vm.vmid, error=error)


@route("POST", "/nodes/{node}/qemu/{vmid}/status/stop")
def stop(call: Call) -> Any:
    """Stopping a stopped VM is no error in qemu-server's vm_stop."""
    vm = call.vm
    if call.task_error is None:
        vm.status = "stopped"
    return call.task("qmstop", vm.vmid)


@route("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown")
def shutdown(call: Call) -> Any:
    """vm_shutdown: an ACPI shutdown in a qmshutdown task; a VM already stopped is no error (vm_stop)."""
    vm = call.vm
    if call.task_error is None:
        vm.status = "stopped"
    return call.task("qmshutdown", vm.vmid)


@route("POST", "/nodes/{node}/qemu/{vmid}/status/reboot")
def reboot(call: Call) -> Any:
    """vm_reboot refuses a stopped VM before forking ("VM N not running"); a reboot is a shutdown and a start,
    so it applies the pending changes (the schema: "Applies pending changes.")."""
    vm = call.vm
    if vm.status != "running":
        raise ApiError(500, f"VM {vm.vmid} not running")
    if call.task_error is None:
        qemu.apply_pending(call.state, vm)
    return call.task("qmreboot", vm.vmid)


# --- VMs: move_disk --------------------------------------------------------------------------------------------


@route("POST", "/nodes/{node}/qemu/{vmid}/move_disk")
def move_disk(call: Call) -> Any:
    """qemu-server move_vm_disk: to another storage, or (target-vmid) reassigned to another VM, never both."""
    vm = call.vm
    target_vmid, storage = call.params.get("target-vmid"), call.params.get("storage")
    if target_vmid is not None and storage is not None:
        message = "either set 'storage' or 'target-vmid', but not both"
        raise ParamError({"target-vmid": message, "storage": message})
    if target_vmid is not None:
        return reassign_disk(call, vm, int(target_vmid))
    if storage is not None:
        return move_to_storage(call, vm, find_storage(call.state, storage))
    message = "both 'storage' and 'target-vmid' missing, either needs to be set"
    raise ParamError({"target-vmid": message, "storage": message})


def reassign_disk(call: Call, vm: Vm, target_vmid: int) -> str:
    """qemu-server's $load_and_check_reassign_configs, in its order: target VM perms, another VMID, both VMs
    on one node, no template, digests, the disk present, the target key free, not a CD, no snapshot using
    it, storage can rename, source stopped unless the disk is unusedN. Then a qmmove task renames the
    volume to the target VMID (vm-TARGET-disk-N), drops the key and attaches it to the target
    (attach_reassigned)."""
    disk = call.params["disk"]
    target_disk = call.params.get("target-disk", disk)
    call.require(f"/vms/{target_vmid}", ["VM.Config.Disk"])
    if target_vmid == vm.vmid:
        raise ParamError({"target-vmid": "must be different than source VMID to reassign disk"})
    target = call.state.vms.get(target_vmid)
    if target is None:
        raise ApiError(500, f"could not find target VM {target_vmid}")
    if target.node != vm.node:
        raise ApiError(500, f"Both VMs need to be on the same node ({vm.node} != {target.node})")
    if boolean(vm.config.get("template")) or boolean(target.config.get("template")):
        raise ApiError(500, "Can't move disks from or to template VMs")
    for checked, digest in ((vm, call.params.get("digest")), (target, call.params.get("target-digest"))):
        if digest and digest != checked.digest:
            raise ApiError(500, f"VM {checked.vmid}: {MODIFIED}")
    if disk not in vm.config:
        raise ApiError(500, f"Disk '{disk}' for VM '{vm.vmid}' does not exist")
    if target_disk in target.config:
        raise ApiError(500, f"Target disk key '{target_disk}' is already in use for VM '{target_vmid}'")
    value = vm.config[disk]
    volid = drive_file(value)
    if is_cdrom(value) and not volid.endswith("-cloudinit"):
        raise ApiError(500, "CD drive contents can't be moved to another VM")
    volume = call.state.volume(volid)
    if volume is None:
        raise ApiError(500, f"Volume '{volid}' not managed by PVE")
    if referenced_by_snapshot(vm, volid):
        raise ApiError(500, "Can't move disk used by a snapshot to another VM")
    storage = call.state.storages[volume.storage]
    if not storage.rename:
        raise ApiError(500, "Storage does not support moving of this disk to another VM")
    if vm.status == "running" and not disk.startswith("unused"):
        raise ApiError(500, "Cannot move disk to another VM while the source VM is running - detach first")
    call.require(f"/storage/{storage.name}", ["Datastore.AllocateSpace"])
    ident = f"{vm.vmid}-{disk}>{target_vmid}-{target_disk}"
    if call.task_error is not None:
        return call.task("qmmove", ident)
    new_volid = call.state.new_disk_volid(storage, target_vmid)
    del storage.volumes[volid]
    volume.volid, volume.vmid = new_volid, target_vmid
    storage.volumes[new_volid] = volume
    del vm.config[disk]
    _, options = parse_options(value)
    log = [f"reassign disk '{disk}' from VM '{vm.vmid}' as '{target_disk}' to VM '{target_vmid}'",
           f"removing disk '{disk}' from VM '{vm.vmid}' config"]
    error = attach_reassigned(call.state, target, target_disk,
                              render_options(new_volid, {} if disk.startswith("unused") else options))
    return call.task("qmmove", ident, log=log, error=error)


def attach_reassigned(state: PveState, target: Vm, key: str, value: str) -> str | None:
    """$disk_reassignfn: an unusedN is written to the target's config; a drive goes through update_vm_api on the
    target - pending, then hot-plugged if the target runs and can take it (a SCSI or VirtIO disk with hotplug
    'disk'), else left for its next start. A hot-plug problem fails the task, the disk moved all the same."""
    if key.startswith("unused"):
        target.config[key] = value
        return None
    qemu.stage_value(state, target, key, value)
    errors = qemu.apply_changes(state, target, {key})
    return worker_param_error(errors) if errors else None


def move_to_storage(call: Call, vm: Vm, target: Storage) -> str:
    """qemu-server's $load_and_check_move, then a qmmove task copying the disk; the source stays as unusedN
    unless `delete`."""
    call.require(f"/storage/{target.name}", ["Datastore.AllocateSpace"])
    check_digest(vm, call.params.get("digest"))
    disk = call.params["disk"]
    if disk not in vm.config:
        raise ApiError(500, f"disk '{disk}' does not exist")
    value = vm.config[disk]
    if is_cdrom(value) and not drive_file(value).endswith("-cloudinit"):
        raise ApiError(500, "you can't move a cdrom")
    old = call.state.volume(drive_file(value))
    if old is None:
        raise ApiError(500, f"volume '{drive_file(value)}' does not exist")
    fmt = call.params.get("format")
    if old.storage == target.name and (not fmt or fmt == old.format):
        raise ApiError(500, "you can't move to the same storage with same format")
    if "images" not in target.content:
        raise ParamError({"storage": f"storage '{target.name}' does not support vm images"})
    delete = boolean(call.params.get("delete"))
    if delete and referenced_by_snapshot(vm, old.volid):
        raise ApiError(500, "you can't move a disk with snapshots and delete the source")
    if call.task_error is not None:
        return call.task("qmmove", vm.vmid)
    new_volid = call.state.new_disk_volid(target, vm.vmid)
    call.state.add_volume(Volume(new_volid, "images", fmt or ("qcow2" if target.type == "dir" else "raw"),
                                 old.size, vm.vmid))
    _, options = parse_options(value)
    vm.config[disk] = render_options(new_volid, options)
    log = [f"copying volume '{old.volid}' from current storage '{old.storage}' to target storage '{target.name}'"]
    if delete:
        del call.state.storages[old.storage].volumes[old.volid]
    else:
        key = qemu.add_unused(vm, old.volid)
        log.append(f"adding source volume '{old.volid}' as '{key}' to config")
    return call.task("qmmove", vm.vmid, log=log)


# --- VMs: snapshots --------------------------------------------------------------------------------------------


def find_snapshot(vm: Vm, name: str) -> Snapshot:
    snap = vm.snapshots.get(name)
    if snap is None:
        raise ApiError(500, f"snapshot '{name}' does not exist")
    return snap


@route("GET", "/nodes/{node}/qemu/{vmid}/snapshot")
def list_snapshots(call: Call) -> Any:
    """Every snapshot plus `current` ("You are here!"), as the GUI's tree needs them."""
    vm = call.vm
    out = [{"name": s.name, "description": s.description, "snaptime": s.snaptime, "vmstate": int(s.vmstate),
            **({"parent": s.parent} if s.parent else {})} for s in vm.snapshots.values()]
    current = {"name": "current", "description": "You are here!", "running": int(vm.status == "running"),
               "digest": vm.digest}
    if vm.parent_snapshot:
        current["parent"] = vm.parent_snapshot
    return [*out, current]


@route("POST", "/nodes/{node}/qemu/{vmid}/snapshot")
def create_snapshot(call: Call) -> Any:
    """PVE::AbstractConfig::snapshot_create (in the worker): the name unused, every disk on a storage that
    can snapshot; the config's `parent` then names the new snapshot."""
    vm = call.vm
    name = call.params["snapname"]
    if name == "current":
        raise ApiError(500, "unable to use snapshot name 'current' (reserved name)")
    error = None
    if name in vm.snapshots:
        error = f"snapshot name '{name}' already used"
    for key, value in vm.config.items():
        volume = call.state.volume(drive_file(value)) if is_drive(key) and not is_cdrom(value) else None
        if volume is not None and not call.state.storages[volume.storage].snapshots:
            error = error or "snapshot feature is not available"
    if error is None and call.task_error is None:
        config = {k: v for k, v in vm.config.items() if k != "parent"}
        vm.snapshots[name] = Snapshot(name, config, call.params.get("description", ""), vm.parent_snapshot,
                                      vmstate=boolean(call.params.get("vmstate")))
        vm.config["parent"] = name
    return call.task("qmsnapshot", vm.vmid, error=error)


@route("DELETE", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}")
def delete_snapshot(call: Call) -> Any:
    """snapshot_delete, in the qmdelsnapshot worker: a missing snapshot fails the task."""
    vm = call.vm
    snap = vm.snapshots.get(call.params["snapname"])
    if snap is None:
        return call.task("qmdelsnapshot", vm.vmid, error=f"snapshot '{call.params['snapname']}' does not exist")
    if call.task_error is None:
        del vm.snapshots[snap.name]
        for other in vm.snapshots.values():
            if other.parent == snap.name:
                other.parent = snap.parent
        if vm.parent_snapshot == snap.name:
            if snap.parent:
                vm.config["parent"] = snap.parent
            else:
                vm.config.pop("parent")
    return call.task("qmdelsnapshot", vm.vmid)


@route("GET", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/config")
def snapshot_config(call: Call) -> Any:
    return dict(find_snapshot(call.vm, call.params["snapname"]).config)


@route("POST", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/rollback")
def rollback(call: Call) -> Any:
    """snapshot_rollback, in the qmrollback worker: the config returns to the snapshot's, pending changes
    dropped; the VM stops (without vmstate), `start=1` starts it again. A missing snapshot fails the task."""
    vm = call.vm
    snap = vm.snapshots.get(call.params["snapname"])
    if snap is None:
        return call.task("qmrollback", vm.vmid, error=f"snapshot '{call.params['snapname']}' does not exist")
    if call.task_error is None:
        vm.config = {**copy.deepcopy(snap.config), "parent": snap.name}
        vm.pending, vm.pending_delete = {}, {}  # __snapshot_apply_config: the new config has no [PENDING]
        vm.status = "running" if snap.vmstate or boolean(call.params.get("start")) else "stopped"
    return call.task("qmrollback", vm.vmid)


# --- guest agent -------------------------------------------------------------------------------------------------


def agent_enabled(vm: Vm) -> bool:
    value = vm.config.get("agent")
    if value is None:
        return False
    first, options = parse_options(value)
    return boolean(options.get("enabled", first))


def ready_agent(call: Call) -> Vm:
    """qemu-server's agent_available, in its order: agent configured, VM running, agent answering."""
    vm = call.vm
    if not agent_enabled(vm):
        raise ApiError(500, "No QEMU guest agent configured")
    if vm.status != "running":
        raise ApiError(500, f"VM {vm.vmid} is not running")
    if not vm.agent.responding:
        raise ApiError(500, "QEMU guest agent is not running")
    return vm


@route("POST", "/nodes/{node}/qemu/{vmid}/agent/ping")
def agent_ping(call: Call) -> Any:
    ready_agent(call)
    return {"result": {}}


@route("GET", "/nodes/{node}/qemu/{vmid}/agent/network-get-interfaces")
def agent_interfaces(call: Call) -> Any:
    return {"result": copy.deepcopy(ready_agent(call).agent.interfaces)}


@route("POST", "/nodes/{node}/qemu/{vmid}/agent/exec")
def agent_exec(call: Call) -> Any:
    """Starts the command (answered from the VM's scripted table); returns its pid."""
    vm = ready_agent(call)
    command = [str(c) for c in call.params["command"]]
    result = vm.agent.answer(command)
    pid = 1000 + len(vm.agent.running) + random.randrange(1000, 30000)
    vm.agent.running[pid] = (result, result.polls)
    return {"pid": pid}


@route("GET", "/nodes/{node}/qemu/{vmid}/agent/exec-status")
def agent_exec_status(call: Call) -> Any:
    """`exited: 0` while the scripted command "runs", then exitcode and out-data/err-data (once: QGA forgets)."""
    vm = ready_agent(call)
    pid = int(call.params["pid"])
    if pid not in vm.agent.running:
        raise ApiError(500, "Agent error: Invalid parameter 'pid'")
    result, polls = vm.agent.running[pid]
    if polls > 0:
        vm.agent.running[pid] = (result, polls - 1)
        return {"exited": 0}
    del vm.agent.running[pid]
    return exec_answer(result)


def exec_answer(result: ExecResult) -> dict[str, Any]:
    out: dict[str, Any] = {"exited": 1, "exitcode": result.exitcode}
    if result.out:
        out["out-data"] = result.out
    if result.err:
        out["err-data"] = result.err
    return out


# --- tasks ---------------------------------------------------------------------------------------------------------


def find_task(call: Call) -> Task:
    upid = call.params["upid"]
    if not upid.startswith("UPID:"):
        raise ParamError({"upid": "unable to parse worker upid"})
    task = call.state.tasks.get(upid)
    if task is None:
        raise ApiError(500, "no such task")
    return task


@route("GET", "/nodes/{node}/tasks/{upid}/status")
def task_status(call: Call) -> Any:
    """running for the first `task_polls` reads, then stopped with exitstatus ("OK" or the error)."""
    task = find_task(call)
    out: dict[str, Any] = {"upid": task.upid, "node": task.node, "pid": task.pid, "pstart": task.pstart,
                           "starttime": task.starttime, "type": task.type, "id": task.id,
                           "user": task.user.split("!")[0], "status": "running" if task.running else "stopped"}
    if "!" in task.user:
        out["tokenid"] = task.user.split("!", 1)[1]
    if task.running:
        task.polls_left -= 1
    else:
        out["exitstatus"] = task.exitstatus
    return out


@route("GET", "/nodes/{node}/tasks/{upid}/log")
def task_log(call: Call) -> Any:
    task = find_task(call)
    lines = list(task.log)
    if not task.running:
        lines.append("TASK OK" if task.exitstatus == "OK" else f"TASK ERROR: {task.exitstatus}")
    start = int(call.params.get("start", 0))
    limit = int(call.params.get("limit", 50))
    return [{"n": n + 1, "t": t} for n, t in enumerate(lines)][start:start + limit]


@route("GET", "/nodes/{node}/tasks")
def task_list(call: Call) -> Any:
    node = call.node
    return [{"upid": t.upid, "node": t.node, "type": t.type, "id": t.id, "user": t.user, "starttime": t.starttime,
             **({} if t.running else {"status": t.exitstatus, "endtime": int(time.time())})}
            for t in call.state.tasks.values() if t.node == node]
