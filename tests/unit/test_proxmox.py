"""Pure parts of builder/proxmox.py and builder/preflight.py: token, fingerprint, multipart body, tasks, privileges.

No network: calls go to a scripted stand-in of Pve. The privilege derivation is checked against PVE 8.4's real
API schema ($HOMELAB_PVE_SCHEMA, else ../shared/pve-api/pve-8.4-apidata.json beside the checkout).
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import itertools
import os
import re
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from builder import preflight, proxmox
from builder.errors import HomelabError, ProxmoxError, ProxmoxTaskError
from builder.proxmox import ApiCall, MultipartBody, Target, TlsPolicy, Token
from builder.site import load_site
from tests.conftest import FIXTURES, PROJECT

REAL_SCHEMA = Path(os.environ.get("HOMELAB_PVE_SCHEMA") or PROJECT.parent / "shared" / "pve-api" /
                   "pve-8.4-apidata.json")
needs_schema = pytest.mark.skipif(not REAL_SCHEMA.is_file(), reason=f"no PVE API schema at {REAL_SCHEMA}")
SITE = FIXTURES / "site" / "site-proxmox-defaults.yaml"


def target(**changes: Any) -> Target:
    values: dict[str, Any] = {
        "url": "https://pve.test:8006", "node": "pve", "storages": {"import": "local", "images": "local-zfs",
                                                                    "iso": "local"},
        "bridge": "vmbr0", "tls": TlsPolicy(), "token": Token("homelab@pve", "deploy", "s3cret")}
    values.update(changes)
    return Target(**values)


# --- token ---------------------------------------------------------------------------------------------

def test_token_parts() -> None:
    token = proxmox.parse_token("homelab@pve!deploy=0b6e2f4c-0a2e-4a4e-9f55-1c3f0f0e8a11")
    assert (token.user, token.name, token.tokenid) == ("homelab@pve", "deploy", "homelab@pve!deploy")
    assert token.secret == "0b6e2f4c-0a2e-4a4e-9f55-1c3f0f0e8a11"
    assert "0b6e2f4c" not in repr(token)


@pytest.mark.parametrize("text", ["homelab@pve=secret", "homelab!deploy=secret", "homelab@pve!deploy",
                                  "homelab@pve!deploy=", "homelab@pve!de ploy=secret", "@pve!deploy=x"])
def test_a_malformed_token_is_one_line_without_the_secret(text: str) -> None:
    with pytest.raises(ProxmoxError) as caught:
        proxmox.parse_token(text)
    message = str(caught.value)
    assert message.startswith("PVE_TOKEN is not user@realm!tokenid=secret")
    assert "\n" not in message and "secret" not in message.replace("tokenid=secret", "")


@pytest.mark.parametrize("env", [{}, {"PVE_TOKEN": ""}])
def test_a_missing_token_says_how_to_set_it(env: dict[str, str]) -> None:
    with pytest.raises(ProxmoxError, match=r"^PVE_TOKEN is not set: export PVE_TOKEN=user@realm!tokenid=secret"):
        proxmox.token_from_env(env)


def test_proxmox_errors_are_homelab_errors() -> None:
    assert issubclass(ProxmoxTaskError, ProxmoxError) and issubclass(ProxmoxError, HomelabError)


# --- TLS -----------------------------------------------------------------------------------------------

def test_fingerprint_is_sha256_as_pvenode_prints_it() -> None:
    der = b"not really a certificate"
    text = proxmox.format_fingerprint(der)
    assert text == ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    assert len(text) == 95 and text.count(":") == 31


def test_a_pinned_fingerprint_passes_the_site_check_and_reaches_the_adapter() -> None:
    text = proxmox.format_fingerprint(b"cert")
    adapter = proxmox.FingerprintAdapter(text)
    assert adapter.fingerprint == hashlib.sha256(b"cert").hexdigest()
    site = load_site(FIXTURES / "site" / "site-proxmox-full.yaml")
    assert site.proxmox()["tls"]["fingerprint"] == "AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:" \
                                                  "AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99"


def test_tls_policies() -> None:
    import requests

    for policy, verify in ((TlsPolicy(), True), (TlsPolicy(insecure=True), False),
                           (TlsPolicy(fingerprint="AA:" * 31 + "AA"), False)):
        session = requests.Session()
        policy.apply(session, "https://pve.test:8006")
        assert session.verify is verify
        pinned = isinstance(session.get_adapter("https://pve.test:8006/api2/json"), proxmox.FingerprintAdapter)
        assert pinned is bool(policy.fingerprint)


def test_insecure_flag_cannot_override_a_pin() -> None:
    section = load_site(FIXTURES / "site" / "site-proxmox-full.yaml").proxmox()
    with pytest.raises(ProxmoxError, match="--insecure cannot be combined"):
        Target.from_site(section, Token("a@pve", "b", "c"), insecure=True)
    plain = load_site(SITE).proxmox()
    assert Target.from_site(plain, Token("a@pve", "b", "c"), insecure=True).tls == TlsPolicy(None, True)
    assert Target.from_site(plain, Token("a@pve", "b", "c")).tls == TlsPolicy(None, False)


# --- multipart body ------------------------------------------------------------------------------------

def _parse(body: MultipartBody) -> dict[str, bytes]:
    raw = b"".join(body)
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + body.content_type.encode() + b"\r\n\r\n" + raw)
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in message.iter_parts()}


def test_multipart_body_length_is_its_content_length(tmp_path: Path) -> None:
    image = tmp_path / "intranet-1234.qcow2"
    image.write_bytes(os.urandom(300_000))
    seen: list[int] = []
    body = MultipartBody({"content": "import", "checksum": "ab" * 32, "checksum-algorithm": "sha256"},
                         "filename", image, chunk=65536, on_chunk=seen.append)
    data = b"".join(body)
    assert len(body) == len(data)
    assert sum(seen) == 300_000 and max(seen) == 65536
    parts = _parse(body)
    assert parts == {"content": b"import", "checksum": b"ab" * 32, "checksum-algorithm": b"sha256",
                     "filename": image.read_bytes()}
    assert b'filename="intranet-1234.qcow2"' in data


def test_multipart_body_streams_a_large_file(tmp_path: Path) -> None:
    """A 3 GiB sparse file: its length is known without reading it, and iterating holds one chunk at a time."""
    image = tmp_path / "big.qcow2"
    with image.open("wb") as f:
        f.truncate(3 * 1024**3)
    body = MultipartBody({"content": "import"}, "filename", image, chunk=1024 * 1024)
    assert len(body) == 3 * 1024**3 + len(body.head) + len(body.tail)
    tracemalloc.start()
    try:
        pieces = itertools.islice(iter(body), 1, 65)  # 64 MiB of file after the head
        total = sum(len(p) for p in pieces)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 64 * 1024 * 1024
    assert peak < 8 * 1024 * 1024


def test_a_file_that_changes_size_while_sent_is_an_error(tmp_path: Path) -> None:
    image = tmp_path / "x.qcow2"
    image.write_bytes(b"x" * 10)
    body = MultipartBody({}, "filename", image, chunk=4)
    image.write_bytes(b"x" * 5)
    with pytest.raises(ProxmoxError, match="changed size"):
        b"".join(body)


# --- tasks ---------------------------------------------------------------------------------------------

UPID = "UPID:pve:000A1B2C:0012D687:6745A1B2:imgcopy::homelab@pve!deploy:"


class ScriptedPve:
    """Answers GETs from a script (path -> list of answers, the last repeated); time advances by sleeping."""

    def __init__(self, answers: dict[str, list[Any]]) -> None:
        self.answers = answers
        self.now = 0.0
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.target = target()

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def get(self, path: str, **params: Any) -> Any:
        self.calls.append((path, params))
        for suffix, script in self.answers.items():
            if path.endswith(suffix):
                answer = script.pop(0) if len(script) > 1 else script[0]
                if isinstance(answer, Exception):
                    raise answer
                return answer
        raise AssertionError(f"unexpected GET {path}")


def test_wait_task_polls_until_stopped_ok() -> None:
    pve = ScriptedPve({"/status": [{"status": "running"}, {"status": "running"},
                                   {"status": "stopped", "exitstatus": "OK"}]})
    assert proxmox.wait_task(pve, UPID, timeout=60)["exitstatus"] == "OK"  # type: ignore[arg-type]
    assert pve.now == pytest.approx(0.1 + 0.2)
    assert pve.calls[0][0] == f"/nodes/pve/tasks/{UPID}/status"


def test_wait_task_polls_soon_first_then_every_poll_seconds() -> None:
    pve = ScriptedPve({"/status": [{"status": "running"}] * 6 + [{"status": "stopped", "exitstatus": "OK"}]})
    proxmox.wait_task(pve, UPID, timeout=60)  # type: ignore[arg-type]
    assert pve.now == pytest.approx(0.1 + 0.2 + 0.4 + 0.8 + 1.0 + 1.0)


def test_a_failed_task_raises_with_its_log_tail() -> None:
    log = [{"n": i, "t": f"line {i}"} for i in range(1, 9)] + [{"n": 9, "t": "TASK ERROR: checksum mismatch"}]
    pve = ScriptedPve({"/status": [{"status": "stopped", "exitstatus": "checksum mismatch"}], "/log": [log]})
    with pytest.raises(ProxmoxTaskError) as caught:
        proxmox.wait_task(pve, UPID, timeout=60)  # type: ignore[arg-type]
    message = str(caught.value)
    assert message == (f"task {UPID} failed: checksum mismatch: line 5 | line 6 | line 7 | line 8 | "
                       "TASK ERROR: checksum mismatch")


def test_a_task_still_running_at_the_timeout_raises() -> None:
    pve = ScriptedPve({"/status": [{"status": "running"}], "/log": [[{"n": 1, "t": "copying"}]]})
    with pytest.raises(ProxmoxTaskError, match=r"still running after 5 s: copying$"):
        proxmox.wait_task(pve, UPID, timeout=5)  # type: ignore[arg-type]


def test_a_bad_upid_is_refused() -> None:
    with pytest.raises(ProxmoxError, match="not a task ID"):
        proxmox.upid_node("nonsense")


# --- HTTP errors ---------------------------------------------------------------------------------------

def test_refusals_are_one_line_with_a_hint() -> None:
    from proxmoxer import ResourceException

    forbidden = ResourceException(403, "Forbidden", "Permission check failed (/vms/101, VM.Allocate)")
    assert proxmox._describe_refusal(forbidden) == ("HTTP 403 Forbidden: Permission check failed (/vms/101, "
                                                    "VM.Allocate) (the token lacks a privilege: see `homelab "
                                                    "token-role`)")
    bad = ResourceException(400, "Bad Request", "Parameter verification failed.",
                            errors={"content": "value 'import' does not\nhave a value in the enumeration"})
    assert proxmox._describe_refusal(bad) == ("HTTP 400 Bad Request: content: value 'import' does not have a "
                                              "value in the enumeration")
    assert "check PVE_TOKEN" in proxmox._describe_refusal(ResourceException(401, "Unauthorized", ""))


# --- privileges ----------------------------------------------------------------------------------------

@needs_schema
def test_the_vendored_permissions_are_the_real_schemas() -> None:
    vendored = proxmox.load_permissions()
    real = proxmox.extract_permissions(REAL_SCHEMA)
    assert {f"{m} {p}": v for (m, p), v in vendored.items()} == real


@needs_schema
def test_every_deploy_call_is_in_the_real_schema_and_allows_tokens() -> None:
    import json

    tree = json.loads(REAL_SCHEMA.read_text())
    infos: dict[tuple[str, str], Any] = {}

    def walk(nodes: list[Any]) -> None:
        for node in nodes:
            for method, info in (node.get("info") or {}).items():
                infos[(method, node["path"])] = info
            walk(node.get("children") or [])

    walk(tree)
    for call in proxmox.DEPLOY_CALLS:
        assert (call.method, call.path) in infos, call
        assert infos[(call.method, call.path)].get("allowtoken") == 1, call


@needs_schema
def test_the_role_derived_from_the_real_schema() -> None:
    schema = {tuple(k.split(" ", 1)): v for k, v in proxmox.extract_permissions(REAL_SCHEMA).items()}
    grants = proxmox.derive_grants(schema)  # type: ignore[arg-type]
    by_source = {(g.call.method, g.call.path, g.privilege): g.source for g in grants}
    # From the schema's checks: ...
    assert by_source[("POST", "/nodes/{node}/storage/{storage}/upload", "Datastore.AllocateTemplate")] == "check"
    assert by_source[("POST", "/nodes/{node}/qemu/{vmid}/status/start", "VM.PowerMgmt")] == "check"
    assert by_source[("DELETE", "/nodes/{node}/qemu/{vmid}", "VM.Allocate")] == "check"
    assert by_source[("GET", "/nodes/{node}/storage/{storage}/content", "Datastore.Audit")] == "check"
    # ... from its descriptions, and from qemu-server's per-option checks.
    assert by_source[("POST", "/nodes/{node}/qemu", "SDN.Use")] == "description"
    assert by_source[("POST", "/nodes/{node}/qemu", "VM.Config.Disk")] == "code"
    needed = proxmox.required_privileges(grants, target(), ("/vms",))
    assert needed == {
        "/storage/local": {"Datastore.AllocateTemplate", "Datastore.Audit"},
        "/storage/local-zfs": {"Datastore.AllocateSpace", "Datastore.Audit"},
        "/sdn/zones/localnetwork/vmbr0": {"SDN.Use"},
        "/mapping/dir": {"Mapping.Use"},
        "/vms": {"VM.Allocate", "VM.Audit", "VM.PowerMgmt", "VM.Config.CPU", "VM.Config.Memory", "VM.Config.Disk",
                 "VM.Config.CDROM", "VM.Config.Network", "VM.Config.HWType", "VM.Config.Options", "VM.Monitor",
                 "VM.Snapshot"},
    }


def test_an_any_check_needs_a_pick_among_its_privileges() -> None:
    schema = proxmox.load_permissions()
    call = ApiCall("GET", "/nodes/{node}/storage/{storage}/content", "x", storage="import")
    pattern = re.escape("needs any of Datastore.Audit, Datastore.AllocateSpace: say which")
    with pytest.raises(ProxmoxError, match=pattern):
        proxmox.derive_grants(schema, (call,))
    wrong = ApiCall("GET", "/nodes/{node}/storage/{storage}/content", "x", storage="import", pick=("VM.Audit",))
    with pytest.raises(ProxmoxError, match="say which"):
        proxmox.derive_grants(schema, (wrong,))


def test_a_described_privilege_must_be_named_by_the_schema() -> None:
    schema = proxmox.load_permissions()
    call = ApiCall("POST", "/nodes/{node}/qemu", "x", described=(("/vms/{vmid}", "VM.Monitor"),))
    with pytest.raises(ProxmoxError, match=re.escape("does not name VM.Monitor")):
        proxmox.derive_grants(schema, (call,))


def test_an_unknown_call_is_refused() -> None:
    with pytest.raises(ProxmoxError, match=re.escape("GET /nodes/{node}/nothing is not in the PVE API schema")):
        proxmox.derive_grants(proxmox.load_permissions(), (ApiCall("GET", "/nodes/{node}/nothing", "x"),))


def test_effective_privileges_come_from_the_nearest_listed_path() -> None:
    granted = {"/": {"Sys.Audit": 1}, "/vms": {"VM.Audit": 1, "VM.Allocate": 0}, "/vms/101": {"VM.PowerMgmt": 1}}
    assert proxmox.effective(granted, "/vms/101") == {"VM.PowerMgmt"}
    assert proxmox.effective(granted, "/vms/102") == {"VM.Audit"}
    assert proxmox.effective(granted, "/storage/local") == {"Sys.Audit"}
    assert proxmox.effective({}, "/vms") == set()


def test_token_role_prints_roles_and_pveum_commands() -> None:
    plan = proxmox.token_role(load_site(SITE).proxmox(), "homelab@pve!deploy")
    assert set(plan.roles) == {"Homelab-storage-local", "Homelab-storage-local-zfs",
                               "Homelab-sdn-zones-localnetwork-vmbr0", "Homelab-mapping-dir", "Homelab-vms"}
    commands = plan.commands()
    assert 'pveum role add Homelab-storage-local -privs "Datastore.AllocateTemplate,Datastore.Audit"' in commands
    assert any(c.startswith("pveum user token add homelab@pve deploy --privsep 1") for c in commands)
    assert "pveum acl modify /vms --roles Homelab-vms --tokens 'homelab@pve!deploy'" in commands
    assert "pveum acl modify /vms --roles Homelab-vms --users homelab@pve" in commands
    text = plan.describe()
    assert "POST   /nodes/{node}/storage/{storage}/upload" in text
    with pytest.raises(ProxmoxError, match="is not user@realm!tokenid"):
        proxmox.token_role(load_site(SITE).proxmox(), "homelab")


# --- preflight checks on answers -----------------------------------------------------------------------

@pytest.mark.parametrize(("version", "status"), [("8.4.1", "ok"), ("8.4.0", "ok"), ("9.0.3", "ok"),
                                                 ("8.3.5", "FAIL"), ("7.4-17", "FAIL"), ("", "FAIL")])
def test_version_check(version: str, status: str) -> None:
    assert preflight.check_version({"version": version}).status == status


def test_storage_without_import_content_says_how_to_add_it() -> None:
    pve = ScriptedPve({"/storage": [[{"storage": "local", "content": "iso,vztmpl,backup", "enabled": 1,
                                      "active": 1},
                                     {"storage": "local-zfs", "content": "images,rootdir", "enabled": 1,
                                      "active": 1}]]})
    checks = {c.name: c for c in preflight.check_storages(pve)}  # type: ignore[arg-type]
    assert checks["storage import"].line() == ("FAIL storage import: local does not hold content import (it holds "
                                               "iso,vztmpl,backup) -> pvesm set local --content "
                                               "iso,vztmpl,backup,import")
    assert checks["storage images"].status == "ok" and checks["storage iso"].status == "ok"


def test_vm_collisions() -> None:
    site = load_site(SITE)  # intranet 101 (name intranet), extranet 111 (name dmz)
    vms = [{"type": "qemu", "vmid": 101, "name": "intranet", "tags": "homelab;homelab-intranet"},
           {"type": "qemu", "vmid": 111, "name": "router", "tags": ""},
           {"type": "qemu", "vmid": 200, "name": "intranet", "tags": "homelab"}]
    pve = ScriptedPve({"/cluster/resources": [vms]})
    checks = {c.name: c for c in preflight.check_vms(pve, site, ["intranet", "extranet"])}  # type: ignore[arg-type]
    assert checks["vm intranet"].line() == "ok   vm intranet: VMID 101 (intranet): ours, will be replaced"
    assert checks["vm extranet"].line() == ("FAIL vm extranet: VMID 111 is taken by 'router' (not tagged homelab) "
                                            "-> choose a free hosts.extranet.vmid")
    stranger = [{"type": "qemu", "vmid": 300, "name": "dmz"}]
    pve = ScriptedPve({"/cluster/resources": [stranger]})
    (check,) = preflight.check_vms(pve, site, ["extranet"])  # type: ignore[arg-type]
    assert check.detail == "name 'dmz' is taken by VMID 300 (not tagged homelab)"


def test_a_role_without_vmid_fails_its_check() -> None:
    site = load_site(FIXTURES / "site" / "site-minimal.yaml")
    (check,) = preflight.check_vms(ScriptedPve({"/cluster/resources": [[]]}), site, ["intranet"])  # type: ignore
    assert check.failed and check.detail == "hosts.intranet.vmid is not set"


def test_listed_size_is_a_qcow2s_virtual_size(tmp_path: Path) -> None:
    image = tmp_path / "a.qcow2"
    image.write_bytes(b"QFI\xfb" + b"\0" * 20 + (4 * 1024**3).to_bytes(8, "big") + b"\0" * 100)
    assert proxmox.listed_size(image) == 4 * 1024**3
    iso = tmp_path / "seed.iso"
    iso.write_bytes(b"\0" * 2048)
    assert proxmox.listed_size(iso) == 2048
