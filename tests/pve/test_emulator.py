"""proxmoxer against the emulator, exactly as the deploy client uses it (threads only: no process started)."""

from __future__ import annotations

import hashlib
import io

import pytest
import requests
from proxmoxer import ProxmoxAPI, ResourceException

from .emulator import PveEmulator
from .state import ExecResult, GiB, Volume

QCOW2 = b"QFI\xfb" + b"\0" * 20 + (2 * 1024**3).to_bytes(8, "big") + b"\0" * 64  # header: 2 GiB virtual size


def upload(api: ProxmoxAPI, name: str, data: bytes = QCOW2, content: str = "import", **extra: str) -> str:
    f = io.BytesIO(data)
    f.name = name
    return api.nodes("pve").storage("local").upload.post(content=content, filename=f, **extra)  # type: ignore[no-any-return]


def wait(api: ProxmoxAPI, upid: str) -> dict[str, object]:
    for _ in range(10):
        status = api.nodes("pve").tasks(upid).status.get()
        if status["status"] == "stopped":
            return status  # type: ignore[no-any-return]
    raise AssertionError(f"task {upid} still running")


def create_vm(api: ProxmoxAPI, vmid: int = 100, **config: object) -> str:
    upload(api, "debian.qcow2")
    defaults = {"name": "intranet", "scsi0": "local-zfs:0,import-from=local:import/debian.qcow2",
                "ide2": "local-zfs:cloudinit", "net0": "virtio,bridge=vmbr0,link_down=1", "agent": 1,
                "tags": "homelab", "scsihw": "virtio-scsi-single"}
    return api.nodes("pve").qemu.post(vmid=vmid, **{**defaults, **config})  # type: ignore[no-any-return]


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_version_unverified_and_configurable_version(pve: PveEmulator) -> None:
    api = ProxmoxAPI(host="127.0.0.1", port=pve.port, user="homelab@pve", token_name="deploy",
                     token_value=pve.token[1], verify_ssl=False)
    assert api.version.get()["release"] == "8.4"
    pve.state.version = "8.3.5"
    assert api.version.get() == {"version": "8.3.5", "release": "8.3", "repoid": pve.state.repoid}
    assert pve.token[0] == "homelab@pve!deploy"


def test_verifies_with_the_ca_file_and_shows_the_fingerprint(pve: PveEmulator) -> None:
    api = ProxmoxAPI(**pve.proxmoxer_kwargs(verify_ssl=str(pve.ca_file)))
    assert api.nodes.get()[0]["ssl_fingerprint"] == pve.fingerprint
    assert len(pve.fingerprint.split(":")) == 32
    with pytest.raises(requests.exceptions.SSLError):
        ProxmoxAPI(**pve.proxmoxer_kwargs(verify_ssl=True)).version.get()


def test_storages_with_content_types(api: ProxmoxAPI) -> None:
    storages = {s["storage"]: s for s in api.nodes("pve").storage.get()}
    assert set(storages["local"]["content"].split(",")) >= {"iso", "vztmpl", "import"}
    assert storages["local-zfs"]["content"] == "images,rootdir"
    assert [s["storage"] for s in api.nodes("pve").storage.get(content="images")] == ["local-zfs"]


def test_upload_import_qcow2_with_checksum(api: ProxmoxAPI) -> None:
    upid = upload(api, "intranet-1.0.qcow2", checksum=hashlib.sha256(QCOW2).hexdigest(),
                  **{"checksum-algorithm": "sha256"})
    assert upid.startswith("UPID:pve:") and ":imgcopy::homelab@pve!deploy:" in upid
    assert wait(api, upid)["exitstatus"] == "OK"
    [volume] = api.nodes("pve").storage("local").content.get(content="import")
    assert volume == {**volume, "volid": "local:import/intranet-1.0.qcow2", "format": "qcow2", "size": 2 * 1024**3}


def test_upload_checksum_mismatch_fails_the_task(api: ProxmoxAPI) -> None:
    upid = upload(api, "x.qcow2", checksum="0" * 64, **{"checksum-algorithm": "sha256"})
    assert wait(api, upid)["exitstatus"].startswith("checksum mismatch: got ")
    assert api.nodes("pve").storage("local").content.get() == []
    assert api.nodes("pve").tasks(upid).log.get()[-1]["t"].startswith("TASK ERROR: checksum mismatch")


