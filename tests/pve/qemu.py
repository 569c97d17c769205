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
from collections.abc import Callable
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


# --- pending changes and hot-plug ----------------------------------------------------------------------------
#
# update_vm_api writes every change to the config's [PENDING] section first (deletions to its `delete` list),
# then applies them: all at once on a stopped VM (vmconfig_apply_pending), on a running one only what
# vmconfig_hotplug_pending can hot-plug; the rest stays pending until the next start (vm_start_nolock applies
# it). Read from qemu-server's PVE/QemuServer.pm and PVE/API2/Qemu.pm (8.x); `Skip` is its `die "skip\n"`.

# vmconfig_hotplug_pending's $fast_plug_option, plus every cloud-init option ($confdesc_cloudinit, ipconfigN
# too): written to the config at once, also on a running VM, whatever the call changed.
FAST_PLUG = {"description", "hookscript", "lock", "migrate_downtime", "migrate_speed", "name", "onboot",
             "protection", "shares", "startup", "tags", "vmstatestorage"} | CLOUDINIT_OPTIONS
DEFAULT_HOTPLUG = ("network", "disk", "usb")  # the `hotplug` option's default ('1' is an alias of it)
# Hot-plugged when the `hotplug` option holds the feature, the device plugged or unplugged.
FEATURE_KEYS = {"tablet": "usb", "vcpus": "cpu", "memory": "memory"}
CGROUP_KEYS = {"cpuunits", "cpulimit"}  # changed in the VM's cgroup
# vmconfig_update_disk: options of an attached disk that take effect only when QEMU opens it again.
DISK_COLD_OPTIONS = ("aio", "discard", "iothread", "queues", "product", "cache", "ssd", "vendor", "ro")
# vmconfig_update_net: another model, MAC, queue count or MTU is another device (unplug, plug); bridge, tag,
# trunks, firewall, rate and link_down change in place (tap_plug, tap_rate_limit, set_link).
NIC_DEVICE_OPTIONS = ("model", "macaddr", "queues", "mtu")
USB = re.compile(r"usb\d+")
HOTPLUG_PROBLEM = "hotplug problem"  # vmconfig_hotplug_pending's $add_error
APPLY_PROBLEM = "unable to apply pending change"  # vmconfig_apply_pending's $add_apply_error


class Skip(Exception):
    """qemu-server's `die "skip\\n"`: the change cannot be hot-plugged and stays pending."""


class HotplugError(Exception):
    """A change that failed: it stays pending and the API call fails with it (raise_param_exc)."""


def split_list(text: str | None) -> list[str]:
    """PVE::Tools::split_list: items separated by commas, semicolons or blanks."""
    return [k for k in re.split(r"[,;\s]+", text or "") if k]


def is_fast_plug(key: str) -> bool:
    return key in FAST_PLUG or re.fullmatch(r"ipconfig\d+", key) is not None


def hotplug_features(config: dict[str, str]) -> set[str]:
    """parse_hotplug_features of the running config's `hotplug`: '0' none, '1' (the default) network,disk,usb."""
    value = config.get("hotplug", "1")
    if value == "0":
        return set()
    return set(DEFAULT_HOTPLUG) if value == "1" else set(split_list(value))


def usb_hotplug(config: dict[str, str], features: set[str]) -> bool:
    """vmconfig_hotplug_pending's $usb_hotplug: the usb feature and ostype l26 or Windows > 7 (its machine
    version >= 7.1 condition always holds: PVE 8.4 runs QEMU 9)."""
    return "usb" in features and config.get("ostype", "") in ("l26", "win8", "win10", "win11")


def need(feature: str, features: set[str]) -> None:
    if feature not in features:
        raise Skip


# --- staging: update_vm_api writes the [PENDING] section


def stage_delete(state: PveState, vm: Vm, key: str, force: bool) -> bool:
    """update_vm_api's delete loop: a pending value is dropped (a pending disk becomes unusedN); unusedN and
    tags go at once; anything else becomes a pending deletion. False when the key is set nowhere (PVE warns
    "cannot delete ... not set" and carries on)."""
    if key not in vm.config and key not in vm.pending:
        return False
    dropped = vm.pending.pop(key, None)
    if dropped is not None and is_drive(key):
        register_unused(state, vm, dropped)
    if UNUSED.fullmatch(key):
        free_unused(state, vm, key)
    elif key == "tags":
        vm.config.pop(key, None)
    else:
        vm.pending_delete[key] = force
    return True


