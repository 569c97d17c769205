"""The Proxmox VE API: connection (token, TLS), calls with one-line errors, tasks, streamed uploads, privileges.

Every call the deploy makes is a row of DEPLOY_CALLS; the least-privilege role (`homelab token-role`) and the
preflight's permission check are derived from those rows and the `permissions` of each call in PVE's own API
schema, so a new call cannot be used without its privileges appearing in the role.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import ssl
import time
import urllib.parse
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import urllib3
from proxmoxer import ProxmoxAPI, ResourceException
from requests.adapters import HTTPAdapter

from .errors import ProxmoxError, ProxmoxTaskError

log = logging.getLogger("homelab.proxmox")

TOKEN_ENV = "PVE_TOKEN"
# user@realm!tokenid=secret, as `pveum user token add` prints its parts; realm and token ID use PVE's ID syntax.
TOKEN_RE = re.compile(r"(?P<user>[^\s@!=:]+@[A-Za-z][A-Za-z0-9._-]*)!(?P<name>[A-Za-z][A-Za-z0-9._-]*)=(?P<secret>\S+)")
# (connect, read) seconds. proxmoxer's default (5 s for everything) cuts off slow calls and any upload.
API_TIMEOUT = (10.0, 60.0)
# An upload's response comes once PVE has stored the whole body; the read timeout covers that wait.
UPLOAD_TIMEOUT = (10.0, 600.0)
UPLOAD_CHUNK = 1024 * 1024
QCOW2_MAGIC = b"QFI\xfb"
TASK_LOG_TAIL = 5
# Many tasks (a seed ISO's import, a snapshot, a VM's creation) end within a fraction of a second: a flat 1 s
# between status reads made each wait up to a second more (1 s on a 7 s upload of 2 GiB: bench/upload_vs_raw_post).
FIRST_POLL = 0.1
# Our VMs carry this tag; a VMID or name held by a VM without it is someone else's.
TAG = "homelab"


@dataclass(frozen=True)
class Token:
    user: str  # user@realm
    name: str  # the token ID
    secret: str = field(repr=False)

    @property
    def tokenid(self) -> str:
        """user@realm!name, how pveum and ACLs name the token."""
        return f"{self.user}!{self.name}"


def parse_token(text: str | None) -> Token:
    """The token from $PVE_TOKEN's text; one line naming the expected shape (never echoing the secret)."""
    if not text:
        raise ProxmoxError(f"{TOKEN_ENV} is not set: export {TOKEN_ENV}=user@realm!tokenid=secret "
                           "(see `homelab token-role` for creating one)")
    match = TOKEN_RE.fullmatch(text.strip())
    if match is None:
        raise ProxmoxError(f"{TOKEN_ENV} is not user@realm!tokenid=secret (e.g. homelab@pve!deploy=<uuid>)")
    return Token(match["user"], match["name"], match["secret"])


def token_from_env(env: Mapping[str, str] | None = None) -> Token:
    return parse_token((os.environ if env is None else env).get(TOKEN_ENV))


# --- TLS -----------------------------------------------------------------------------------------------


def format_fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate as AA:BB:..., the form `pvenode cert info` prints and the site file holds."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


class FingerprintAdapter(HTTPAdapter):
    """Accepts exactly the certificate with this SHA-256 fingerprint (PVE's self-signed one), no CA involved.

    urllib3 compares the peer certificate's digest after the handshake and fails the request otherwise (and
    counts the connection as verified: no InsecureRequestWarning).
    """

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint.replace(":", "").lower()
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["assert_fingerprint"] = self.fingerprint
        super().init_poolmanager(*args, **kwargs)

    def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None,
             verify: bool | str = True, cert: Any = None, proxies: Any = None) -> requests.Response:
        # proxmoxer passes verify=True on every call; a CA check would refuse the self-signed certificate first.
        return super().send(request, stream=stream, timeout=timeout, verify=False, cert=cert, proxies=proxies)


