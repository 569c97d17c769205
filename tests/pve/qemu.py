"""VM configuration rules of qemu-server (PVE/API2/Qemu.pm): drives, NICs, and who may set what.

create_vm checks, before forking its worker: VM.Allocate, `check_storage_access` (each drive's storage and
volumes), `check_vm_modify_config_perm` (one VM.Config.* privilege per non-drive key), virtiofs and
bridge access, `check_drive_param` (syntax), then gives NICs a MAC. The worker's `create_disks`
allocates, imports and attaches; what fails there fails the task ("unable to create VM N - ...") and
frees what it made.
"""

from __future__ import annotations

import random
import re
import time
from typing import Any

from .call import Call, WorkerFailure, find_storage, size_text
from .permissions import Forbidden
from .schema import ApiError, ParamError, split_property_string
from .state import PveState, Storage, Vm, Volume

DRIVE = re.compile(r"(ide|sata|scsi|virtio|efidisk|tpmstate)\d+")
UNUSED = re.compile(r"unused\d+")
NET = re.compile(r"net\d+")
NEW_DISK = re.compile(r"(?:(?P<storage>[a-z][a-z0-9\-_.]*[a-z0-9]):)?(?P<size>\d+(\.\d+)?)")
NIC_MODELS = ("e1000", "e1000-82540em", "e1000-82544gc", "e1000-82545em", "e1000e", "i82551", "i82557b",
              "i82559er", "ne2k_isa", "ne2k_pci", "pcnet", "rtl8139", "virtio", "vmxnet3")

# check_vm_modify_config_perm's option tables.
CPU_OPTIONS = {"cores", "cpu", "runningcpu", "cpulimit", "cpuunits", "numa", "smp", "sockets", "vcpus"}
MEMORY_OPTIONS = {"memory", "balloon", "shares", "allow-ksm"}
HWTYPE_OPTIONS = {"acpi", "hotplug", "kvm", "machine", "runningmachine", "scsihw", "smbios1", "tablet", "vga",
                  "watchdog", "audio0", "rng0"}
GENERAL_OPTIONS = {"agent", "autostart", "bios", "description", "keyboard", "localtime", "migrate_downtime",
                   "migrate_speed", "name", "onboot", "ostype", "protection", "reboot", "startdate", "startup",
                   "tdf", "template"}
DISK_OPTIONS = {"boot", "bootdisk", "vmstatestorage"}
CLOUDINIT_OPTIONS = {"cicustom", "cipassword", "citype", "ciuser", "ciupgrade", "nameserver", "searchdomain",
                     "sshkeys"}
# Keys the API takes that are not config (create_vm and update_vm_api extract them first).
CONTROL = {"node", "vmid", "digest", "delete", "revert", "skiplock", "start", "background_delay", "force", "pool",
           "unique", "archive", "storage", "live-restore", "bwlimit", "import-working-storage", "ha-managed"}


def is_drive(key: str) -> bool:
    return DRIVE.fullmatch(key) is not None


def is_disk_key(key: str) -> bool:
    """A drive or an unusedN: what holds a volume."""
    return is_drive(key) or UNUSED.fullmatch(key) is not None


def parse_options(value: str) -> tuple[str, dict[str, str]]:
    """(bare value, {key: value}) of a property string: a drive's volume and options, a NIC's model..."""
    bare, options = "", {}
    for part in split_property_string(value):
        key, sep, text = part.partition("=")
        if sep:
            options[key] = text
        else:
            bare = part
    return options.pop("file", bare), options


def drive_file(value: str) -> str:
    return parse_options(value)[0]


def render_options(first: str, options: dict[str, str]) -> str:
    """print_property_string: the default key's value first, then the other keys sorted."""
    return ",".join([first, *(f"{k}={options[k]}" for k in sorted(options))])


def is_cdrom(value: str) -> bool:
    return parse_options(value)[1].get("media") == "cdrom"


def is_cloudinit(value: str) -> bool:
    """drive_is_cloudinit: the volume is named (vm-N-)cloudinit."""
    return re.search(r"[:/](vm-\d+-)?cloudinit(\.\w+)?$", drive_file(value)) is not None


# --- permission checks -------------------------------------------------------------------------------------


