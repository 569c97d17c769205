"""builder/proxmox.py and `homelab preflight` against the emulator (threads only: no process started).

Every bad input must end in one clear line and a non-zero exit, and preflight must never change anything:
the emulator's request log holds no POST, PUT or DELETE after it.
"""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from builder import preflight, proxmox
from builder.cli import main
from builder.errors import ProxmoxError, ProxmoxTaskError
from builder.proxmox import Pve, Target, Token

from .emulator import PveEmulator
from .state import Vm, Volume

GiB = 1024**3
ROOT = Path(__file__).resolve().parents[2]
DISK = "local-zfs:vm-101-disk-1"
# The data volumes of images/intranet.yaml and images/extranet.yaml and where the site file puts them: one disk,
# the shares each on a directory mapping of their own (one share, one VM).
INTRANET_SHARES = ("appdata", "photos", "media", "backups", "logs")
EXTRANET_SHARES = {"appdata": "ext-appdata", "logs": "ext-logs"}


def volumes_yaml(intranet: dict[str, str] | None = None) -> tuple[str, str]:
    """The flow mappings of hosts.intranet.volumes and hosts.extranet.volumes; `intranet` replaces entries
    (an empty value drops one)."""
    places = {"postgres": f'{{volid: "{DISK}"}}', **{name: f"{{mapping: {name}}}" for name in INTRANET_SHARES}}
    places.update(intranet or {})
    extranet = ", ".join(f"{name}: {{mapping: {mapping}}}" for name, mapping in EXTRANET_SHARES.items())
    return "{" + ", ".join(f"{k}: {v}" for k, v in places.items() if v) + "}", "{" + extranet + "}"


def site_text(pve: PveEmulator, intranet: dict[str, str] | None = None) -> str:
    ours, theirs = volumes_yaml(intranet)
    return f"""\
domain: test.home.arpa
ssh_authorized_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEZ34vFY5e3UW2paPff94a7Uzy0jlyjar5xfwMs6s9ac t@h"]
gateway: 10.99.0.1
dns: [10.99.0.1]
hosts:
  intranet: {{hostname: intranet, address: 10.99.0.101/24, vmid: 101, volumes: {ours}}}
  extranet: {{hostname: extranet, address: 10.99.0.111/24, vmid: 111, volumes: {theirs}}}
proxmox:
  url: https://{pve.host}:{pve.port}
  node: pve
  tls: {{fingerprint: "{pve.fingerprint}"}}
"""