@pytest.mark.parametrize(("name", "content", "reason"), [
    ("notes.txt", "import", "invalid filename or wrong extension"),
    ("image.qcow2", "iso", "wrong file extension"),
])
def test_upload_extension_rules(api: ProxmoxAPI, name: str, content: str, reason: str) -> None:
    with pytest.raises(ResourceException) as e:
        upload(api, name, content=content)
    assert e.value.status_code == 400 and e.value.errors == {"filename": reason}


def test_create_vm_with_import_from_and_poll_the_task(api: ProxmoxAPI, pve: PveEmulator) -> None:
    upid = create_vm(api)
    first = api.nodes("pve").tasks(upid).status.get()
    assert first["status"] == "running" and first["type"] == "qmcreate" and first["id"] == "100"
    assert wait(api, upid)["exitstatus"] == "OK"
    config = api.nodes("pve").qemu(100).config.get()
    assert config["scsi0"] == "local-zfs:vm-100-disk-0,size=2G"
    assert config["ide2"] == "local-zfs:vm-100-cloudinit,media=cdrom"
    assert config["net0"].startswith("virtio=BC:24:11:") and config["net0"].endswith(",bridge=vmbr0,link_down=1")
    assert config["agent"] == "1" and len(config["digest"]) == 40
    assert api.cluster.resources.get(type="vm")[0]["vmid"] == 100
    assert api.cluster.nextid.get() == "101"
    assert pve.calls("POST", r"^/nodes/pve/qemu$")[0].params["scsi0"].endswith("import-from=local:import/debian.qcow2")


def test_bad_parameter_is_400_naming_it(api: ProxmoxAPI) -> None:
    with pytest.raises(ResourceException) as e:
        api.nodes("pve").qemu.post(vmid=100, scsci0="local-zfs:0,import-from=local:import/x.qcow2")
    assert e.value.status_code == 400
    assert e.value.content == "Parameter verification failed."
    assert list(e.value.errors) == ["scsci0"]


def test_missing_or_wrong_token_is_401(pve: PveEmulator) -> None:
    anonymous = requests.get(f"{pve.url}/version", verify=str(pve.ca_file), timeout=5)
    assert (anonymous.status_code, anonymous.reason) == (401, "No ticket")
    with pytest.raises(ResourceException) as e:
        ProxmoxAPI(**{**pve.proxmoxer_kwargs(verify_ssl=str(pve.ca_file)), "token_value": "wrong"}).version.get()
    assert (e.value.status_code, e.value.content) == (401, "invalid token value!")
    with pytest.raises(ResourceException) as e:
        ProxmoxAPI(**{**pve.proxmoxer_kwargs(verify_ssl=str(pve.ca_file)), "token_name": "other"}).version.get()
    assert e.value.content == "no such token 'other' for user 'homelab@pve'"


def test_permission_denied_is_403(api: ProxmoxAPI, pve: PveEmulator) -> None:
    tokenid, _ = pve.token
    pve.state.acl[tokenid] = {"/": {"VM.Audit", "Datastore.Audit"}}
    assert api.access.permissions.get(path="/vms/100") == {"/vms/100": {"Datastore.Audit": 1, "VM.Audit": 1}}
    with pytest.raises(ResourceException) as e:
        api.nodes("pve").qemu.post(vmid=100)
    assert e.value.status_code == 403 and e.value.content == "Permission check failed"  # create_vm: bare
    with pytest.raises(ResourceException) as e:
        api.nodes("pve").qemu(100).status.start.post()
    assert e.value.content == "Permission check failed (/vms/100, VM.PowerMgmt)"  # the schema's check
    with pytest.raises(ResourceException) as e:
        upload(api, "x.qcow2")
    assert e.value.status_code == 403 and "Datastore.AllocateTemplate" in e.value.content


def test_injected_500_hang_and_task_error(api: ProxmoxAPI, pve: PveEmulator) -> None:
    pve.fail("GET", r"^/version$", nth=2, message="proxy loop detected")
    api.version.get()
    with pytest.raises(ResourceException) as e:
        api.version.get()
    assert e.value.status_code == 500 and e.value.content == "proxy loop detected"
    api.version.get()

    pve.hang("GET", r"^/nodes$", seconds=3)
    impatient = ProxmoxAPI(**pve.proxmoxer_kwargs(verify_ssl=str(pve.ca_file), timeout=0.5))
    with pytest.raises(requests.exceptions.ReadTimeout):
        impatient.nodes.get()

    pve.fail_task("POST", r"/status/start$", exitstatus="start failed: QEMU exited with code 1")
    wait(api, create_vm(api))
    upid = api.nodes("pve").qemu(100).status.start.post()
    assert wait(api, upid)["exitstatus"] == "start failed: QEMU exited with code 1"
    assert api.nodes("pve").qemu(100).status.current.get()["status"] == "stopped"