@dataclass(frozen=True)
class TlsPolicy:
    """How the API's certificate is checked: system CAs (default), a pinned fingerprint, or not at all."""

    fingerprint: str | None = None
    insecure: bool = False

    def describe(self) -> str:
        if self.fingerprint:
            return f"pinned fingerprint {self.fingerprint}"
        return "NOT checked (insecure)" if self.insecure else "checked against the system CAs"

    def apply(self, session: requests.Session, base: str) -> None:
        if self.fingerprint:
            session.mount(base, FingerprintAdapter(self.fingerprint))
            session.verify = False
        else:
            session.verify = not self.insecure


def server_fingerprint(url: str, timeout: float = 10.0) -> str | None:
    """The fingerprint the server actually presents (for the mismatch message), or None if unreachable."""
    parts = urllib.parse.urlsplit(url)
    try:
        pem = ssl.get_server_certificate((parts.hostname or "", parts.port or 8006), timeout=timeout)
    except (OSError, ValueError):
        return None
    return format_fingerprint(ssl.PEM_cert_to_DER_cert(pem))


# --- Connection and calls --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What the site file's proxmox section says about the host, with the token from the environment."""

    url: str  # https://host:port
    node: str
    storages: Mapping[str, str]  # use (import, images, iso) -> storage ID
    bridge: str
    tls: TlsPolicy
    token: Token

    @classmethod
    def from_site(cls, section: Mapping[str, Any], token: Token, insecure: bool = False) -> Target:
        tls = section["tls"]
        if insecure and tls.get("fingerprint"):
            raise ProxmoxError("--insecure cannot be combined with the site's pinned proxmox.tls.fingerprint")
        policy = TlsPolicy(fingerprint=tls.get("fingerprint"), insecure=insecure or bool(tls.get("insecure")))
        return cls(section["url"], section["node"], dict(section["storages"]), section["bridge"], policy, token)


class Pve:
    """A connected API: get/post/delete on concrete paths, each failure one ProxmoxError naming the call."""

    def __init__(self, target: Target, *, timeout: tuple[float, float] = API_TIMEOUT,
                 upload_timeout: tuple[float, float] = UPLOAD_TIMEOUT, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.target = target
        self.upload_timeout = upload_timeout
        self.clock, self.sleep = clock, sleep
        host = urllib.parse.urlsplit(target.url).netloc
        self.api = ProxmoxAPI(host, backend="https", service="PVE", user=target.token.user,
                              token_name=target.token.name, token_value=target.token.secret,
                              verify_ssl=not target.tls.insecure, timeout=timeout)
        self.base = f"{target.url}/api2/json"
        # proxmoxer's session is where its requests go: the TLS policy must be on that one.
        target.tls.apply(self.api._store["session"], target.url)

    def call(self, method: str, path: str, **params: Any) -> Any:
        """One API call; `path` is concrete (/nodes/pve/storage). The result's `data`."""
        resource = self.api(path.strip("/"))
        try:
            with _quiet_if(self.target.tls.insecure):
                return self._send(resource, method, params)
        except ResourceException as exc:
            raise ProxmoxError(f"{method} {path}: {_describe_refusal(exc)}") from None
        except requests.RequestException as exc:
            raise self._transport_error(method, path, exc) from None

    @staticmethod
    def _send(resource: Any, method: str, params: dict[str, Any]) -> Any:
        if method == "GET":
            return resource.get(**params)
        if method == "POST":
            return resource.post(**params)
        if method == "PUT":
            return resource.put(**params)
        if method == "DELETE":
            return resource.delete(**params)
        raise ValueError(f"unknown method {method}")

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, **params)

    def _transport_error(self, method: str, path: str, exc: requests.RequestException) -> ProxmoxError:
        url = self.target.url
        if isinstance(exc, requests.exceptions.SSLError):
            if self.target.tls.fingerprint:
                seen = server_fingerprint(url)
                presented = f" (it presents {seen})" if seen else ""
                return ProxmoxError(f"{method} {path}: the certificate of {url} is not the pinned "
                                    f"proxmox.tls.fingerprint {self.target.tls.fingerprint}{presented}")
            return ProxmoxError(f"{method} {path}: the certificate of {url} is not trusted ({_first_line(exc)}): pin "
                                "it with proxmox.tls.fingerprint (`pvenode cert info` on the node)")
        if isinstance(exc, requests.exceptions.Timeout):
            return ProxmoxError(f"{method} {path}: {url} did not answer in time ({_first_line(exc)})")
        if isinstance(exc, requests.exceptions.ConnectionError):
            return ProxmoxError(f"{method} {path}: cannot reach {url} ({_first_line(exc)})")
        return ProxmoxError(f"{method} {path}: {_first_line(exc)}")