@pytest.fixture
def site(tmp_path: Path, pve: PveEmulator, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The site file, and on the node every data volume it names: the disk and the directory mappings."""
    monkeypatch.setenv("HOMELAB_PROJECT", str(ROOT))  # the definitions the volumes come from
    pve.state.add_volume(Volume(DISK, "images", "raw", 20 * GiB, vmid=101))
    pve.state.dir_mappings.update({name: f"/tank/{name}" for name in INTRANET_SHARES})
    pve.state.dir_mappings.update({mapping: f"/tank/{mapping}" for mapping in EXTRANET_SHARES.values()})
    path = tmp_path / "site.yaml"
    path.write_text(site_text(pve))
    return path


@pytest.fixture
def token(pve: PveEmulator, monkeypatch: pytest.MonkeyPatch) -> str:
    tokenid, secret = pve.token
    monkeypatch.setenv("PVE_TOKEN", f"{tokenid}={secret}")
    return tokenid


@pytest.fixture
def client(pve: PveEmulator, site: Path, token: str) -> Pve:
    from builder.site import load_site

    # Tasks poll without waiting: the emulator's tasks end after a set number of status reads.
    return Pve(Target.from_site(load_site(site).proxmox(), proxmox.token_from_env()), sleep=lambda seconds: None)


def homelab(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def writes(pve: PveEmulator) -> list[str]:
    return [f"{r.method} {r.path}" for r in pve.requests if r.method in ("POST", "PUT", "DELETE")]


def qcow2(path: Path, virtual: int = 2 * GiB, payload: int = 300_000) -> Path:
    """A file with a qcow2 header (PVE lists its virtual size) and some bytes after it."""
    path.write_bytes(b"QFI\xfb" + b"\0" * 20 + virtual.to_bytes(8, "big") + b"\xab" * payload)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- preflight -----------------------------------------------------------------------------------------


def test_preflight_all_pass(pve: PveEmulator, site: Path, token: str) -> None:
    result = homelab("preflight", "--site", str(site))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert not [line for line in lines if line.startswith("FAIL")]
    assert "ok   version: Proxmox VE 8.4.1" in lines
    assert f"ok   tls: https://127.0.0.1:{pve.port}: certificate pinned fingerprint {pve.fingerprint}" in lines
    assert "ok   storage import: local holds import" in lines
    assert "ok   bridge: vmbr0" in lines
    assert "ok   vm intranet: VMID 101 (intranet): free" in lines
    assert f"ok   data volume intranet/postgres: {DISK} on storage local-zfs" in lines
    assert "ok   data volume intranet/photos: directory mapping photos" in lines
    assert "ok   data volume extranet/logs: directory mapping ext-logs" in lines
    assert any(line.startswith("ok   privileges /vms: ") for line in lines)
    assert writes(pve) == []


def test_preflight_of_one_role_accepts_our_own_vm(pve: PveEmulator, site: Path, token: str) -> None:
    pve.state.vms[101] = Vm(101, "pve", {"name": "intranet", "tags": "homelab;homelab-intranet"})
    result = homelab("preflight", "intranet", "--site", str(site))
    assert result.exit_code == 0, result.output
    assert "ok   vm intranet: VMID 101 (intranet): ours, will be replaced" in result.output
    assert "vm extranet" not in result.output


def _one_failure(result: Result) -> str:
    assert result.exit_code == 1, result.output
    failures = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 1, result.output
    return failures[0]


def test_pve_83_fails_the_version_check(pve: PveEmulator, site: Path, token: str) -> None:
    pve.state.version = "8.3.5"
    assert _one_failure(homelab("preflight", "--site", str(site))) == (
        "FAIL version: Proxmox VE 8.3.5 is older than 8.4: qcow2 uploads (content import) need 8.4 -> upgrade the "
        "node (apt update && apt full-upgrade)")
    assert writes(pve) == []


def test_storage_without_import_content(pve: PveEmulator, site: Path, token: str) -> None:
    pve.state.storages["local"].content.discard("import")
    assert _one_failure(homelab("preflight", "--site", str(site))) == (
        "FAIL storage import: local does not hold content import (it holds backup,iso,vztmpl) -> pvesm set local "
        "--content backup,iso,vztmpl,import")
    assert writes(pve) == []


def test_vmid_taken_by_an_untagged_vm(pve: PveEmulator, site: Path, token: str) -> None:
    pve.state.vms[111] = Vm(111, "pve", {"name": "router"})
    assert _one_failure(homelab("preflight", "--site", str(site))) == (
        "FAIL vm extranet: VMID 111 is taken by 'router' (not tagged homelab) -> choose a free hosts.extranet.vmid")
    assert writes(pve) == []


def test_missing_bridge(pve: PveEmulator, site: Path, token: str) -> None:
    pve.state.bridges = {"vmbr1"}
    assert _one_failure(homelab("preflight", "--site", str(site))) == (
        "FAIL bridge: no bridge 'vmbr0' on pve (bridges: vmbr1) -> set proxmox.bridge")


def test_a_token_without_the_role_fails_on_each_short_path(pve: PveEmulator, site: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    everything = {"Datastore.Audit", "Datastore.AllocateSpace", "Datastore.AllocateTemplate", "SDN.Use",
                  "VM.Allocate", "VM.Audit", "VM.PowerMgmt", "VM.Config.Disk", "VM.Config.CDROM", "VM.Config.CPU",
                  "VM.Config.Memory", "VM.Config.Network", "VM.Config.HWType", "VM.Config.Options", "VM.Monitor",
                  "VM.Snapshot", "Mapping.Use"}
    pve.state.add_token("ro@pve!audit", "s3", {"/": everything - {"Datastore.AllocateTemplate", "VM.PowerMgmt"}})
    monkeypatch.setenv("PVE_TOKEN", "ro@pve!audit=s3")
    result = homelab("preflight", "--site", str(site))
    assert result.exit_code == 1
    failures = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    assert failures == [
        "FAIL privileges /storage/local: the token lacks Datastore.AllocateTemplate -> grant the role `homelab "
        "token-role` prints (user and token: privilege separation)",
        "FAIL privileges /vms: the token lacks VM.PowerMgmt -> grant the role `homelab token-role` prints (user and "
        "token: privilege separation)",
    ]


def test_the_derived_role_is_enough_for_preflight(pve: PveEmulator, site: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A token holding exactly the ACLs token-role prints passes every check (the emulator enforces them)."""
    from builder.site import load_site

    plan = proxmox.token_role(load_site(site).proxmox(), "least@pve!deploy")
    pve.state.add_token("least@pve!deploy", "s4", {path: set(privs) for path, privs in plan.roles.values()})
    monkeypatch.setenv("PVE_TOKEN", "least@pve!deploy=s4")
    result = homelab("preflight", "--site", str(site))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("variable", "message"), [
    (None, "error: PVE_TOKEN is not set: export PVE_TOKEN=user@realm!tokenid=secret (see `homelab token-role` "
           "for creating one)"),
    ("homelab@pve:deploy", "error: PVE_TOKEN is not user@realm!tokenid=secret (e.g. homelab@pve!deploy=<uuid>)"),
    # PVE's own reason for a wrong secret (pve-http-server), as the emulator answers it.
    ("homelab@pve!deploy=wrong", "error: GET /version: HTTP 401 Unauthorized: invalid token value! (the token "
                                 "was refused: check PVE_TOKEN)"),
])
def test_a_missing_or_invalid_token_is_one_line(pve: PveEmulator, site: Path, monkeypatch: pytest.MonkeyPatch,
                                                variable: str | None, message: str) -> None:
    if variable is None:
        monkeypatch.delenv("PVE_TOKEN", raising=False)
    else:
        monkeypatch.setenv("PVE_TOKEN", variable)
    result = homelab("preflight", "--site", str(site))
    assert result.exit_code == 1
    assert result.output == message + "\n"
    assert writes(pve) == []