def stage_value(state: PveState, vm: Vm, key: str, value: str) -> None:
    """update_vm_api's add/change loop: the new value goes to [PENDING] (a pending disk it replaces becomes
    unusedN) and a pending deletion of the key is cancelled (remove_from_pending_delete)."""
    previous = vm.pending.get(key)
    vm.pending[key] = value
    vm.pending_delete.pop(key, None)
    if previous is not None and previous != value and is_drive(key):
        register_unused(state, vm, previous)


def stage_boot_order(state: PveState, vm: Vm, deletes: set[str], config: dict[str, str]) -> bool:
    """update_vm_api's boot order upkeep, from the current `boot: order=...`: a deleted device leaves it, a new
    CD drive (not cloud-init) joins it, and the new order is a pending `boot` like any other change. Not when
    the call sets or deletes `boot` itself. True when it changed."""
    order = boot_order(vm.config)
    if not order or "boot" in deletes or "boot" in config:
        return False
    new = [d for d in order if d not in deletes]
    new += [k for k, v in config.items() if is_drive(k) and is_cdrom(v) and not is_cloudinit(v) and k not in new]
    if new == order:
        return False
    stage_value(state, vm, "boot", "order=" + ";".join(new) if new else "")
    return True


def boot_order(config: dict[str, str]) -> list[str] | None:
    """The devices of `boot: order=a;b;c`; None for a legacy boot string or none."""
    order = parse_options(config.get("boot", ""))[1].get("order")
    return order.split(";") if order is not None else None


def apply_changes(state: PveState, vm: Vm, modified: set[str]) -> dict[str, str]:
    """The end of update_vm_api, once the changes are staged: cleanup_pending, then all of them on a stopped
    VM (vmconfig_apply_pending), what can be hot-plugged on a running one (vmconfig_hotplug_pending, limited
    to the `modified` keys). Returns the errors by key (raise_param_exc's)."""
    cleanup_pending(vm)
    if vm.status == "running":
        return hotplug_pending(state, vm, modified)
    return apply_pending(state, vm)


def cleanup_pending(vm: Vm) -> None:
    """PVE::AbstractConfig::cleanup_pending: a pending value equal to the current one, or the pending deletion
    of a key the config does not have, is no change."""
    for key in [k for k, v in vm.pending.items() if vm.config.get(k) == v]:
        del vm.pending[key]
    for key in [k for k in vm.pending_delete if k not in vm.config]:
        del vm.pending_delete[key]


# --- volumes a change frees or leaves unused


def register_unused(state: PveState, vm: Vm, value: str) -> None:
    """vmconfig_register_unused_drive, with write_vm_config's cleanup of unusedN a drive uses again: a
    cloud-init volume is freed, a CD left alone, another disk of this VM becomes unusedN - unless a drive
    (current or pending) still uses the volume."""
    volid = drive_file(value)
    volume = state.volume(volid)
    if volume is None or volume.vmid != vm.vmid or volume_in_use(vm, volid):
        return
    if is_cloudinit(value):
        if not referenced_by_snapshot(vm, volid):
            del state.storages[volume.storage].volumes[volid]
    elif not is_cdrom(value):
        add_unused(vm, volid)


def volume_in_use(vm: Vm, volid: str) -> bool:
    return any(is_drive(k) and drive_file(v) == volid for c in (vm.config, vm.pending) for k, v in c.items())


def add_unused(vm: Vm, volid: str) -> str:
    """PVE::AbstractConfig::add_unused_volume: the first free unusedN, never the same volume twice."""
    n = 0
    while f"unused{n}" in vm.config:
        if vm.config[f"unused{n}"] == volid:
            return f"unused{n}"
        n += 1
    vm.config[f"unused{n}"] = volid
    return f"unused{n}"