def check_modify_config_perm(call: Call, vmid: int, keys: list[str]) -> None:
    """check_vm_modify_config_perm: the privilege each non-drive key needs; unknown keys are root's only."""
    for key in keys:
        if key in CONTROL or is_disk_key(key) or key == "cdrom":
            continue
        if key == "tags":  # assert_tag_permissions, datacenter user-tag-access 'free' (the default)
            call.require(f"/vms/{vmid}", ["VM.Config.Options"])
            continue
        if re.fullmatch(r"(serial|usb|hostpci|virtiofs)\d+", key):
            continue  # value-dependent checks elsewhere (check_dir_perm for virtiofs)
        path = f"/vms/{vmid}"
        if key in CPU_OPTIONS or re.fullmatch(r"numa\d+", key):
            call.require(path, ["VM.Config.CPU"])
        elif key in MEMORY_OPTIONS:
            call.require(path, ["VM.Config.Memory"])
        elif key in HWTYPE_OPTIONS:
            call.require(path, ["VM.Config.HWType"])
        elif key in GENERAL_OPTIONS:
            call.require(path, ["VM.Config.Options"])
            if key == "startup":
                call.require("/", ["Sys.Modify"])
        elif key == "freeze":
            call.require(path, ["VM.PowerMgmt"])
        elif key in DISK_OPTIONS:
            call.require(path, ["VM.Config.Disk"])
        elif NET.fullmatch(key):
            call.require(path, ["VM.Config.Network"])
        elif key in CLOUDINIT_OPTIONS or re.fullmatch(r"ipconfig\d+", key):
            call.require(path, ["VM.Config.Cloudinit", "VM.Config.Network"], any_of=True)
        elif key == "vmstate":
            call.require(path, ["VM.Config.Disk", "VM.PowerMgmt"])
        else:
            raise ApiError(500, f"only root can set '{key}' config")


def check_drive_perm(call: Call, vmid: int, value: str) -> None:
    """update_vm_api's drive check: cloud-init drive, CD-ROM or disk."""
    if is_cloudinit(value):
        call.require(f"/vms/{vmid}", ["VM.Config.Cloudinit", "VM.Config.CDROM"])
    elif is_cdrom(value):
        call.require(f"/vms/{vmid}", ["VM.Config.CDROM"])
    else:
        call.require(f"/vms/{vmid}", ["VM.Config.Disk"])


def check_volume_access(call: Call, volid: str) -> None:
    """PVE::Storage::check_volume_access for ISO/template/import volumes: read access to the storage."""
    volume = call.state.volume(volid)
    if volume is not None and volume.content in ("iso", "vztmpl", "import"):
        call.require(f"/storage/{volume.storage}", ["Datastore.AllocateSpace", "Datastore.Audit"], any_of=True)


def check_storage_access(call: Call, config: dict[str, str], default_storage: str | None = None) -> None:
    """check_storage_access: a new disk needs Datastore.AllocateSpace on a storage holding images; an
    existing volume must be readable and hold images or an ISO; an import source must be images/import."""
    for key, value in config.items():
        if not is_drive(key):
            continue
        file, options = parse_options(value)
        if not file or file == "none" or file.endswith(":cloudinit") or file == "cloudinit":
            pass
        elif file == "cdrom" and is_cdrom(value):
            call.require("/", ["Sys.Console"])
        elif not is_cdrom(value) and (new := NEW_DISK.fullmatch(file)):
            name = new["storage"] or default_storage
            if not name:
                raise ApiError(500, "no storage ID specified (and no default storage)")
            call.require(f"/storage/{name}", ["Datastore.AllocateSpace"])
            if "images" not in find_storage(call.state, name).content:
                raise ParamError({"storage": f"storage '{name}' does not support vm images"})
        else:
            check_volume_access(call, file)
            volume = call.state.volume(file)
            if volume is not None and volume.content not in ("images", "iso"):
                raise ParamError({key: "content type needs to be 'images' or 'iso'"})
        source = options.get("import-from")
        if source:
            volume = call.state.volume(source)
            content = volume.content if volume else volume_type(source)
            if content not in ("images", "import"):
                raise ParamError({key: f"{source} has wrong type '{content}' - needs to be 'images' or 'import'"})
            check_volume_access(call, source)


def volume_type(volid: str) -> str:
    """parse_volname's vtype from the name alone: STORAGE:iso/x, STORAGE:import/x ... else images."""
    m = re.match(r"[^:]+:(iso|vztmpl|import|backup|snippets)/", volid)
    return m[1] if m else "images"


