"""`homelab preflight`: is the Proxmox VE host ready for a deploy? Read-only: it only ever sends GETs.

Each check is one result (ok, FAIL with the fix, or skip); the CLI prints one line per result and exits non-zero on
any failure, so every problem is seen in one run instead of one per attempt.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import proxmox
from .proxmox import TAG, Pve, Target
from .site import Site, load_site

MIN_VERSION = (8, 4)
# What each storage use must hold: the qcow2 uploads, the VMs' disks, the seed ISOs.
CONTENT = {"import": "import", "images": "images", "iso": "iso"}


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok", "FAIL" or "skip"
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    def line(self) -> str:
        fix = f" -> {self.fix}" if self.fix and self.failed else ""
        return f"{self.status:<4} {self.name}: {self.detail}{fix}"


def ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, "FAIL", detail, fix)


def run_preflight(site_path: Path, role: str | None, *, insecure: bool = False,
                  env: Mapping[str, str] | None = None,
                  connect: Callable[[Target], Pve] = Pve) -> list[Check]:
    """Load the site and the token, connect, check. Problems with the inputs themselves raise one line."""
    site = load_site(site_path)
    roles = [role] if role else sorted(site.hosts)
    for name in roles:
        site.host(name)
    target = Target.from_site(site.proxmox(), proxmox.token_from_env(env), insecure=insecure)
    return preflight(connect(target), site, roles)


def preflight(pve: Pve, site: Site, roles: list[str]) -> list[Check]:
    # The version call goes first and alone: a refused token or an unreachable host raises here, as one line.
    checks = [check_version(pve.get("/version")), check_tls(pve.target)]
    checks.append(check_node(pve))
    if checks[-1].failed:
        return checks  # the node's storages and network cannot be listed
    checks += check_storages(pve)
    checks.append(check_bridge(pve))
    checks += check_permissions(pve)
    checks += check_vms(pve, site, roles)
    checks.append(Check("data volumes", "skip", "not checked yet (they come with the deploy's swap)"))
    return checks


def check_version(version: Mapping[str, Any]) -> Check:
    text = str(version.get("version") or "")
    match = re.match(r"(\d+)\.(\d+)", text)
    if match is None:
        return fail("version", f"PVE answered an unreadable version {text!r}", "check proxmox.url points at PVE")
    found = (int(match[1]), int(match[2]))
    if found < MIN_VERSION:
        return fail("version", f"Proxmox VE {text} is older than 8.4: qcow2 uploads (content import) need 8.4",
                    "upgrade the node (apt update && apt full-upgrade)")
    return ok("version", f"Proxmox VE {text}")


def check_tls(target: Target) -> Check:
    """Reached at all means the certificate passed; an explicit insecure is shown, not failed."""
    if target.tls.insecure:
        return Check("tls", "skip", f"the certificate of {target.url} is NOT checked (insecure)")
    return ok("tls", f"{target.url}: certificate {target.tls.describe()}")


def check_node(pve: Pve) -> Check:
    node = pve.target.node
    nodes = {n.get("node"): n for n in pve.get("/nodes")}
    if node not in nodes:
        known = ", ".join(sorted(str(n) for n in nodes)) or "none visible to this token"
        return fail("node", f"no node {node!r} (nodes: {known})", "set proxmox.node in the site file")
    if nodes[node].get("status") not in (None, "online"):
        return fail("node", f"node {node} is {nodes[node].get('status')}", "bring the node online")
    return ok("node", f"{node} online")


def check_storages(pve: Pve) -> list[Check]:
    node = pve.target.node
    listed = {s.get("storage"): s for s in pve.get(f"/nodes/{node}/storage")}
    checks = []
    for use, storage in pve.target.storages.items():
        name, content = f"storage {use}", CONTENT[use]
        entry = listed.get(storage)
        if entry is None:
            known = ", ".join(sorted(str(s) for s in listed)) or "none visible to this token"
            checks.append(fail(name, f"no storage {storage!r} on {node} (storages: {known})",
                               f"set proxmox.storages.{use} to a storage with content {content}"))
            continue
        has = [c for c in str(entry.get("content") or "").split(",") if c]
        if content not in has:
            checks.append(fail(name, f"{storage} does not hold content {content} (it holds {','.join(has) or 'none'})",
                               f"pvesm set {storage} --content {','.join([*has, content])}"))
        elif not entry.get("enabled", 1) or not entry.get("active", 1):
            checks.append(fail(name, f"{storage} is disabled or inactive", f"pvesm set {storage} --disable 0"))
        else:
            checks.append(ok(name, f"{storage} holds {content}"))
    return checks


def check_bridge(pve: Pve) -> Check:
    node, bridge = pve.target.node, pve.target.bridge
    bridges = {i.get("iface") for i in pve.get(f"/nodes/{node}/network", type="any_bridge")}
    if bridge not in bridges:
        known = ", ".join(sorted(str(b) for b in bridges)) or "none"
        return fail("bridge", f"no bridge {bridge!r} on {node} (bridges: {known})", "set proxmox.bridge")
    return ok("bridge", bridge)


def check_permissions(pve: Pve) -> list[Check]:
    """The token's effective privileges on each ACL path the deploy needs, against the derived role."""
    granted = pve.get("/access/permissions")
    needed = proxmox.required_privileges(proxmox.derive_grants(proxmox.load_permissions()), pve.target, ("/vms",))
    checks = []
    for path, privs in sorted(needed.items()):
        missing = sorted(privs - proxmox.effective(granted, path))
        name = f"privileges {path}"
        if missing:
            checks.append(fail(name, f"the token lacks {', '.join(missing)}",
                               "grant the role `homelab token-role` prints (user and token: privilege separation)"))
        else:
            checks.append(ok(name, ", ".join(sorted(privs))))
    return checks


def _tags(vm: Mapping[str, Any]) -> set[str]:
    return {t for t in re.split(r"[;, ]", str(vm.get("tags") or "")) if t}


def check_vms(pve: Pve, site: Site, roles: list[str]) -> list[Check]:
    """Each role's VMID and name: free, or held by a VM of ours (tagged); a stranger's VM is a failure."""
    vms = [r for r in pve.get("/cluster/resources", type="vm") if r.get("type") in ("qemu", "lxc", None)]
    checks = []
    for role in roles:
        host = site.host(role)
        name = f"vm {role}"
        if host.vmid is None:
            checks.append(fail(name, f"hosts.{role}.vmid is not set", f"set hosts.{role}.vmid in the site file"))
            continue
        by_id = next((vm for vm in vms if int(vm.get("vmid") or -1) == host.vmid), None)
        if by_id is not None and TAG not in _tags(by_id):
            checks.append(fail(name, f"VMID {host.vmid} is taken by {by_id.get('name') or 'a guest'!r} "
                               f"(not tagged {TAG})", f"choose a free hosts.{role}.vmid"))
            continue
        namesakes = [vm for vm in vms if vm.get("name") == host.name and int(vm.get("vmid") or -1) != host.vmid
                     and TAG not in _tags(vm)]
        if namesakes:
            checks.append(fail(name, f"name {host.name!r} is taken by VMID {namesakes[0].get('vmid')} "
                               f"(not tagged {TAG})", f"choose another hosts.{role}.name"))
            continue
        state = "ours, will be replaced" if by_id is not None else "free"
        checks.append(ok(name, f"VMID {host.vmid} ({host.name}): {state}"))
    return checks


def failed(checks: list[Check]) -> bool:
    return any(c.failed for c in checks)