def test_digest_guards_config_changes(api: ProxmoxAPI) -> None:
    wait(api, create_vm(api))
    digest = api.nodes("pve").qemu(100).config.get()["digest"]
    api.nodes("pve").qemu(100).config.put(memory=4096, digest=digest)
    with pytest.raises(ResourceException) as e:
        api.nodes("pve").qemu(100).config.put(memory=2048, digest=digest)
    assert e.value.status_code == 500 and "detected modified configuration" in e.value.content


def test_power_and_guest_agent(api: ProxmoxAPI, pve: PveEmulator) -> None:
    wait(api, create_vm(api))
    vm = api.nodes("pve").qemu(100)
    with pytest.raises(ResourceException) as e:
        vm.agent.ping.post()
    assert e.value.content == "VM 100 is not running"
    assert wait(api, vm.status.start.post())["exitstatus"] == "OK"
    agent = pve.state.vms[100].agent
    agent.commands["systemctl is-active homelab-stack"] = ExecResult(out="active\n", polls=1)
    agent.interfaces = [{"name": "eth0", "ip-addresses": [{"ip-address": "192.168.1.101", "ip-address-type": "ipv4",
                                                           "prefix": 24}]}]
    assert vm.agent.ping.post() == {"result": {}}
    pid = vm.agent.exec.post(command=["systemctl", "is-active", "homelab-stack"])["pid"]
    assert vm.agent("exec-status").get(pid=pid) == {"exited": 0}
    assert vm.agent("exec-status").get(pid=pid) == {"exited": 1, "exitcode": 0, "out-data": "active\n"}
    assert vm.agent("network-get-interfaces").get()["result"][0]["name"] == "eth0"
    agent.responding = False
    with pytest.raises(ResourceException):
        vm.agent.ping.post()
    assert wait(api, vm.status.shutdown.post())["exitstatus"] == "OK"
    assert wait(api, vm.status.shutdown.post())["exitstatus"] == "OK"  # already stopped: vm_stop returns
    with pytest.raises(ResourceException) as e:
        vm.status.reboot.post()
    assert e.value.content == "VM 100 not running"


def test_move_disk_to_another_vm(api: ProxmoxAPI) -> None:
    wait(api, create_vm(api, 100))
    wait(api, api.nodes("pve").qemu.post(vmid=101, name="data", scsi1="local-zfs:8"))
    source = api.nodes("pve").qemu(101)
    wait(api, source.snapshot.post(snapname="before"))
    with pytest.raises(ResourceException) as e:
        source.move_disk.post(disk="scsi1", **{"target-vmid": 100, "target-disk": "scsi1"})
    assert "used by a snapshot" in e.value.content
    wait(api, source.snapshot("before").delete())
    with pytest.raises(ResourceException) as e:
        source.move_disk.post(disk="scsi1", **{"target-vmid": 100, "target-disk": "scsi0"})
    assert e.value.content == "Target disk key 'scsi0' is already in use for VM '100'"
    wait(api, source.status.start.post())
    with pytest.raises(ResourceException) as e:
        source.move_disk.post(disk="scsi1", **{"target-vmid": 100, "target-disk": "scsi1"})
    assert "while the source VM is running" in e.value.content
    wait(api, source.status.stop.post())
    assert wait(api, source.move_disk.post(disk="scsi1", **{"target-vmid": 100, "target-disk": "scsi1"}))[
        "exitstatus"] == "OK"
    assert api.nodes("pve").qemu(100).config.get()["scsi1"] == "local-zfs:vm-100-disk-1,size=8G"
    assert "scsi1" not in source.config.get()