def check_dir_perm(call: Call, vmid: int, config: dict[str, str]) -> None:
    """check_dir_perm: a virtiofs share needs VM.Config.Disk and Mapping.Use on /mapping/dir/DIRID."""
    for key, value in config.items():
        if re.fullmatch(r"virtiofs\d+", key):
            call.require(f"/vms/{vmid}", ["VM.Config.Disk"])
            dirid = parse_options(value)[1].get("dirid") or parse_options(value)[0]
            call.require(f"/mapping/dir/{dirid}", ["Mapping.Use"])


def check_bridge_access(call: Call, config: dict[str, str]) -> None:
    """PVE 8's check_bridge_access: SDN.Use on /sdn/zones/localnetwork/BRIDGE (or .../BRIDGE/TAG)."""
    for key, value in config.items():
        if NET.fullmatch(key):
            options = nic_options(value)
            bridge = options.get("bridge")
            if bridge:
                tag = options.get("tag")
                call.require(f"/sdn/zones/localnetwork/{bridge}" + (f"/{tag}" if tag else ""), ["SDN.Use"])


IMPORT_SYNTAX = "'import-from' requires special syntax - use <storage ID>:0,import-from=<source>"


def check_drive_params(config: dict[str, str]) -> None:
    """check_drive_param: `import-from` only with STORAGE:0, and ISO volumes only with media=cdrom."""
    for key, value in config.items():
        if not is_drive(key):
            continue
        file, options = parse_options(value)
        if "import-from" in options:
            new = NEW_DISK.fullmatch(file)
            if not new or float(new["size"]) != 0:
                raise ParamError({key: IMPORT_SYNTAX})
        if volume_type(file) == "iso" and options.get("media") != "cdrom":
            raise ParamError({key: "explicit 'media=cdrom' is required for iso images"})


def require_vm_allocate(call: Call, vmid: int) -> None:
    """create_vm: VM.Allocate on /vms/VMID or on the pool; else a bare raise_perm_exc()."""
    pool = call.params.get("pool")
    if "VM.Allocate" in call.privileges(f"/vms/{vmid}"):
        return
    if pool and "VM.Allocate" in call.privileges(f"/pool/{pool}"):
        return
    raise Forbidden(None, [])


# --- NICs --------------------------------------------------------------------------------------------------


def nic_options(value: str) -> dict[str, str]:
    """A NIC's options with `model` and `macaddr` resolved (`virtio=MAC` is model=virtio,macaddr=MAC)."""
    options: dict[str, str] = {}
    for part in split_property_string(value):
        key, sep, text = part.partition("=")
        if key in NIC_MODELS:
            options["model"] = key
            if sep:
                options["macaddr"] = text
        elif sep:
            options[key] = text
        else:
            options["model"] = key
    return options


def print_net(options: dict[str, str]) -> str:
    """print_net: `MODEL=MAC` first, then the other keys sorted."""
    rest = {k: v for k, v in options.items() if k not in ("model", "macaddr")}
    return render_options(f"{options.get('model', 'virtio')}={options['macaddr']}", rest)


def add_random_macs(config: dict[str, str]) -> None:
    """PVE::QemuServer::Network::add_random_macs: a NIC without address gets one (Proxmox's BC:24:11 OUI)."""
    for key, value in list(config.items()):
        if NET.fullmatch(key):
            options = nic_options(value)
            options.setdefault("macaddr", "BC:24:11:" + ":".join(f"{random.randrange(256):02X}" for _ in range(3)))
            config[key] = print_net(options)


# --- disks -------------------------------------------------------------------------------------------------


def create_disks(call: Call, vm: Vm, config: dict[str, str], default_storage: str | None = None) -> dict[str, str]:
    """create_disks (worker side): the config values after allocating, importing and attaching; on a failure
    every volume made so far is freed and WorkerFailure raised."""
    made: list[str] = []
    result: dict[str, str] = {}
    try:
        for key in sorted(k for k in config if is_drive(k)):
            result[key] = make_drive(call.state, vm, key, config[key], made, default_storage)
    except WorkerFailure:
        for volid in made:
            volume = call.state.volume(volid)
            if volume is not None:
                del call.state.storages[volume.storage].volumes[volid]
        raise
    return result


