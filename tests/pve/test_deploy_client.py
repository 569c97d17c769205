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
from .state import Vm

GiB = 1024**3




@pytest.fixture
def site(tmp_path: Path, pve: PveEmulator) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(f"""\
domain: test.home.arpa
ssh_authorized_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEZ34vFY5e3UW2paPff94a7Uzy0jlyjar5xfwMs6s9ac t@h"]
gateway: 10.99.0.1
dns: [10.99.0.1]
hosts:
  intranet: {{hostname: intranet, address: 10.99.0.101/24, vmid: 101}}
  extranet: {{hostname: extranet, address: 10.99.0.111/24, vmid: 111}}
proxmox:
  url: https://{pve.host}:{pve.port}
  node: pve
  tls: {{fingerprint: "{pve.fingerprint}"}}
""")
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
    assert "skip data volumes: not checked yet (they come with the deploy's swap)" in lines
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

    checks = preflight.preflight(client, load_site(site), ["intranet"])
    assert [c.status for c in checks if c.failed] == []
    assert {c.name for c in checks} >= {"version", "tls", "node", "storage import", "storage images", "storage iso",
                                        "bridge", "vm intranet", "data volumes"}


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