def test_snapshot_rollback_and_delete_vm(api: ProxmoxAPI, pve: PveEmulator) -> None:
    wait(api, create_vm(api))
    vm = api.nodes("pve").qemu(100)
    wait(api, vm.snapshot.post(snapname="fresh", description="after create"))
    vm.config.put(memory=8192)
    assert [s["name"] for s in vm.snapshot.get()] == ["fresh", "current"]
    wait(api, vm.snapshot("fresh").rollback.post())
    assert "memory" not in vm.config.get()
    assert wait(api, vm.snapshot("nope").delete())["exitstatus"] == "snapshot 'nope' does not exist"
    with pytest.raises(ResourceException) as e:
        vm.snapshot.post(snapname="current")
    assert e.value.content == "unable to use snapshot name 'current' (reserved name)"
    wait(api, vm.status.start.post())
    with pytest.raises(ResourceException) as e:
        vm.delete()
    assert e.value.content == "VM 100 is running - destroy failed"
    wait(api, vm.status.stop.post())
    wait(api, vm.delete())
    assert api.nodes("pve").storage("local-zfs").content.get() == []
    assert 100 not in pve.state.vms


def test_destroy_frees_only_owned_volumes_the_config_references(api: ProxmoxAPI, pve: PveEmulator) -> None:
    """qemu-server's destroy_vm: referenced volumes of this VMID go; another VM's volume attached here and (without
    destroy-unreferenced-disks) a volume merely named after the VMID stay."""
    stray = pve.state.add_volume(Volume("local-zfs:vm-100-disk-7", "images", "raw", GiB, vmid=100))
    other = pve.state.add_volume(Volume("local-zfs:vm-300-disk-0", "images", "raw", GiB, vmid=300))
    wait(api, create_vm(api, scsi1=other.volid))
    wait(api, api.nodes("pve").qemu(100).delete())
    assert {v["volid"] for v in api.nodes("pve").storage("local-zfs").content.get()} == {stray.volid, other.volid}
    wait(api, create_vm(api, 101))
    pve.state.add_volume(Volume("local-zfs:vm-101-disk-7", "images", "raw", GiB, vmid=101))
    wait(api, api.nodes("pve").qemu(101).delete(**{"destroy-unreferenced-disks": 1}))
    assert {v["volid"] for v in api.nodes("pve").storage("local-zfs").content.get()} == {stray.volid, other.volid}


def test_unknown_path_is_501(api: ProxmoxAPI) -> None:
    with pytest.raises(ResourceException) as e:
        api.nodes("pve").bogus.get()
    assert e.value.status_code == 501 and e.value.content == "Method 'GET /nodes/pve/bogus' not implemented"


def test_cdrom_from_an_uploaded_iso_and_missing_volumes(api: ProxmoxAPI, pve: PveEmulator) -> None:
    wait(api, upload(api, "debian-13.iso", b"\0" * 2048, content="iso"))
    assert api.nodes("pve").storage("local").content.get(content="iso")[0]["volid"] == "local:iso/debian-13.iso"
    wait(api, api.nodes("pve").qemu.post(vmid=100, ide2="local:iso/debian-13.iso,media=cdrom"))
    assert api.nodes("pve").qemu(100).config.get()["ide2"] == "local:iso/debian-13.iso,media=cdrom,size=2K"
    with pytest.raises(ResourceException) as e:
        api.nodes("pve").qemu.post(vmid=101, ide2="local:iso/debian-13.iso")
    assert e.value.errors == {"ide2": "explicit 'media=cdrom' is required for iso images"}
    upid = api.nodes("pve").qemu.post(vmid=101, scsi0="local-zfs:0,import-from=local:import/missing.qcow2",
                                      ide2="local-zfs:cloudinit")
    assert wait(api, upid)["exitstatus"] == ("unable to create VM 101 - cannot import from "
                                             "'local:import/missing.qcow2' - could not get size of "
                                             "local:import/missing.qcow2")
    assert 101 not in pve.state.vms
    assert api.nodes("pve").storage("local-zfs").content.get(vmid=101) == []
    with pytest.raises(ResourceException) as e:
        api.nodes("pve").qemu.post(vmid=100)
    assert "already exists" in e.value.content


def test_unknown_vm_node_and_task(api: ProxmoxAPI) -> None:
    with pytest.raises(ResourceException) as e:
        api.nodes("pve").qemu(999).status.current.get()
    assert e.value.content == "Configuration file 'nodes/pve/qemu-server/999.conf' does not exist"
    with pytest.raises(ResourceException) as e:
        api.nodes("pve2").qemu.get()
    assert e.value.content.startswith("hostname lookup 'pve2' failed")
    with pytest.raises(ResourceException) as e:
        api.nodes("pve").tasks("UPID:pve:00000001:00000001:00000001:qmstart:100:root@pam:").status.get()
    assert e.value.content == "no such task"