def test_an_injected_500_is_one_line(pve: PveEmulator, site: Path, token: str) -> None:
    pve.fail("GET", r"^/version$", message="pveproxy fell over")
    result = homelab("preflight", "--site", str(site))
    assert result.exit_code == 1
    assert result.output == "error: GET /version: HTTP 500 Internal Server Error: pveproxy fell over\n"


def test_another_certificate_is_one_line(pve: PveEmulator, site: Path, token: str) -> None:
    pinned = "AB:" * 31 + "AB"
    site.write_text(site.read_text().replace(pve.fingerprint, pinned))
    result = homelab("preflight", "--site", str(site))
    assert result.exit_code == 1
    assert result.output == (f"error: GET /version: the certificate of https://127.0.0.1:{pve.port} is not the "
                             f"pinned proxmox.tls.fingerprint {pinned} (it presents {pve.fingerprint})\n")
    assert pve.requests == []


def test_a_hung_api_is_a_timeout_line(pve: PveEmulator, site: Path, token: str) -> None:
    from builder.site import load_site

    pve.hang("GET", r"^/version$", seconds=10)
    slow = Pve(Target.from_site(load_site(site).proxmox(), proxmox.token_from_env()), timeout=(2, 0.5))
    with pytest.raises(ProxmoxError, match=rf"^GET /version: https://127.0.0.1:{pve.port} did not answer in time"):
        slow.get("/version")


def test_preflight_returns_results_without_printing(client: Pve, pve: PveEmulator, site: Path) -> None:
    from builder.site import load_site

    checks = preflight.preflight(client, load_site(site), ["intranet"], ROOT)
    assert [c.status for c in checks if c.failed] == []
    assert {c.name for c in checks} >= {"version", "tls", "node", "storage import", "storage images", "storage iso",
                                        "bridge", "vm intranet", "data volume intranet/postgres",
                                        "data volume intranet/logs"}


def test_without_the_project_the_volumes_are_left_to_the_deploy(client: Pve, pve: PveEmulator, site: Path) -> None:
    """ProxmoxProvider.preflight passes no project: plan_deploy checks the volumes itself, as its own error."""
    from builder.site import load_site

    del pve.state.storages["local-zfs"].volumes[DISK]
    checks = preflight.preflight(client, load_site(site), ["intranet"])
    assert not [c for c in checks if c.name.startswith("data volume")]
    assert not pve.calls("GET", r"/cluster/mapping/dir$")


# --- preflight: data volumes ----------------------------------------------------------------------------------