def make_drive(state: PveState, vm: Vm, key: str, value: str, made: list[str], default_storage: str | None) -> str:
    """One drive: `none`/`cdrom`, `STORAGE:cloudinit`, `STORAGE:SIZE[,import-from=VOLID]` or a volume."""
    file, options = parse_options(value)
    if not file or file in ("none", "cdrom"):
        options.pop("size", None)
        return render_options(file, options)
    if file.endswith(":cloudinit") or file == "cloudinit":
        return make_cloudinit(state, vm, key, file, options, made, default_storage)
    new = NEW_DISK.fullmatch(file)
    if new and not is_cdrom(value):
        storage = find_storage(state, new["storage"] or default_storage or "")
        source = options.pop("import-from", None)
        size = import_size(state, source) if source else int(float(new["size"]) * 1024**3)
        volid = state.new_disk_volid(storage, vm.vmid)
        state.add_volume(Volume(volid, "images", options.pop("format", default_format(storage)), size, vm.vmid))
        made.append(volid)
        return render_options(volid, {**options, "size": size_text(size)})
    volume = state.volume(file)
    if volume is None:
        raise WorkerFailure(f"volume {file} does not exist")
    if volume.content not in ("images", "iso"):
        raise WorkerFailure(f"cannot use volume {file} - content type needs to be 'images' or 'iso'")
    return render_options(file, {**options, "size": size_text(volume.size)})


def make_cloudinit(state: PveState, vm: Vm, key: str, file: str, options: dict[str, str], made: list[str],
                   default_storage: str | None) -> str:
    """A cloud-init drive: one per VM, 4 MiB, `vm-N-cloudinit` (`.qcow2` on directory storages)."""
    other = next((k for k, v in vm.config.items() if is_drive(k) and k != key and is_cloudinit(v)), None)
    if other:
        raise WorkerFailure(f"{key} - cloud-init drive is already attached at '{other}'")
    storage = find_storage(state, file.split(":")[0] if ":" in file else default_storage or "")
    volid = storage.volume_name(vm.vmid, "cloudinit")
    state.add_volume(Volume(volid, "images", options.pop("format", default_format(storage)), 4 * 1024**2, vm.vmid))
    made.append(volid)
    return render_options(volid, {**options, "media": "cdrom"})


def default_format(storage: Storage) -> str:
    return "qcow2" if storage.type == "dir" else "raw"


def import_size(state: PveState, source: str) -> int:
    """import_from_volid: the source must have a size (exist) and not be a cloud-init disk."""
    volume = state.volume(source)
    if volume is None:
        raise WorkerFailure(f"cannot import from '{source}' - could not get size of {source}")
    if is_cloudinit(source):
        raise WorkerFailure(f"cannot import from '{source}' - cannot import from cloudinit disk")
    return volume.size


def default_boot(config: dict[str, str]) -> str:
    """get_default_bootdevices: the first hard disk, the first CD-ROM, the first NIC."""
    order = sorted((k for k in config if is_drive(k)), key=drive_sort_key)
    disks = [k for k in order if not is_cdrom(config[k])][:1]
    cdroms = [k for k in order if is_cdrom(config[k])][:1]
    nets = sorted((k for k in config if NET.fullmatch(k)), key=lambda k: int(k[3:]))[:1]
    return "order=" + ";".join(disks + cdroms + nets)


def drive_sort_key(key: str) -> tuple[int, int]:
    buses = ["ide", "sata", "scsi", "virtio", "efidisk", "tpmstate"]
    m = re.fullmatch(r"([a-z]+)(\d+)", key)
    assert m is not None
    return buses.index(m[1]), int(m[2])


def new_vm_config(config: dict[str, str], disks: dict[str, str]) -> dict[str, str]:
    """The config create_vm writes: the disks made, a boot order, smbios1 and vmgenid UUIDs, meta."""
    out = {**config, **disks}
    out.setdefault("boot", default_boot(out))
    out.setdefault("smbios1", f"uuid={random_uuid()}")
    if out.get("vmgenid", "1") == "1":
        out["vmgenid"] = random_uuid()
    out["meta"] = f"creation-qemu=9.2.0,ctime={int(time.time())}"
    return out


def random_uuid() -> str:
    h = f"{random.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"


def referenced_by_snapshot(vm: Vm, volid: str) -> bool:
    return any(volid == drive_file(v) for s in vm.snapshots.values() for k, v in s.config.items() if is_disk_key(k))


def config_only(params: dict[str, Any]) -> dict[str, str]:
    """The parameters that are config keys (`cdrom` resolved to ide2 as qemu-server's resolve_cdrom_alias)."""
    config = {k: str(v) for k, v in params.items() if k not in CONTROL}
    if "cdrom" in config:
        value = config.pop("cdrom")
        config["ide2"] = value if "media=" in value else value + ",media=cdrom"
    return config