def test_nextid_with_a_taken_vmid_is_400(api: ProxmoxAPI) -> None:
    wait(api, create_vm(api))
    assert api.cluster.nextid.get(vmid=105) == "105"
    with pytest.raises(ResourceException) as e:
        api.cluster.nextid.get(vmid=100)
    assert e.value.status_code == 400 and e.value.errors == {"vmid": "VM 100 already exists"}


def test_in_code_permission_checks(api: ProxmoxAPI, pve: PveEmulator) -> None:
    """create_vm asks VM.Allocate, the disks' storages, the VM.Config.* of each key and SDN.Use on the bridge."""
    tokenid, _ = pve.token
    upload(api, "debian.qcow2")
    pve.state.acl[tokenid] = {"/vms": {"VM.Allocate", "VM.Config.Disk", "VM.Config.Options"},
                              "/storage": {"Datastore.AllocateSpace"}}
    with pytest.raises(ResourceException) as e:
        api.nodes("pve").qemu.post(vmid=100, net0="virtio,bridge=vmbr0")
    assert e.value.content == "Permission check failed (/vms/100, VM.Config.Network)"
    pve.state.acl[tokenid]["/vms"].add("VM.Config.Network")
    with pytest.raises(ResourceException) as e:
        api.nodes("pve").qemu.post(vmid=100, net0="virtio,bridge=vmbr0")
    assert e.value.content == "Permission check failed (/sdn/zones/localnetwork/vmbr0, SDN.Use)"
    pve.state.acl[tokenid]["/sdn/zones/localnetwork"] = {"SDN.Use"}
    wait(api, api.nodes("pve").qemu.post(vmid=100, net0="virtio,bridge=vmbr0", name="x",
                                         scsi0="local-zfs:0,import-from=local:import/debian.qcow2"))
    assert pve.state.vms[100].config["scsi0"].startswith("local-zfs:vm-100-disk-0")


def test_listings_hide_what_the_token_cannot_audit(api: ProxmoxAPI, pve: PveEmulator) -> None:
    wait(api, create_vm(api))
    tokenid, _ = pve.token
    pve.state.acl[tokenid] = {"/storage/local": {"Datastore.Audit"}}
    assert [s["storage"] for s in api.nodes("pve").storage.get()] == ["local"]
    assert api.cluster.resources.get(type="vm") == []
    assert api.nodes("pve").qemu.get() == []


def test_storage_content_lists_only_what_the_token_may_read(api: ProxmoxAPI, pve: PveEmulator) -> None:
    """pve-storage's check_volume_access as its content index applies it: an upload needs Datastore.Audit (or
    AllocateSpace) on the storage, a VM's disk Datastore.Audit and VM.Config.Disk on that VM, Datastore.Allocate
    reads everything; what the token may not read is left out."""
    wait(api, upload(api, "debian.qcow2"))
    for vmid in (101, 102):
        pve.state.add_volume(Volume(f"local-zfs:vm-{vmid}-disk-1", "images", "raw", 20 * GiB, vmid=vmid))
    tokenid, _ = pve.token
    pve.state.acl[tokenid] = {"/storage": {"Datastore.Audit"}, "/vms/101": {"VM.Config.Disk"}}
    zfs, local = api.nodes("pve").storage("local-zfs"), api.nodes("pve").storage("local")
    assert [v["volid"] for v in zfs.content.get(content="images")] == ["local-zfs:vm-101-disk-1"]
    assert [v["volid"] for v in local.content.get()] == ["local:import/debian.qcow2"]
    pve.state.acl[tokenid] = {"/storage/local-zfs": {"Datastore.Audit", "Datastore.Allocate"}}
    assert [v["volid"] for v in zfs.content.get()] == ["local-zfs:vm-101-disk-1", "local-zfs:vm-102-disk-1"]


def test_storage_content_lists_only_the_content_types_the_storage_holds(api: ProxmoxAPI, pve: PveEmulator) -> None:
    """volume_list asks the plugin only for the content types storage.cfg gives the storage."""
    pve.state.add_volume(Volume("local:101/vm-101-disk-1.qcow2", "images", "qcow2", 20 * GiB, vmid=101))
    assert api.nodes("pve").storage("local").content.get(content="images") == []
    pve.state.storages["local"].content.add("images")
    assert [v["volid"] for v in api.nodes("pve").storage("local").content.get(content="images")] == [
        "local:101/vm-101-disk-1.qcow2"]