def _volume_lines(result: Result) -> list[str]:
    return [line for line in result.output.splitlines() if " data volume" in line]


def test_each_data_volume_is_one_line_where_the_site_says(pve: PveEmulator, site: Path, token: str) -> None:
    result = homelab("preflight", "intranet", "--site", str(site))
    assert result.exit_code == 0, result.output
    assert _volume_lines(result) == [
        "ok   data volume intranet/appdata: directory mapping appdata",
        f"ok   data volume intranet/postgres: {DISK} on storage local-zfs",
        "ok   data volume intranet/photos: directory mapping photos",
        "ok   data volume intranet/media: directory mapping media",
        "ok   data volume intranet/backups: directory mapping backups",
        "ok   data volume intranet/logs: directory mapping logs",
    ]
    assert writes(pve) == []


def test_a_missing_disk_fails_naming_the_site_key(pve: PveEmulator, site: Path, token: str) -> None:
    del pve.state.storages["local-zfs"].volumes[DISK]
    assert _one_failure(homelab("preflight", "--site", str(site))) == (
        f"FAIL data volume intranet/postgres: {DISK} does not exist (hosts.intranet.volumes.postgres.volid) -> "
        "create it (zfs create -V) or fix the site file")
    assert writes(pve) == []


def test_a_disk_the_token_may_not_read_is_not_found(pve: PveEmulator, site: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """PVE lists a VM's disk only with VM.Config.Disk on that VM: without it the disk looks missing, and the
    privileges line says what the token lacks."""
    everything = {"/": {"Datastore.Audit", "Datastore.AllocateSpace", "Datastore.AllocateTemplate", "SDN.Use",
                        "VM.Allocate", "VM.Audit", "VM.PowerMgmt", "VM.Config.CDROM", "VM.Config.CPU",
                        "VM.Config.Memory", "VM.Config.Network", "VM.Config.HWType", "VM.Config.Options",
                        "VM.Monitor", "VM.Snapshot", "Mapping.Use"}}
    pve.state.add_token("nodisk@pve!deploy", "s5", everything)
    monkeypatch.setenv("PVE_TOKEN", "nodisk@pve!deploy=s5")
    result = homelab("preflight", "intranet", "--site", str(site))
    assert result.exit_code == 1
    failures = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    assert failures[0].startswith("FAIL privileges /vms: the token lacks VM.Config.Disk")
    assert failures[1].startswith(f"FAIL data volume intranet/postgres: {DISK} does not exist")
    assert len(failures) == 2


def test_a_disk_on_a_storage_that_does_not_exist_is_its_own_line(pve: PveEmulator, site: Path,
                                                                 token: str) -> None:
    site.write_text(site_text(pve, {"postgres": '{volid: "tank:vm-101-disk-1"}'}))
    assert _one_failure(homelab("preflight", "intranet", "--site", str(site))) == (
        "FAIL data volume intranet/postgres: tank:vm-101-disk-1: GET /nodes/pve/storage/tank/content: HTTP 500 "
        "Internal Server Error: storage 'tank' does not exist -> fix hosts.intranet.volumes.postgres.volid or grant "
        "the token Datastore.Audit on its storage")


def test_a_disk_named_after_a_vm_not_ours_is_pointed_out(pve: PveEmulator, site: Path, token: str) -> None:
    pve.state.add_volume(Volume("local-zfs:vm-105-disk-1", "images", "raw", 20 * GiB, vmid=105))
    pve.state.vms[105] = Vm(105, "pve", {"name": "router", "scsi1": "local-zfs:vm-105-disk-1"})
    site.write_text(site_text(pve, {"postgres": '{volid: "local-zfs:vm-105-disk-1"}'}))
    result = homelab("preflight", "intranet", "--site", str(site))
    assert result.exit_code == 0, result.output
    assert ("ok   data volume intranet/postgres: local-zfs:vm-105-disk-1 on storage local-zfs (named after VM 105, "
            "which is not tagged homelab: make sure it is not that VM's disk)") in result.output.splitlines()


def test_a_missing_directory_mapping_fails(pve: PveEmulator, site: Path, token: str) -> None:
    del pve.state.dir_mappings["photos"]
    assert _one_failure(homelab("preflight", "--site", str(site))) == (
        "FAIL data volume intranet/photos: directory mapping photos does not exist (or the token may not use it) -> "
        "add it under Datacenter > Directory Mappings, or fix hosts.intranet.volumes.photos.mapping")
    assert writes(pve) == []


def test_a_mapping_the_token_may_not_use_is_not_listed(pve: PveEmulator, site: Path, token: str) -> None:
    """/cluster/mapping/dir lists only the mappings the token has a Mapping.* privilege on."""
    pve.state.acl[token]["/mapping/dir/media"] = set()  # NoAccess there: a more specific ACL replaces what / grants
    result = homelab("preflight", "intranet", "--site", str(site))
    failures = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    assert result.exit_code == 1
    assert failures == [
        "FAIL data volume intranet/media: directory mapping media does not exist (or the token may not use it) -> "
        "add it under Datacenter > Directory Mappings, or fix hosts.intranet.volumes.media.mapping"]


def test_a_volume_the_site_does_not_place_fails(pve: PveEmulator, site: Path, token: str) -> None:
    site.write_text(site_text(pve, {"photos": ""}))
    assert _one_failure(homelab("preflight", "--site", str(site))) == (
        "FAIL data volume intranet/photos: hosts.intranet.volumes.photos is missing (the share volume photos of "
        "images/intranet.yaml needs mapping) -> set hosts.intranet.volumes.photos.mapping in the site file to the "
        "ID of its directory mapping (Datacenter > Directory Mappings)")
    assert writes(pve) == []


def test_a_disk_placed_as_a_share_fails(pve: PveEmulator, site: Path, token: str) -> None:
    site.write_text(site_text(pve, {"postgres": "{mapping: postgres}"}))
    assert _one_failure(homelab("preflight", "--site", str(site))) == (
        "FAIL data volume intranet/postgres: hosts.intranet.volumes.postgres: postgres is a disk: give volid -> set "
        "hosts.intranet.volumes.postgres.volid in the site file to the disk's volume ID (e.g. "
        "local-zfs:vm-101-disk-1)")


def test_a_site_volume_the_definition_does_not_have_fails(pve: PveEmulator, site: Path, token: str) -> None:
    site.write_text(site_text(pve, {"photoz": "{mapping: photos}"}))
    assert _one_failure(homelab("preflight", "--site", str(site))) == (
        "FAIL data volume intranet/photoz: hosts.intranet.volumes.photoz is not a volume of images/intranet.yaml -> "
        "remove it from the site file or add the volume to images/intranet.yaml")


def _live(vmid: int, config: dict[str, str]) -> Vm:
    """A VM serving intranet (as a swap leaves it): its data volumes under their keys."""
    return Vm(vmid, "pve", {"name": "intranet", "tags": "homelab;live;role-intranet;v-1;d-1", **config})


def test_after_a_swap_the_volumes_are_checked_on_the_live_vm(pve: PveEmulator, site: Path, token: str) -> None:
    """move_disk renames the disk after its new VM: the site's volid is where the first deploy found it, and the
    next swap takes the disk from the live VM (plan_deploy's _volumes_on)."""
    moved = "local-zfs:vm-102-disk-1"
    del pve.state.storages["local-zfs"].volumes[DISK]
    pve.state.add_volume(Volume(moved, "images", "raw", 20 * GiB, vmid=102))
    shares = {f"virtiofs{i}": name for i, name in enumerate(INTRANET_SHARES)}
    pve.state.vms[102] = _live(102, {"scsi1": f"{moved},size=20G", **shares})
    result = homelab("preflight", "intranet", "--site", str(site))
    assert result.exit_code == 0, result.output
    lines = _volume_lines(result)
    assert f"ok   data volume intranet/postgres: {moved} on storage local-zfs, held by live VM 102 as scsi1" in lines
    assert "ok   data volume intranet/photos: directory mapping photos, held by live VM 102 as virtiofs1" in lines


def test_a_live_vm_without_a_volume_fails(pve: PveEmulator, site: Path, token: str) -> None:
    shares = {f"virtiofs{i}": name for i, name in enumerate(INTRANET_SHARES)}
    pve.state.vms[102] = _live(102, shares)
    assert _one_failure(homelab("preflight", "intranet", "--site", str(site))) == (
        "FAIL data volume intranet/postgres: VM 102 (live) has no scsi1 -> attach it (the disk) or fix the site file")


def test_two_live_vms_are_one_failure_for_the_role(pve: PveEmulator, site: Path, token: str) -> None:
    pve.state.vms[102] = _live(102, {})
    pve.state.vms[103] = _live(103, {})
    assert _one_failure(homelab("preflight", "intranet", "--site", str(site))) == (
        "FAIL data volumes intranet: VMs 102, 103 are all tagged live for intranet: untag all but the one serving")


# --- uploads and tasks ---------------------------------------------------------------------------------


def test_upload_streams_with_its_checksum_then_is_skipped(client: Pve, pve: PveEmulator, tmp_path: Path) -> None:
    image = qcow2(tmp_path / "intranet-0123abcd.qcow2")
    seen: list[proxmox.Progress] = []
    result = proxmox.upload(client, "local", "import", image, sha256(image), on_progress=seen.append)
    assert (result.volid, result.skipped) == ("local:import/intranet-0123abcd.qcow2", False)
    [post] = pve.calls("POST", r"/upload$")
    assert post.status == 200
    assert post.params == {"content": "import", "checksum": sha256(image), "checksum-algorithm": "sha256",
                           "filename": "intranet-0123abcd.qcow2"}
    assert seen[-1].sent == seen[-1].total == image.stat().st_size and seen[-1].bytes_per_second > 0
    volume = pve.state.volume("local:import/intranet-0123abcd.qcow2")
    assert volume is not None and volume.path is not None and volume.path.read_bytes() == image.read_bytes()

    again = proxmox.upload(client, "local", "import", image, sha256(image))
    assert again.skipped and len(pve.calls("POST", r"/upload$")) == 1


def test_an_upload_of_another_size_under_the_same_name_is_refused(client: Pve, pve: PveEmulator,
                                                                  tmp_path: Path) -> None:
    image = qcow2(tmp_path / "intranet-1.qcow2")
    proxmox.upload(client, "local", "import", image, sha256(image))
    qcow2(image, virtual=3 * GiB)
    with pytest.raises(ProxmoxError, match=r"^local:import/intranet-1.qcow2 is already on storage local with "
                                           r"another size \(2147483648 bytes listed, this file 3221225472\)"):
        proxmox.upload(client, "local", "import", image, sha256(image))


def test_a_wrong_checksum_fails_the_task_with_its_log_tail(client: Pve, pve: PveEmulator, tmp_path: Path) -> None:
    image = qcow2(tmp_path / "intranet-2.qcow2")
    with pytest.raises(ProxmoxTaskError) as caught:
        proxmox.upload(client, "local", "import", image, "0" * 64)
    message = str(caught.value)
    assert message.startswith("task UPID:pve:") and "failed: checksum mismatch: got '" in message
    assert message.endswith("| TASK ERROR: checksum mismatch: got '" + sha256(image) + "' != expect '" + "0" * 64
                            + "'")
    assert "\n" not in message
    assert pve.state.volume("local:import/intranet-2.qcow2") is None


def test_a_task_ending_in_error_raises_with_the_log_tail(client: Pve, pve: PveEmulator, tmp_path: Path) -> None:
    pve.fail_task("POST", r"/upload$", exitstatus="storage full")
    image = qcow2(tmp_path / "intranet-3.qcow2")
    with pytest.raises(ProxmoxTaskError, match=r"failed: storage full: .*\| TASK ERROR: storage full$"):
        proxmox.upload(client, "local", "import", image, sha256(image))


def test_an_injected_500_on_upload_is_one_line(client: Pve, pve: PveEmulator, tmp_path: Path) -> None:
    pve.fail("POST", r"/upload$", message="disk quota exceeded")
    image = qcow2(tmp_path / "intranet-4.qcow2")
    with pytest.raises(ProxmoxError) as caught:
        proxmox.upload(client, "local", "import", image, sha256(image))
    assert str(caught.value) == ("POST /nodes/pve/storage/local/upload: HTTP 500 Internal Server Error: disk quota "
                                 "exceeded")


def test_an_upload_to_a_storage_without_import_names_the_call(client: Pve, pve: PveEmulator,
                                                             tmp_path: Path) -> None:
    image = qcow2(tmp_path / "intranet-5.qcow2")
    with pytest.raises(ProxmoxError) as caught:
        proxmox.upload(client, "local-zfs", "import", image, sha256(image))
    assert str(caught.value).startswith("POST /nodes/pve/storage/local-zfs/upload: HTTP 500 ")


def test_an_upload_holds_one_chunk_in_memory(client: Pve, pve: PveEmulator, tmp_path: Path) -> None:
    """48 MiB through the client and the emulator (same process): peak allocation stays far below the file."""
    image = qcow2(tmp_path / "big-1.qcow2", payload=48 * 1024 * 1024)
    digest = sha256(image)
    tracemalloc.start()
    try:
        proxmox.upload(client, "local", "import", image, digest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, peak


def test_wait_task_on_a_real_task(client: Pve, pve: PveEmulator, tmp_path: Path) -> None:
    pve.state.task_polls = 3
    image = qcow2(tmp_path / "intranet-6.qcow2")
    proxmox.upload(client, "local", "import", image, sha256(image))
    assert len(pve.calls("GET", r"/tasks/.*/status$")) == 4


def test_tokens_from_the_environment_reach_the_api(client: Pve, token: str) -> None:
    assert client.get("/version")["release"] == "8.4"
    assert isinstance(client.target.token, Token) and client.target.token.tokenid == token


def test_the_derived_role_covers_every_deploy_call(pve: PveEmulator, site: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With exactly the ACLs token-role prints, the swap's calls pass the emulator's permission checks: upload the
    image and a seed ISO, create a VM from them on the bridge, start, shut down, stop, destroy."""
    from builder.site import load_site

    section = load_site(site).proxmox()
    plan = proxmox.token_role(section, "least@pve!deploy")
    pve.state.add_token("least@pve!deploy", "s5", {path: set(privs) for path, privs in plan.roles.values()})
    monkeypatch.setenv("PVE_TOKEN", "least@pve!deploy=s5")
    client = Pve(Target.from_site(section, proxmox.token_from_env()), sleep=lambda seconds: None)
    image, seed = qcow2(tmp_path / "intranet-7.qcow2"), tmp_path / "intranet-7-seed.iso"
    seed.write_bytes(b"\0" * 4096)
    proxmox.upload(client, "local", "import", image, sha256(image))
    proxmox.upload(client, "local", "iso", seed, sha256(seed))
    config = {"vmid": 101, "name": "intranet", "tags": "homelab;homelab-intranet", "cores": 2, "memory": 2048,
              "scsihw": "virtio-scsi-single", "scsi0": "local-zfs:0,import-from=local:import/intranet-7.qcow2",
              "ide2": "local:iso/intranet-7-seed.iso,media=cdrom", "net0": "virtio,bridge=vmbr0", "agent": 1}
    proxmox.wait_task(client, client.call("POST", "/nodes/pve/qemu", **config), 60)
    assert client.get("/nodes/pve/qemu/101/config")["tags"] == "homelab;homelab-intranet"
    for action in ("start", "shutdown", "start", "stop"):
        proxmox.wait_task(client, client.call("POST", f"/nodes/pve/qemu/101/status/{action}"), 60)
    assert client.get("/nodes/pve/qemu/101/status/current")["status"] == "stopped"
    proxmox.wait_task(client, client.call("DELETE", "/nodes/pve/qemu/101"), 60)
    assert 101 not in pve.state.vms
    used = {(r.method, r.path) for r in pve.requests}
    assert all(r.status == 200 for r in pve.requests), [(r.method, r.path, r.status) for r in pve.requests]
    assert ("POST", "/nodes/pve/qemu") in used


def test_a_call_outside_the_role_is_forbidden_in_one_line(pve: PveEmulator, site: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from builder.site import load_site

    section = load_site(site).proxmox()
    plan = proxmox.token_role(section, "least@pve!deploy")
    pve.state.add_token("least@pve!deploy", "s6", {path: set(privs) for path, privs in plan.roles.values()})
    monkeypatch.setenv("PVE_TOKEN", "least@pve!deploy=s6")
    client = Pve(Target.from_site(section, proxmox.token_from_env()))
    with pytest.raises(ProxmoxError) as caught:
        client.call("POST", "/nodes/pve/qemu/101/migrate", target="pve2")
    assert str(caught.value) == ("POST /nodes/pve/qemu/101/migrate: HTTP 403 Forbidden: Permission check failed "
                                 "(/vms/101, VM.Migrate) (the token lacks a privilege: see `homelab token-role`)")