def free_unused(state: PveState, vm: Vm, key: str) -> None:
    """Deleting unusedN frees its volume at once, also on a running VM (try_deallocate_drive), unless another
    VM owns it or a snapshot references it."""
    volid = vm.config.pop(key)
    volume = state.volume(volid)
    if volume is not None and volume.vmid == vm.vmid and not referenced_by_snapshot(vm, volid):
        del state.storages[volume.storage].volumes[volid]


def detach_drive(state: PveState, vm: Vm, key: str, force: bool) -> None:
    """vmconfig_delete_or_detach_drive: with force the volume is freed (try_deallocate_drive: this VM's, no CD,
    refused while a snapshot references it), else it becomes unusedN."""
    value = vm.config[key]
    volid = drive_file(value)
    volume = state.volume(volid)
    if not force:
        del vm.config[key]
        register_unused(state, vm, value)
        return
    if volume is None or volume.vmid != vm.vmid or (is_cdrom(value) and not is_cloudinit(value)):
        del vm.config[key]
        return
    if referenced_by_snapshot(vm, volid):
        raise HotplugError(f"unable to delete '{volid}' - volume is still in use (snapshot?)")
    del vm.config[key]
    del state.storages[volume.storage].volumes[volid]


# --- applying: vmconfig_apply_pending (a stopped VM's change, and every start)


def apply_pending(state: PveState, vm: Vm) -> dict[str, str]:
    """vmconfig_apply_pending (cold plug): the pending deletions (a drive detached to unusedN, or freed with
    force), then every pending value (a replaced disk becomes unusedN). Returns the errors by key."""
    errors: dict[str, str] = {}
    for key, force in sorted(vm.pending_delete.items()):
        attempt(errors, key, APPLY_PROBLEM, cold_unplug, state, vm, key, force)
    cleanup_pending(vm)
    for key, value in sorted(vm.pending.items()):
        set_current(state, vm, key, value)
    return errors


def cold_unplug(state: PveState, vm: Vm, key: str, force: bool) -> None:
    if key in vm.config and is_drive(key):
        detach_drive(state, vm, key, force)
    vm.config.pop(key, None)
    del vm.pending_delete[key]


def set_current(state: PveState, vm: Vm, key: str, value: str) -> None:
    """One pending value into the config; the drive it replaces is registered unused."""
    old = vm.config.get(key)
    vm.config[key] = value
    del vm.pending[key]
    if old is not None and is_drive(key):
        register_unused(state, vm, old)


def attempt(errors: dict[str, str], key: str, problem: str, change: Callable[..., None], *args: Any) -> None:
    """One key's change: a Skip leaves it pending silently, a HotplugError is recorded as PVE words it."""
    try:
        change(*args)
    except Skip:
        pass
    except HotplugError as e:
        errors[key] = f"{problem} - {e}" if problem == HOTPLUG_PROBLEM else f"{problem} {key} : {e}"


# --- hot-plug: vmconfig_hotplug_pending (a running VM's change)


def hotplug_pending(state: PveState, vm: Vm, modified: set[str]) -> dict[str, str]:
    """vmconfig_hotplug_pending: fast-plug values at once; then, of the keys this call changed (`$selection`),
    each deletion and value the running VM can take. The rest stays pending; the errors are returned."""
    for key in [k for k in vm.pending if is_fast_plug(k)]:
        vm.config[key] = vm.pending.pop(key)
    features = hotplug_features(vm.config)
    errors: dict[str, str] = {}
    for key, force in sorted(vm.pending_delete.items()):
        if key in modified:
            attempt(errors, key, HOTPLUG_PROBLEM, hot_unplug, state, vm, key, force, features)
    for key, value in sorted(vm.pending.items()):
        if key in modified:
            attempt(errors, key, HOTPLUG_PROBLEM, hot_plug, state, vm, key, value, features)
    return errors