def test_upload_refusals(api: ProxmoxAPI, pve: PveEmulator) -> None:
    with pytest.raises(ResourceException) as e:
        api.nodes("pve").storage("local-zfs").upload.post(content="import", filename=io.BytesIO(b"x"))
    assert e.value.status_code in (400, 500)
    f = io.BytesIO(QCOW2)
    f.name = "disk.qcow2"
    with pytest.raises(ResourceException) as e:
        api.nodes("pve").storage("local-zfs").upload.post(content="import", filename=f)
    assert e.value.content == "can't upload to storage type 'zfspool'"
    pve.state.storages["local"].content.discard("import")
    with pytest.raises(ResourceException) as e:
        upload(api, "disk.qcow2")
    assert e.value.content == "storage 'local' does not support 'import' content"


def test_uploaded_names_are_normalized_and_deletable(api: ProxmoxAPI) -> None:
    wait(api, upload(api, "my disk (1).qcow2"))
    volid = "local:import/my_disk__1_.qcow2"
    assert [v["volid"] for v in api.nodes("pve").storage("local").content.get()] == [volid]
    wait(api, api.nodes("pve").storage("local").content(volid).delete())
    assert api.nodes("pve").storage("local").content.get() == []


def test_json_body_and_request_log(pve: PveEmulator) -> None:
    tokenid, secret = pve.token
    answer = requests.post(f"{pve.url}/nodes/pve/qemu", json={"vmid": 100, "agent": True},
                           headers={"Authorization": f"PVEAPIToken={tokenid}={secret}"}, verify=str(pve.ca_file),
                           timeout=5)
    assert answer.status_code == 200 and answer.json()["data"].startswith("UPID:pve:")
    assert pve.state.vms[100].config["agent"] == "1"
    [logged] = pve.calls("POST")
    assert (logged.path, logged.params, logged.status) == ("/nodes/pve/qemu", {"vmid": "100", "agent": "1"}, 200)


def test_config_delete_leaves_unused_disks_and_snapshots_block_nothing_else(api: ProxmoxAPI) -> None:
    wait(api, create_vm(api))
    vm = api.nodes("pve").qemu(100)
    vm.config.put(scsi1="local-zfs:4")
    vm.config.put(delete="scsi1")
    config = vm.config.get()
    assert "scsi1" not in config and config["unused0"] == "local-zfs:vm-100-disk-1"
    wait(api, vm.config.post(delete="unused0"))
    assert "unused0" not in vm.config.get()
    assert [v["volid"] for v in api.nodes("pve").storage("local-zfs").content.get(vmid=100)] == [
        "local-zfs:vm-100-cloudinit", "local-zfs:vm-100-disk-0"]


def test_move_disk_parameters_and_storage_moves(api: ProxmoxAPI, pve: PveEmulator) -> None:
    wait(api, create_vm(api, 100))
    vm = api.nodes("pve").qemu(100)
    with pytest.raises(ResourceException) as e:
        vm.move_disk.post(disk="scsi0", storage="local-zfs", **{"target-vmid": 101})
    assert e.value.status_code == 400 and set(e.value.errors) == {"storage", "target-vmid"}
    with pytest.raises(ResourceException) as e:
        vm.move_disk.post(disk="scsi0", **{"target-vmid": 100})
    assert e.value.errors == {"target-vmid": "must be different than source VMID to reassign disk"}
    with pytest.raises(ResourceException) as e:
        vm.move_disk.post(disk="scsi0", **{"target-vmid": 150})
    assert e.value.content == "could not find target VM 150"
    with pytest.raises(ResourceException) as e:
        vm.move_disk.post(disk="ide2", storage="local")
    assert e.value.errors == {"storage": "storage 'local' does not support vm images"}
    pve.state.storages["local"].content.add("images")
    upid = vm.move_disk.post(disk="scsi0", storage="local", format="qcow2")
    assert wait(api, upid)["exitstatus"] == "OK"
    config = vm.config.get()
    assert config["scsi0"] == "local:100/vm-100-disk-0.qcow2,size=2G"
    assert config["unused0"] == "local-zfs:vm-100-disk-0"


def test_unused_disks_move_from_a_running_vm(api: ProxmoxAPI) -> None:
    wait(api, create_vm(api, 100))
    wait(api, api.nodes("pve").qemu.post(vmid=101, scsi1="local-zfs:8"))
    source = api.nodes("pve").qemu(101)
    wait(api, source.status.start.post())
    source.config.put(delete="scsi1")
    upid = source.move_disk.post(disk="unused0", **{"target-vmid": 100, "target-disk": "scsi1"})
    status = wait(api, upid)
    assert status["exitstatus"] == "OK" and status["id"] == "101-unused0>100-scsi1"
    assert api.nodes("pve").qemu(100).config.get()["scsi1"] == "local-zfs:vm-100-disk-1"