@contextlib.contextmanager
def _quiet_if(insecure: bool) -> Iterator[None]:
    """Insecure was asked for explicitly (and preflight says so once): no urllib3 warning on every request."""
    with warnings.catch_warnings():
        if insecure:
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        yield


def _first_line(exc: BaseException) -> str:
    """The innermost reason of a requests error (urllib3 wraps it twice), on one line."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    text = str(reason if reason is not None else exc).strip()
    # urllib3 prefixes its reasons with the connection object: the URL is already in our message.
    text = re.sub(r"^[\w.]*Connection(Pool)?\(host=[^)]*\): ", "", text.strip("\"'"))
    return text.splitlines()[0] if text else type(exc).__name__


def _describe_refusal(exc: ResourceException) -> str:
    """HTTP status, PVE's reason and its per-parameter errors on one line; a hint for the statuses users meet."""
    reason = " ".join(str(exc.status_message or "").split())
    content = " ".join(str(exc.content or "").split())
    detail = content if content and content != reason else ""
    errors = getattr(exc, "errors", None)
    if isinstance(errors, dict) and errors:
        detail = ", ".join(f"{k}: {' '.join(str(v).split())}" for k, v in sorted(errors.items()))
    text = f"HTTP {exc.status_code} {reason}" + (f": {detail}" if detail else "")
    if exc.status_code == 401:
        text += f" (the token was refused: check {TOKEN_ENV})"
    elif exc.status_code == 403:
        text += " (the token lacks a privilege: see `homelab token-role`)"
    return text


# --- Tasks ---------------------------------------------------------------------------------------------


def upid_node(upid: str) -> str:
    """The node a task runs on, from its UPID (UPID:node:pid:pstart:starttime:type:id:user:)."""
    parts = upid.split(":")
    if len(parts) < 3 or parts[0] != "UPID" or not parts[1]:
        raise ProxmoxError(f"not a task ID: {upid!r}")
    return parts[1]


def wait_task(pve: Pve, upid: str, timeout: float, poll: float = 1.0) -> dict[str, Any]:
    """Poll a task until it stops; its status if it ended OK, else ProxmoxTaskError with the log's tail.

    The first polls come after FIRST_POLL seconds, doubling up to `poll`. proxmoxer's Tasks.blocking_status
    returns None on timeout and ignores exitstatus, so it is not used.
    """
    node = upid_node(upid)
    # A UPID's ':' '@' '!' are valid in a URL path; PVE and proxmoxer use it unescaped.
    path = f"/nodes/{node}/tasks/{upid}"
    deadline = pve.clock() + timeout
    delay = min(FIRST_POLL, poll)
    while True:
        status: dict[str, Any] = pve.get(f"{path}/status")
        if status.get("status") == "stopped":
            break
        if pve.clock() >= deadline:
            raise ProxmoxTaskError(f"task {upid} still running after {timeout:.0f} s{_log_tail(pve, path)}")
        pve.sleep(delay)
        delay = min(delay * 2, poll)
    if status.get("exitstatus") != "OK":
        raise ProxmoxTaskError(f"task {upid} failed: {status.get('exitstatus') or 'no exit status'}"
                               f"{_log_tail(pve, path)}")
    return status