def hot_unplug(state: PveState, vm: Vm, key: str, force: bool, features: set[str]) -> None:
    """A pending deletion on a running VM, done if vmconfig_hotplug_pending can unplug it."""
    if key == "hotplug":
        if re.search(r"cpu|memory", vm.config.get("hotplug", "")):
            raise Skip
    elif key in FEATURE_KEYS:
        need(FEATURE_KEYS[key], features)
    elif USB.fullmatch(key):
        if not usb_hotplug(vm.config, features):
            raise Skip
    elif key == "balloon":
        if vm.config.get("balloon") == "0":
            raise Skip  # enabling the balloon device is not hot-pluggable
    elif NET.fullmatch(key):
        need("network", features)
    elif is_drive(key):
        need("disk", features)
        if re.fullmatch(r"(efidisk|ide|sata|tpmstate)\d+", key):
            raise Skip
        detach_drive(state, vm, key, force)
    elif not (is_fast_plug(key) or key in CGROUP_KEYS):
        raise Skip  # virtiofsN, cores, agent, smbios1, scsihw, boot, ostype ...: at the next start
    vm.config.pop(key, None)
    del vm.pending_delete[key]


def hot_plug(state: PveState, vm: Vm, key: str, value: str, features: set[str]) -> None:
    """A pending value on a running VM, applied if vmconfig_hotplug_pending can plug or change it in place."""
    old = vm.config.get(key)
    if key == "hotplug":
        if re.search(r"cpu|memory", value + " " + (old or "")):
            raise Skip
    elif key in FEATURE_KEYS:
        need(FEATURE_KEYS[key], features)
    elif USB.fullmatch(key):
        if not usb_hotplug(vm.config, features):
            raise Skip
    elif key == "balloon":
        if (old != "0") != (value != "0"):
            raise Skip  # enabling or disabling the balloon device is not hot-pluggable
    elif NET.fullmatch(key):
        update_net(old, value, features)
    elif is_drive(key):
        update_disk(key, old, value, features)
    elif key == "agent":
        update_agent(old, value)
    elif key not in CGROUP_KEYS:
        raise Skip  # virtiofsN, cores, smbios1, scsihw, boot, ostype ...: at the next start
    set_current(state, vm, key, value)


def update_net(old: str | None, value: str, features: set[str]) -> None:
    """vmconfig_update_net: a bridged NIC keeping model, MAC, queues and MTU changes in place (link_down by
    set_link, bridge/tag/firewall by tap_plug, rate by tap_rate_limit) whatever `hotplug` says; another NIC,
    or a new one, needs the network hot-plug feature."""
    if old is not None:
        before, after = nic_options(old), nic_options(value)
        same_device = all(before.get(o) == after.get(o) for o in NIC_DEVICE_OPTIONS)
        if same_device and before.get("bridge") and after.get("bridge"):
            return
    need("network", features)


def update_disk(key: str, old: str | None, value: str, features: set[str]) -> None:
    """vmconfig_update_disk: a CD changes its medium; an attached disk changes its throttling in place but not
    cache/aio/discard/iothread/ssd/...; another volume, or a new disk, needs the disk feature and a SCSI or
    VirtIO bus (IDE and SATA cannot be hot-plugged); EFI and TPM state disks never."""
    if re.fullmatch(r"(efidisk|tpmstate)\d+", key):
        raise Skip
    if old is not None:
        (old_file, before), (new_file, after) = parse_options(old), parse_options(value)
        if before.get("media", "disk") != after.get("media", "disk"):
            raise HotplugError("unable to change media type")
        if is_cdrom(old):
            return
        if new_file == old_file:
            if any(before.get(o) != after.get(o) for o in DISK_COLD_OPTIONS):
                raise Skip
            return
    need("disk", features)
    if re.fullmatch(r"(ide|sata)\d+", key):
        raise Skip


def update_agent(old: str | None, value: str) -> None:
    """vmconfig_update_agent: only fstrim_cloned_disks changes on a running VM, and only with an agent
    configured already."""
    if old is None:
        raise Skip
    before, after = agent_options(old), agent_options(value)
    if any(before.get(o) != after.get(o) for o in set(before) | set(after) if o != "fstrim_cloned_disks"):
        raise Skip


def agent_options(value: str) -> dict[str, str]:
    """parse_guest_agent: the bare value is `enabled`."""
    bare, options = parse_options(value)
    if bare:
        options["enabled"] = bare
    return options