def test_config_changes_need_the_privilege_of_each_key(api: ProxmoxAPI, pve: PveEmulator) -> None:
    """update_vm_api: memory needs VM.Config.Memory, an ISO drive VM.Config.CDROM, a disk VM.Config.Disk,
    ipconfig0 VM.Config.Cloudinit or VM.Config.Network, and `args` is root's alone."""
    wait(api, upload(api, "debian-13.iso", b"\0" * 2048, content="iso"))
    wait(api, create_vm(api))
    tokenid, _ = pve.token
    pve.state.acl[tokenid] = {"/vms/100": {"VM.Config.CDROM", "VM.Config.Network"},
                              "/storage": {"Datastore.Audit"}}
    vm = api.nodes("pve").qemu(100)
    vm.config.put(ide0="local:iso/debian-13.iso,media=cdrom", ipconfig0="ip=dhcp")
    for change, missing in (({"memory": 4096}, "VM.Config.Memory"), ({"scsi1": "local-zfs:4"}, "VM.Config.Disk")):
        with pytest.raises(ResourceException) as e:
            vm.config.put(**change)
        assert e.value.content == f"Permission check failed (/vms/100, {missing})"
    with pytest.raises(ResourceException) as e:
        vm.config.put(args="-cpu host")
    assert (e.value.status_code, e.value.content) == (500, "only root can set 'args' config")


# --- pending changes on a running VM (update_vm_api, vmconfig_hotplug_pending) --------------------------------


def running_vm(api: ProxmoxAPI) -> ProxmoxAPI:
    """VM 100 (create_vm's defaults: net0 link down, agent, tags), started."""
    wait(api, create_vm(api))
    vm = api.nodes("pve").qemu(100)
    wait(api, vm.status.start.post())
    return vm


def pending_of(vm: ProxmoxAPI) -> dict[str, dict[str, object]]:
    return {entry["key"]: entry for entry in vm.pending.get()}


def test_a_running_vm_takes_a_link_change_at_once(api: ProxmoxAPI) -> None:
    """set_link's change: only link_down differs, which qemu-server applies in place (vmconfig_update_net)."""
    vm = running_vm(api)
    up = vm.config.get()["net0"].replace(",link_down=1", "")
    vm.config.put(net0=up)
    assert vm.config.get(current=1)["net0"] == up
    assert "pending" not in pending_of(vm)["net0"]


def test_a_share_added_to_a_running_vm_waits_for_the_next_start(api: ProxmoxAPI, pve: PveEmulator) -> None:
    """PVE 8.4 cannot hot-plug virtiofs: the share is pending - in GET .../config (pending values taken in) and
    GET .../pending, not in the current config - until the VM is started again."""
    pve.state.dir_mappings["photos"] = "/tank/photos"
    vm = running_vm(api)
    digest = vm.config.get()["digest"]
    vm.config.put(virtiofs0="photos")
    assert pending_of(vm)["virtiofs0"] == {"key": "virtiofs0", "pending": "photos"}
    assert "virtiofs0" not in vm.config.get(current=1)
    config = vm.config.get()
    assert config["virtiofs0"] == "photos" and config["digest"] != digest
    wait(api, vm.status.stop.post())
    assert "virtiofs0" not in vm.config.get(current=1)
    wait(api, vm.status.start.post())
    assert vm.config.get(current=1)["virtiofs0"] == "photos"
    assert pending_of(vm)["virtiofs0"] == {"key": "virtiofs0", "value": "photos"}


def test_a_running_vm_takes_tags_at_once(api: ProxmoxAPI) -> None:
    """tags is a fast-plug option: no hot-plug needed."""
    vm = running_vm(api)
    vm.config.put(tags="homelab;live")
    assert vm.config.get(current=1)["tags"] == "homelab;live"
    assert not [e for e in vm.pending.get() if "pending" in e or "delete" in e]