def _log_tail(pve: Pve, path: str) -> str:
    try:
        # The API has no "last N lines" query and proxmoxer drops the `total` it answers: read it all (task
        # logs of uploads and VM creation are a few lines).
        lines = pve.get(f"{path}/log", start=0, limit=100000)
    except ProxmoxError as exc:
        return f" (no task log: {exc})"
    kept = [str(entry.get("t", "")) for entry in lines if str(entry.get("t", "")).strip()][-TASK_LOG_TAIL:]
    return (": " + " | ".join(kept)) if kept else ""


# --- Uploads -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    sent: int
    total: int
    bytes_per_second: float


class MultipartBody:
    """multipart/form-data of some fields and one file, generated in chunks with its length known up front.

    Memory stays at one chunk whatever the file's size; requests sends Content-Length from __len__ (a plain
    generator would make it chunked, which PVE's upload handler does not take).
    """

    def __init__(self, fields: Mapping[str, str], file_field: str, path: Path, *,
                 chunk: int = UPLOAD_CHUNK, on_chunk: Callable[[int], None] | None = None) -> None:
        self.boundary = f"homelab-{uuid.uuid4().hex}"
        self.path = path
        self.chunk = chunk
        self.on_chunk = on_chunk
        self.size = path.stat().st_size
        head = b"".join(self._part(name, value.encode()) for name, value in fields.items())
        filename = path.name.replace('"', "")
        head += (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"{file_field}\"; "
                 f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
        self.head = head
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _part(self, name: str, value: bytes) -> bytes:
        return (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n").encode() + value + \
            b"\r\n"

    def __len__(self) -> int:
        return len(self.head) + self.size + len(self.tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        sent = 0
        with self.path.open("rb") as f:
            while block := f.read(self.chunk):
                sent += len(block)
                if sent > self.size:
                    raise ProxmoxError(f"{self.path} grew while being uploaded")
                if self.on_chunk is not None:
                    self.on_chunk(len(block))
                yield block
        if sent != self.size:
            raise ProxmoxError(f"{self.path} changed size while being uploaded ({sent} of {self.size} bytes)")
        yield self.tail


@dataclass(frozen=True)
class UploadResult:
    volid: str
    size: int
    skipped: bool
    seconds: float = 0.0


def find_volume(pve: Pve, storage: str, content: str, name: str) -> dict[str, Any] | None:
    """The storage's volume of that content type and file name, or None."""
    volid = f"{storage}:{content}/{name}"
    entries = pve.get(f"/nodes/{pve.target.node}/storage/{storage}/content", content=content)
    for entry in entries:
        if entry.get("volid") == volid:
            found: dict[str, Any] = entry
            return found
    return None


def listed_size(path: Path) -> int:
    """The size PVE lists for this file once uploaded: a qcow2's virtual size (its header), else the file's.

    pve-storage's file_size_info reports what `qemu-img info` calls virtual-size for images.
    """
    with path.open("rb") as f:
        header = f.read(32)
    if len(header) == 32 and header[:4] == QCOW2_MAGIC:
        return int.from_bytes(header[24:32], "big")
    return path.stat().st_size


def upload(pve: Pve, storage: str, content: str, path: Path, sha256: str, *, task_timeout: float = 600,
           on_progress: Callable[[Progress], None] | None = None) -> UploadResult:
    """Stream a file to the storage (content import or iso) with its sha256 checked by PVE; skipped when there.

    The name carries the image version, so the same name and size is the same upload: nothing is sent again.
    A same-named volume of another size is refused instead of guessed about.
    """
    node, size = pve.target.node, path.stat().st_size
    existing = find_volume(pve, storage, content, path.name)
    volid = f"{storage}:{content}/{path.name}"
    if existing is not None:
        listed = listed_size(path)
        if int(existing.get("size") or -1) == listed:
            return UploadResult(volid, size, skipped=True)
        raise ProxmoxError(f"{volid} is already on storage {storage} with another size ({existing.get('size')} "
                           f"bytes listed, this file {listed}): remove it or rebuild")
    started = pve.clock()
    sent = 0

    def on_chunk(count: int) -> None:
        nonlocal sent
        sent += count
        if on_progress is not None:
            elapsed = max(pve.clock() - started, 1e-6)
            on_progress(Progress(sent, size, sent / elapsed))

    body = MultipartBody({"content": content, "checksum": sha256, "checksum-algorithm": "sha256"},
                         "filename", path, on_chunk=on_chunk)
    upid = _post_body(pve, f"/nodes/{node}/storage/{storage}/upload", body)
    wait_task(pve, upid, task_timeout)
    return UploadResult(volid, size, skipped=False, seconds=pve.clock() - started)


def _post_body(pve: Pve, path: str, body: MultipartBody) -> str:
    """POST a streamed body on a session of our own: proxmoxer's reads dict data only (and buffers files)."""
    session = requests.Session()
    pve.target.tls.apply(session, pve.target.url)
    headers = {"Authorization": f"PVEAPIToken={pve.target.token.tokenid}={pve.target.token.secret}",
               "Content-Type": body.content_type, "Content-Length": str(len(body)), "Accept": "application/json"}
    try:
        with session, _quiet_if(pve.target.tls.insecure):
            response = session.post(f"{pve.base}{path}", data=body, headers=headers, timeout=pve.upload_timeout)
    except requests.RequestException as exc:
        raise pve._transport_error("POST", path, exc) from None
    if response.status_code >= 400:
        errors = _json_errors(response)
        # Shaped as proxmoxer shapes its errors (standard status text, PVE's reason), so both read alike.
        status_text = http.client.responses.get(response.status_code, "")
        raise ProxmoxError(f"POST {path}: " + _describe_refusal(
            ResourceException(response.status_code, status_text, response.reason, errors=errors)))
    try:
        upid = response.json()["data"]
    except (ValueError, KeyError, TypeError):
        raise ProxmoxError(f"POST {path}: answered without a task ID ({response.text[:200]!r})") from None
    if not isinstance(upid, str):
        raise ProxmoxError(f"POST {path}: answered without a task ID ({upid!r})")
    return upid


def _json_errors(response: requests.Response) -> dict[str, Any] | None:
    try:
        errors = response.json().get("errors")
    except (ValueError, AttributeError):
        return None
    return errors if isinstance(errors, dict) else None


# --- Privileges ----------------------------------------------------------------------------------------

# The `permissions` of every call of PVE 8.4's API schema, extracted from pve-docs' apidata.json by
# extract_permissions (a unit test checks it against the real file): the tool needs no PVE host to print a role.
PERMISSIONS_PATH = Path(__file__).parent / "schemas" / "pve-8.4-permissions.json"
Permissions = Mapping[tuple[str, str], Mapping[str, Any]]


@dataclass(frozen=True)
class ApiCall:
    """A call the deploy makes. `storage` says which site storage fills {storage}.

    `pick`: the privilege we rely on where the schema accepts any one of several. `described`: privileges the
    schema states only in the call's permission description (checked to be named there), as (path, privilege).
    `in_code`: privileges PVE checks in its code for the parameters we send, not in the schema (say why).
    """

    method: str
    path: str
    why: str
    storage: str | None = None
    pick: tuple[str, ...] = ()
    described: tuple[tuple[str, str], ...] = ()
    in_code: tuple[tuple[str, str], ...] = ()


# The one table of calls: preflight, upload, create, swap. Placeholders: {node} {storage} {vmid} {upid}, and
# in described/in_code paths also {images} (the images storage) and {bridge}.
DEPLOY_CALLS: tuple[ApiCall, ...] = (
    ApiCall("GET", "/version", "preflight: PVE version"),
    ApiCall("GET", "/nodes", "preflight: the node exists"),
    ApiCall("GET", "/nodes/{node}/storage", "preflight: storages and their content types",
            described=(("/storage/{import}", "Datastore.Audit"), ("/storage/{images}", "Datastore.Audit"),
                       ("/storage/{iso}", "Datastore.Audit"))),
    ApiCall("GET", "/nodes/{node}/network", "preflight: the bridge exists"),
    ApiCall("GET", "/access/permissions", "preflight: the token's own privileges"),
    ApiCall("GET", "/cluster/resources", "preflight: VMID and name collisions (lists VMs with VM.Audit)",
            described=()),
    ApiCall("GET", "/nodes/{node}/qemu/{vmid}/config", "our tags on an existing VM"),
    ApiCall("GET", "/nodes/{node}/storage/{storage}/content", "skip an upload already there", storage="import",
            pick=("Datastore.Audit",)),
    ApiCall("POST", "/nodes/{node}/storage/{storage}/upload", "upload the image (content import)", storage="import"),
    ApiCall("GET", "/nodes/{node}/storage/{storage}/content", "skip a seed ISO already there", storage="iso",
            pick=("Datastore.Audit",)),
    ApiCall("POST", "/nodes/{node}/storage/{storage}/upload", "upload the cloud-init seed ISO", storage="iso"),
    ApiCall("GET", "/nodes/{node}/tasks/{upid}/status", "wait for a task (our own: no privilege)"),
    ApiCall("GET", "/nodes/{node}/tasks/{upid}/log", "a failed task's log (our own: no privilege)"),
    ApiCall("POST", "/nodes/{node}/qemu", "create the new VM from the uploaded image",
            described=(("/vms/{vmid}", "VM.Allocate"), ("/storage/{images}", "Datastore.AllocateSpace"),
                       ("/sdn/zones/localnetwork/{bridge}", "SDN.Use")),
            # qemu-server checks one privilege per option set at creation (check_vm_modify_config_perm).
            in_code=(("/vms/{vmid}", "VM.Config.CPU"), ("/vms/{vmid}", "VM.Config.Memory"),
                     ("/vms/{vmid}", "VM.Config.Disk"), ("/vms/{vmid}", "VM.Config.CDROM"),
                     ("/vms/{vmid}", "VM.Config.Network"), ("/vms/{vmid}", "VM.Config.HWType"),
                     ("/vms/{vmid}", "VM.Config.Options"),
                     # check_dir_perm: a virtiofs share needs Mapping.Use on its directory mapping.
                     ("/mapping/dir", "Mapping.Use"))),
    ApiCall("GET", "/nodes/{node}/storage/{storage}/content", "data volumes exist; a VM's own volumes before "
            "it is destroyed", storage="images", pick=("Datastore.Audit",)),
    ApiCall("GET", "/cluster/mapping/dir", "the shares' directory mappings exist (lists those we may use)",
            described=(("/mapping/dir", "Mapping.Use"),)),
    ApiCall("PUT", "/nodes/{node}/qemu/{vmid}/config", "swap: NIC link and MAC, tags, virtiofs shares handed over",
            pick=("VM.Config.Disk", "VM.Config.Network", "VM.Config.Options"),
            # check_dir_perm for a virtiofs share attached to the new VM.
            in_code=(("/mapping/dir", "Mapping.Use"),)),
    ApiCall("POST", "/nodes/{node}/qemu/{vmid}/agent/ping", "health gate: the guest agent answers"),
    ApiCall("POST", "/nodes/{node}/qemu/{vmid}/agent/exec", "verification, health gate, stopping the old stack"),
    ApiCall("GET", "/nodes/{node}/qemu/{vmid}/agent/exec-status", "the result of a guest command"),
    ApiCall("POST", "/nodes/{node}/qemu/{vmid}/move_disk", "swap: hand a data disk to the other VM",
            described=(("/storage/{images}", "Datastore.AllocateSpace"),)),
    ApiCall("POST", "/nodes/{node}/qemu/{vmid}/snapshot", "swap: snapshot the handed-over data before the new VM "
            "starts"),
    ApiCall("POST", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/rollback", "swap rollback: the data as handed "
            "over", pick=("VM.Snapshot",)),
    ApiCall("DELETE", "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}", "swap: drop the snapshot (move_disk "
            "refuses a disk a snapshot references)"),
    ApiCall("GET", "/nodes/{node}/qemu/{vmid}/status/current", "VM state during the swap"),
    ApiCall("POST", "/nodes/{node}/qemu/{vmid}/status/start", "start the new VM"),
    ApiCall("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown", "stop the old VM gracefully"),
    ApiCall("POST", "/nodes/{node}/qemu/{vmid}/status/stop", "stop a VM that does not shut down"),
    ApiCall("DELETE", "/nodes/{node}/qemu/{vmid}", "remove an old VM holding no data volume"),
)


def extract_permissions(apidata: Path) -> dict[str, Any]:
    """{"METHOD /path/{template}": permissions} of every call in PVE's apidata.json (a tree of path nodes)."""
    extract: dict[str, Any] = {}

    def walk(nodes: list[dict[str, Any]]) -> None:
        for node in nodes:
            for method, info in (node.get("info") or {}).items():
                extract[f"{method} {node['path']}"] = info.get("permissions") or {}
            walk(node.get("children") or [])

    walk(json.loads(apidata.read_text()))
    return dict(sorted(extract.items()))


def load_permissions(path: Path = PERMISSIONS_PATH) -> dict[tuple[str, str], dict[str, Any]]:
    """(METHOD, path template) -> that call's permissions, from the extract."""
    data: dict[str, dict[str, Any]] = json.loads(path.read_text())
    return {(key.split(" ", 1)[0], key.split(" ", 1)[1]): value for key, value in data.items()}


@dataclass(frozen=True)
class Grant:
    """One privilege on one ACL path template, and which call needs it (and why the schema says so)."""

    path: str
    privilege: str
    call: ApiCall
    source: str  # "check", "description" or "code"


def derive_grants(schema: Permissions, calls: tuple[ApiCall, ...] = DEPLOY_CALLS) -> list[Grant]:
    """Every privilege the calls need, from each call's schema `permissions` (plus the rows' in_code)."""
    grants: list[Grant] = []
    for call in calls:
        permissions = schema.get((call.method, call.path))
        if permissions is None:
            raise ProxmoxError(f"{call.method} {call.path} is not in the PVE API schema")
        if "check" in permissions:
            grants += [Grant(path, priv, call, "check") for path, priv in _from_check(permissions["check"], call)]
        elif call.pick:
            raise ProxmoxError(f"{call.method} {call.path}: pick given but the schema has no check to pick from")
        description = str(permissions.get("description") or "")
        for path, priv in call.described:
            if f"{priv}" not in description:
                raise ProxmoxError(f"{call.method} {call.path}: the schema's permission description does not "
                                   f"name {priv}")
            grants.append(Grant(path, priv, call, "description"))
        grants += [Grant(path, priv, call, "code") for path, priv in call.in_code]
    return grants


def _from_check(check: list[Any], call: ApiCall) -> list[tuple[str, str]]:
    """["perm", path, [privs]] needs all; with "any", 1 needs one: the row's pick, which must be among them."""
    if not check or check[0] != "perm":
        raise ProxmoxError(f"{call.method} {call.path}: permission check {check[0]!r} is not handled")
    path, privs = check[1], list(check[2])
    options = dict(zip(check[3::2], check[4::2], strict=False))
    if options.get("any"):
        if not call.pick or not set(call.pick) <= set(privs):
            raise ProxmoxError(f"{call.method} {call.path}: needs any of {', '.join(privs)}: say which in pick")
        privs = list(call.pick)
    return [(path, priv) for priv in privs]


def bind_path(template: str, target: Target, vmid_path: str, storage_use: str | None) -> str:
    """A concrete ACL path: {node}, {bridge}, storages by use; VMs as `vmid_path` (e.g. /vms or /vms/101)."""
    path = template.replace("{node}", target.node).replace("{bridge}", target.bridge)
    if "{storage}" in path:
        if storage_use is None:
            raise ProxmoxError(f"{template}: which storage is not said")
        path = path.replace("{storage}", target.storages[storage_use])
    for use, storage in target.storages.items():
        path = path.replace("{" + use + "}", storage)
    return path.replace("/vms/{vmid}", vmid_path)


def required_privileges(grants: list[Grant], target: Target, vmid_paths: tuple[str, ...]) -> dict[str, set[str]]:
    """ACL path -> privileges; VM grants land on each of vmid_paths."""
    needed: dict[str, set[str]] = {}
    for grant in grants:
        targets = vmid_paths if "{vmid}" in grant.path else ("",)
        for vmid_path in targets:
            path = bind_path(grant.path, target, vmid_path or "/vms", grant.call.storage)
            needed.setdefault(path, set()).add(grant.privilege)
    return needed


def effective(permissions: Mapping[str, Mapping[str, Any]], path: str) -> set[str]:
    """Privileges at `path` from /access/permissions: the most specific listed ancestor (ACLs propagate)."""
    probe = path
    while True:
        if probe in permissions:
            return {priv for priv, value in permissions[probe].items() if value}
        if probe == "/":
            return set()
        probe = probe.rsplit("/", 1)[0] or "/"


@dataclass(frozen=True)
class RolePlan:
    """The least-privilege roles (one per ACL path) and the pveum commands that create and grant them."""

    roles: dict[str, tuple[str, tuple[str, ...]]]  # role name -> (ACL path, privileges)
    calls: tuple[ApiCall, ...]
    token: str

    def commands(self) -> list[str]:
        user = self.token.split("!", 1)[0]
        name = self.token.split("!", 1)[1]
        # An existing role is updated with `pveum role modify` and the same arguments.
        lines = [f"pveum role add {role} -privs \"{','.join(privs)}\"" for role, (_, privs) in self.roles.items()]
        lines.append(f"pveum user add {user}   # if it does not exist yet")
        lines.append(f"pveum user token add {user} {name} --privsep 1   # prints the secret once: PVE_TOKEN="
                     f"{self.token}=<secret>")
        # With privilege separation a token has the intersection of its own and its user's ACLs: grant both.
        for role, (path, _) in self.roles.items():
            lines.append(f"pveum acl modify {path} --roles {role} --users {user}")
            lines.append(f"pveum acl modify {path} --roles {role} --tokens '{self.token}'")
        return lines

    def describe(self) -> str:
        rows = ["# calls the deploy makes (builder/proxmox.py DEPLOY_CALLS)"]
        rows += [f"#   {c.method:<6} {c.path:<48} {c.why}" for c in self.calls]
        rows.append("# roles: ACL path -> privileges (an existing role: pveum role modify, same arguments)")
        rows += [f"#   {path:<40} {role}: {', '.join(privs)}" for role, (path, privs) in self.roles.items()]
        return "\n".join([*rows, *self.commands()])


def role_name(path: str) -> str:
    """Homelab- + the ACL path (/storage/local-zfs -> Homelab-storage-local-zfs); role IDs allow [A-Za-z0-9.-_]."""
    pieces = [re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in path.split("/") if p]
    return "-".join(["Homelab", *pieces]) if pieces else "Homelab-root"


def plan_roles(schema: Permissions, target: Target, tokenid: str,
               calls: tuple[ApiCall, ...] = DEPLOY_CALLS) -> RolePlan:
    # VMs get one ACL on /vms: a blue-green swap creates its new VM under a VMID not known in advance.
    needed = required_privileges(derive_grants(schema, calls), target, ("/vms",))
    roles = {role_name(path): (path, tuple(sorted(privs))) for path, privs in sorted(needed.items())}
    return RolePlan(roles, calls, tokenid)


TOKENID_RE = re.compile(r"[^\s@!=:]+@[A-Za-z][A-Za-z0-9._-]*![A-Za-z][A-Za-z0-9._-]*")


def token_role(section: Mapping[str, Any], tokenid: str) -> RolePlan:
    """The role plan for the site's proxmox section and a token ID (user@realm!name); needs no PVE host."""
    if not TOKENID_RE.fullmatch(tokenid):
        raise ProxmoxError(f"token ID {tokenid!r} is not user@realm!tokenid (e.g. homelab@pve!deploy)")
    user, name = tokenid.split("!", 1)
    target = Target.from_site(section, Token(user, name, ""))
    return plan_roles(load_permissions(), target, tokenid)
