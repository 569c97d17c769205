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

from . import deploy, proxmox
from .definition import load_role
from .deploy import DataVolume, VmInfo, VolumeProblem
from .errors import DeployError, ProxmoxError
from .proxmox import TAG, Pve, Target
from .pve_deploy import ProxmoxProvider
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


def run_preflight(site_path: Path, role: str | None, project: Path, *, insecure: bool = False,
                  env: Mapping[str, str] | None = None,
                  connect: Callable[[Target], Pve] = Pve) -> list[Check]:
    """Load the site and the token, connect, check. Problems with the inputs themselves raise one line.
    `project` holds the roles' definitions (images/<role>.yaml), which name the data volumes."""
    site = load_site(site_path)
    roles = [role] if role else sorted(site.hosts)
    for name in roles:
        site.host(name)
    target = Target.from_site(site.proxmox(), proxmox.token_from_env(env), insecure=insecure)
    return preflight(connect(target), site, roles, project)


def preflight(pve: Pve, site: Site, roles: list[str], project: Path | None = None) -> list[Check]:
    """Every check, in order. Without `project` the data volumes are left out: the deploy (ProxmoxProvider.preflight)
    checks them itself while planning, with the same functions, and reports the first as its own error."""
    # The version call goes first and alone: a refused token or an unreachable host raises here, as one line.
    checks = [check_version(pve.get("/version")), check_tls(pve.target)]
    checks.append(check_node(pve))
    if checks[-1].failed:
        return checks  # the node's storages and network cannot be listed
    checks += check_storages(pve)
    checks.append(check_bridge(pve))
    checks += check_permissions(pve)
    checks += check_vms(pve, site, roles)
    if project is not None:
        checks += check_volumes(pve, site, roles, project)
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


@dataclass(frozen=True)
class Volumes:
    """What every role's volume checks read from PVE, fetched once: the VMs (each role's live VM), the directory
    mappings the token may use, and the provider whose volume_exists lists a disk's storage."""

    provider: ProxmoxProvider
    vms: list[VmInfo]
    mappings: set[str]


def check_volumes(pve: Pve, site: Site, roles: list[str], project: Path) -> list[Check]:
    """Each data volume of each role's definition, one line each, where the next deploy takes it from (the checks
    plan_deploy makes, builder/deploy.py): a first deploy from where hosts.<role>.volumes says, a swap from the
    live VM (a disk's volume ID changes with each move_disk, so after a swap the site's volid is history)."""
    definitions = {role: load_role(project, role)["volumes"] for role in roles}
    provider = ProxmoxProvider(pve, site)
    shares = any(v["kind"] == "share" for volumes in definitions.values() for v in volumes)
    facts = Volumes(provider, provider.vms(), provider.mappings() if shares else set())
    checks = []
    for role, volumes in definitions.items():
        checks += check_role_volumes(facts, role, volumes, site.host(role).volumes)
    return checks


def check_role_volumes(facts: Volumes, role: str, volumes: list[dict[str, Any]],
                       places: Mapping[str, Mapping[str, Any]]) -> list[Check]:
    """One line per definition volume of the role, and one per site entry that is no volume of it."""
    if not volumes and not places:
        return [ok(f"data volumes {role}", f"images/{role}.yaml has none")]
    try:
        live = deploy.live_of(facts.vms, role)
    except DeployError as exc:
        return [Check(f"data volumes {role}", "FAIL", str(exc))]
    checks = []
    for volume, place in zip(volumes, deploy.volume_places(role, volumes, places), strict=True):
        checks.append(check_volume(facts, role, f"data volume {role}/{volume['name']}", place, live))
    for name, problem in deploy.unknown_volumes(role, volumes, places).items():
        checks.append(fail(f"data volume {role}/{name}", problem.detail, problem.fix))
    return checks


def check_volume(facts: Volumes, role: str, name: str, place: DataVolume | VolumeProblem,
                 live: VmInfo | None) -> Check:
    if isinstance(place, VolumeProblem):
        return fail(name, place.detail, place.fix)
    try:
        found = _find_volume(facts, role, place, live)
    except ProxmoxError as exc:
        # A disk on a storage that does not exist, or that the token may not list: this volume's line, not the run's.
        return fail(name, f"{place.volid}: {exc}", f"fix hosts.{role}.volumes.{place.name}.volid or grant the token "
                    "Datastore.Audit on its storage")
    if isinstance(found, VolumeProblem):
        return fail(name, found.detail, found.fix)
    return ok(name, _where(found, live, facts.vms))


def _find_volume(facts: Volumes, role: str, volume: DataVolume, live: VmInfo | None) -> DataVolume | VolumeProblem:
    """The volume as the next deploy will use it, or its problem, checked in plan_deploy's order: a share's
    directory mapping, then the live VM holding the volume (a swap) or a disk on its storage (a first deploy)."""
    if volume.kind == "share":
        problem = deploy.mapping_problem(role, volume, facts.mappings)
        if problem is not None:
            return problem
    if live is not None:
        return deploy.held_by(role, live, volume)
    return deploy.disk_problem(facts.provider, role, volume) or volume


def _where(volume: DataVolume, live: VmInfo | None, vms: list[VmInfo]) -> str:
    if volume.kind == "share":
        what = f"directory mapping {volume.mapping}"
    else:
        assert volume.volid is not None
        what = f"{volume.volid} on storage {volume.volid.split(':', 1)[0]}"
    if live is not None:
        return f"{what}, held by live VM {live.vmid} as {volume.key}"
    return what + (_stranger(volume.volid, vms) if volume.volid else "")


def _stranger(volid: str, vms: list[VmInfo]) -> str:
    """A note when the disk is named after a VM that exists and is not ours: PVE names a volume after the VM that
    owns it, so it may be that VM's disk, which a first deploy would attach to ours as well."""
    match = re.search(r"(?:^|[:/])vm-(\d+)-", volid)
    owner = next((vm for vm in vms if match and vm.vmid == int(match[1])), None)
    if owner is None or TAG in owner.tags:
        return ""
    return f" (named after VM {owner.vmid}, which is not tagged {TAG}: make sure it is not that VM's disk)"


def failed(checks: list[Check]) -> bool:
    return any(c.failed for c in checks)