def test_a_stopped_vm_takes_every_change_at_once(api: ProxmoxAPI, pve: PveEmulator) -> None:
    pve.state.dir_mappings["photos"] = "/tank/photos"
    wait(api, create_vm(api))
    vm = api.nodes("pve").qemu(100)
    vm.config.put(virtiofs0="photos", cores=4, delete="agent")
    current = vm.config.get(current=1)
    assert (current["virtiofs0"], current["cores"], "agent" in current) == ("photos", 4, False)
    assert not [e for e in vm.pending.get() if "pending" in e or "delete" in e]


def test_a_pending_deletion_shows_delete_1_or_2_when_forced(api: ProxmoxAPI, pve: PveEmulator) -> None:
    """The agent device cannot be unplugged, nor a SATA disk: both deletions wait; a forced one (delete 2)
    frees the volume at the start instead of leaving it unusedN."""
    wait(api, create_vm(api, sata1="local-zfs:1"))
    vm = api.nodes("pve").qemu(100)
    wait(api, vm.status.start.post())
    vm.config.put(delete="agent")
    vm.config.put(delete="sata1", force=1)
    entries = pending_of(vm)
    assert entries["agent"] == {"key": "agent", "value": "1", "delete": 1}
    assert entries["sata1"]["delete"] == 2
    volid = str(entries["sata1"]["value"]).split(",")[0]
    assert "agent" not in vm.config.get() and vm.config.get(current=1)["agent"] == "1"
    wait(api, vm.status.stop.post())
    wait(api, vm.status.start.post())
    current = vm.config.get(current=1)
    assert "agent" not in current and "sata1" not in current and "unused0" not in current
    assert pve.state.volume(volid) is None


def test_disks_hot_plug_on_scsi_not_on_sata(api: ProxmoxAPI) -> None:
    """vmconfig_update_disk: a new SCSI disk is plugged into the running VM (hotplug 'disk' is a default);
    IDE and SATA cannot be hot-plugged; with hotplug=0 nothing is."""
    vm = running_vm(api)
    vm.config.put(scsi1="local-zfs:1", sata1="local-zfs:1")
    current = vm.config.get(current=1)
    assert current["scsi1"].startswith("local-zfs:vm-100-disk-") and "sata1" not in current
    assert pending_of(vm)["sata1"]["pending"].startswith("local-zfs:vm-100-disk-")
    wait(api, vm.status.stop.post())
    vm.config.put(hotplug="0")
    wait(api, vm.status.start.post())
    vm.config.put(scsi2="local-zfs:1")
    assert "scsi2" not in vm.config.get(current=1) and "pending" in pending_of(vm)["scsi2"]


def test_a_change_that_fails_to_hot_plug_fails_the_call_and_stays_pending(api: ProxmoxAPI) -> None:
    """A CD drive (the cloud-init one) cannot become a disk on a running VM: raise_param_exc after the config
    is written, so the change is pending; `revert` takes it back (the new disk becomes unusedN)."""
    vm = running_vm(api)
    with pytest.raises(ResourceException) as e:
        vm.config.put(ide2="local-zfs:1")
    assert e.value.status_code == 400 and e.value.errors == {"ide2": "hotplug problem - unable to change media type"}
    assert pending_of(vm)["ide2"]["pending"].startswith("local-zfs:vm-100-disk-")
    upid = vm.config.post(ide2="local-zfs:1")
    assert "hotplug problem - unable to change media type" in wait(api, upid)["exitstatus"]
    vm.config.put(revert="ide2")
    assert "pending" not in pending_of(vm)["ide2"]
    assert sorted(k for k in vm.config.get(current=1) if k.startswith("unused")) == ["unused0", "unused1"]


def test_a_disk_moved_to_a_running_vm_goes_through_its_pending_changes(api: ProxmoxAPI) -> None:
    """move_disk to another VM attaches the disk with update_vm_api on the target: a running target takes a SCSI
    disk at once, a SATA one only at its next start."""
    vm = running_vm(api)
    wait(api, api.nodes("pve").qemu.post(vmid=101, scsi1="local-zfs:1", sata1="local-zfs:1"))
    source = api.nodes("pve").qemu(101)
    for key in ("scsi1", "sata1"):
        assert wait(api, source.move_disk.post(disk=key, **{"target-vmid": 100, "target-disk": key}))[
            "exitstatus"] == "OK"
    current = vm.config.get(current=1)
    assert current["scsi1"].startswith("local-zfs:vm-100-disk-") and "sata1" not in current
    assert pending_of(vm)["sata1"]["pending"].startswith("local-zfs:vm-100-disk-")
    assert "scsi1" not in source.config.get() and "sata1" not in source.config.get()
