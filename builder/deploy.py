"""`homelab deploy ROLE [--swap]`: a plan of named steps, executed through a Provider, journaled so a rerun resumes.

plan_deploy only reads (the provider's preflight and lookups, the local build): every bad input fails there, before
anything changes, as one line. execute runs the steps in order; each completed step is written to the role's
journal (build/<role>/deploy-journal.json, atomic writes) with what it did (VMIDs, volume IDs, task UPIDs). A rerun
after a crash (or Ctrl-C) resumes from the first unfinished step: every step checks the state first, so repeating
a step that was cut off half-way is safe.

A swap has two failure regimes:
- before the cutover (upload, create, isolated boot, verification): the green VM is deleted, blue never stopped.
- from the cutover on (blue's stack stopped): the rollback steps run, handing the data volumes back to blue
  (restored from green's snapshot when green ran with them) and starting blue behind a health gate.

Colours, as VM tags: `green` a candidate (created, not yet serving), `live` the VM serving the role,
`blue;rollback` a previous live VM kept stopped for `homelab rollback`, `failed` a green that did not pass.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from .build import built_image, manifest_of, sha256_file
from .cloudinit import Seed, render_seed, write_seed_iso
from .definition import load_role
from .errors import DeployError, HomelabError
from .localvolumes import volume_tags_file
from .settings import Settings
from .site import Site, load_secrets

TAG = "homelab"
JOURNAL = "deploy-journal.json"
STACK_UNIT = "homelab-stack.service"
COMPOSE_DIR = "/opt/homelab/compose"
STACK_ENV = "/run/homelab/stack.env"
ROOT_DISK = "scsi0"
SEED_DRIVE = "ide2"
KEEP_ROLLBACKS = 2

# Seconds. The verification and health deadlines cover a boot under load (cloud-init, the stack's images).
VERIFY_DEADLINE = 600.0
HEALTH_DEADLINE = 600.0
SHUTDOWN_TIMEOUT = 120.0
TASK_TIMEOUT = 600.0
POLL = 5.0

VOLUMES_UNIT = "homelab-volumes.service"
VERIFY_COMMANDS: tuple[tuple[str, ...], ...] = (
    ("cloud-init", "status"),
    ("systemctl", "is-system-running"),
    ("docker", "compose", "--project-directory", COMPOSE_DIR, "--env-file", STACK_ENV, "config", "-q"),
)
FAILED_UNITS = ("systemctl", "list-units", "--failed", "--plain", "--no-legend", "--no-pager")
# A swap's green creates its stack's network and containers (not started) while blue still serves: the cutover's
# `up` then only starts them. Creating them under the downtime cost about 3.5 s of a 26 s stack start (measured
# under TCG); bind mounts are resolved at start, so nothing is made on the unmounted /srv meanwhile.
CREATE_STACK = ("docker", "compose", "--project-directory", COMPOSE_DIR, "--env-file", STACK_ENV, "create")
HEALTH_COMMANDS: tuple[tuple[str, ...], ...] = (
    ("systemctl", "is-active", STACK_UNIT),
    ("docker", "compose", "--project-name", "homelab", "ps", "--format", "json"),
)


@dataclass(frozen=True)
class Endpoint:
    """A service's own HTTP health endpoint (the definition's ports[].health), asked on the VM itself."""

    service: str
    port: int
    path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def command(self) -> tuple[str, ...]:
        # -f: an HTTP status of 400 or more fails; no -L: a redirect is an answer.
        return ("curl", "-fsS", "-o", "/dev/null", "--max-time", "5", self.url)


def health_endpoints(definition_ports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The definition's health endpoints as a plan's step arguments (JSON for the journal)."""
    return [asdict(Endpoint(p["service"], p["port"], p["health"])) for p in definition_ports if p.get("health")]


# --- what a provider is ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestResult:
    exitcode: int
    out: str = ""
    err: str = ""


@dataclass(frozen=True)
class VmInfo:
    vmid: int
    status: str  # running | stopped
    config: Mapping[str, str]

    @property
    def tags(self) -> set[str]:
        return parse_tags(self.config.get("tags", ""))


@dataclass(frozen=True)
class VmSpec:
    """A new VM: created stopped from the uploaded image, the seed ISO as a CD, the agent on."""

    vmid: int
    name: str
    cores: int
    memory_mb: int
    image_volid: str
    seed_volid: str
    bridge: str
    tags: tuple[str, ...]
    link_down: bool
    drives: Mapping[str, str] = field(default_factory=dict)  # data volumes: scsiN -> volid, virtiofsN -> mapping
    mac: str | None = None  # the bridge NIC's MAC (a swap's green gets blue's); None: the platform chooses


class Provider(Protocol):
    """What the deploy needs from a platform. ProxmoxProvider implements it on the PVE API; a local QEMU provider
    can implement the same steps. Every changing method is idempotent where the platform allows it."""

    def now(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...
    def preflight(self, role: str) -> list[str]: ...  # failure lines; empty = ready
    def vm(self, vmid: int) -> VmInfo | None: ...
    def vms(self) -> list[VmInfo]: ...
    def volume_exists(self, volid: str) -> bool: ...
    def owned_volumes(self, vmid: int) -> list[str]: ...
    def mappings(self) -> set[str]: ...  # the directory mappings shares can use
    def upload_image(self, path: Path, sha256: str) -> dict[str, Any]: ...
    def upload_seed(self, path: Path, sha256: str) -> dict[str, Any]: ...
    def create_vm(self, spec: VmSpec) -> dict[str, Any]: ...
    def start(self, vmid: int) -> dict[str, Any]: ...
    def stop(self, vmid: int) -> dict[str, Any]: ...
    def shutdown(self, vmid: int, timeout: float) -> dict[str, Any]: ...
    def agent_ping(self, vmid: int) -> None: ...
    def agent_exec(self, vmid: int, argv: tuple[str, ...], timeout: float) -> GuestResult: ...
    def snapshot_volumes(self, vmid: int, name: str) -> dict[str, Any]: ...
    def rollback_snapshot(self, vmid: int, name: str) -> dict[str, Any]: ...
    def delete_snapshot(self, vmid: int, name: str) -> dict[str, Any]: ...
    def snapshots(self, vmid: int) -> list[str]: ...
    def move_disk(self, vmid: int, key: str, target: int) -> dict[str, Any]: ...
    def attach_share(self, vmid: int, key: str, mapping: str) -> dict[str, Any]: ...
    def detach(self, vmid: int, key: str) -> dict[str, Any]: ...
    def set_link(self, vmid: int, up: bool, mac: str | None = None) -> dict[str, Any]: ...
    def set_tags(self, vmid: int, tags: tuple[str, ...]) -> dict[str, Any]: ...
    def destroy_vm(self, vmid: int) -> dict[str, Any]: ...
    def health_gate(self, vmid: int, deadline: float, endpoints: tuple[Endpoint, ...] = ()) -> dict[str, Any]: ...
    # The role's testinfra suite against a VM (`expect`: role, hostname, address, user, the image's manifest path).
    def run_suite(self, vmid: int, expect: dict[str, Any]) -> dict[str, Any]: ...
    # Why the suite could not log in to the VM now serving on `expect`'s address (None: it could).
    def ssh_problem(self, vmid: int, expect: dict[str, Any]) -> str | None: ...


# --- tags and NICs -----------------------------------------------------------------------------------------------

# pve-tag: PVE::JSONSchema's tag format (case-insensitive); tags are stored lowercase here.
TAG_RE = re.compile(r"[a-z0-9_][a-z0-9_\-+.]*")


def parse_tags(text: str) -> set[str]:
    return {t for t in re.split(r"[;, ]", text or "") if t}


def check_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise DeployError(f"{tag!r} is not a valid Proxmox VE tag ([a-z0-9_][a-z0-9_-+.]*)")
    return tag


def vm_tags(role: str, colour: tuple[str, ...], version: str, deploy_id: str) -> tuple[str, ...]:
    return tuple(check_tag(t) for t in (TAG, f"role-{role}", *colour, f"v-{version}", f"d-{deploy_id}"))


def recolour(tags: set[str], colour: tuple[str, ...]) -> tuple[str, ...]:
    """The same VM's tags with its colour replaced (homelab, role-, v-, d- kept)."""
    kept = sorted(t for t in tags if t == TAG or t.startswith(("role-", "v-", "d-")))
    return tuple([TAG, *[t for t in kept if t != TAG], *colour])


def tag_value(tags: set[str], prefix: str) -> str | None:
    return next((t[len(prefix):] for t in sorted(tags) if t.startswith(prefix)), None)


def parse_net(value: str) -> tuple[str, str | None, dict[str, str]]:
    """(model, MAC, other options) of a netN value like `virtio=BC:24:11:00:00:01,bridge=vmbr0,link_down=1`."""
    model, mac, options = "virtio", None, {}
    for i, part in enumerate(p for p in value.split(",") if p):
        key, sep, text = part.partition("=")
        if i == 0 and key not in ("bridge", "link_down", "macaddr", "firewall", "tag", "model"):
            model, mac = key, (text or None)
        elif key == "macaddr":
            mac = text
        elif key == "model":
            model = text
        elif sep:
            options[key] = text
    return model, mac, options


def render_net(model: str, mac: str | None, options: Mapping[str, str]) -> str:
    head = f"{model}={mac}" if mac else model
    return ",".join([head, *(f"{k}={v}" for k, v in sorted(options.items()))])


# --- the plan ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataVolume:
    """One data volume of the role: where it sits on the VM (`key`), and what it is."""

    name: str
    kind: str  # disk | share
    key: str  # scsiN (disk) or virtiofsN (share), the same on every VM of the role
    mount: str
    read_only: bool
    volid: str | None = None  # disk: the volume ID where the plan found it
    mapping: str | None = None  # share: the directory mapping ID


@dataclass(frozen=True)
class Step:
    name: str
    action: str
    args: dict[str, Any]
    what: str


@dataclass(frozen=True)
class DeployPlan:
    role: str
    kind: str  # first | swap | rollback
    deploy_id: str
    version: str
    image: str  # the qcow2's path ("" for a rollback)
    image_sha256: str
    seed: str  # the seed ISO's path ("" for a rollback)
    seed_sha256: str
    vmid: int  # the VM this deploy makes live
    blue: int | None  # the VM serving now (swap and rollback)
    volumes: tuple[DataVolume, ...]
    steps: tuple[Step, ...]
    cleanup: tuple[Step, ...] = ()  # before the cutover: undo without touching blue
    rollback: tuple[Step, ...] = ()  # from the cutover on: hand everything back to blue
    cutover: str = ""  # the first step after which failures roll back

    def describe(self) -> str:
        head = {"first": "first deploy", "swap": "blue-green swap", "rollback": "rollback"}[self.kind]
        rows = [f"deploy {self.deploy_id} of {self.role}: {head}, version {self.version}, VM {self.vmid}"
                + (f" replacing VM {self.blue}" if self.blue is not None else "")]
        for volume in self.volumes:
            where = volume.volid if volume.kind == "disk" else f"mapping {volume.mapping}"
            rows.append(f"  volume {volume.name}: {volume.kind} {volume.key} = {where} -> {volume.mount}"
                        + (" (read-only)" if volume.read_only else ""))
        rows.append("steps:")
        for i, step in enumerate(self.steps, 1):
            marker = "  -- cutover: a failure from here on rolls back to blue" if step.name == self.cutover else ""
            if marker:
                rows.append(marker)
            rows.append(f"  {i:2}. {step.name:<22} {step.what}")
        if self.cleanup:
            rows.append("on a failure before the cutover (blue untouched):")
            rows += [f"      {s.name:<22} {s.what}" for s in self.cleanup]
        if self.rollback:
            rows.append("on a failure from the cutover on (automatic rollback):")
            rows += [f"      {s.name:<22} {s.what}" for s in self.rollback]
        return "\n".join(rows)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeployPlan:
        values = dict(data)
        values["volumes"] = tuple(DataVolume(**v) for v in data["volumes"])
        for key in ("steps", "cleanup", "rollback"):
            values[key] = tuple(Step(**s) for s in data[key])
        return cls(**values)


@dataclass(frozen=True)
class VolumeProblem:
    """Why a data volume is not where the deploy will take it from, and the fix. plan_deploy raises the first one
    as a line; `homelab preflight` (builder/preflight.py) prints one line for each volume."""

    detail: str
    fix: str

    def __str__(self) -> str:
        return f"{self.detail}: {self.fix}"


def _site_key(kind: str) -> str:
    """What the site file gives for a volume of this kind: a disk's volume ID, a share's directory mapping."""
    return "volid" if kind == "disk" else "mapping"


def _place_problem(role: str, name: str, kind: str, missing: bool) -> VolumeProblem:
    given = _site_key(kind)
    detail = (f"hosts.{role}.volumes.{name} is missing (the {kind} volume {name} of images/{role}.yaml needs "
              f"{given})" if missing else f"hosts.{role}.volumes.{name}: {name} is a {kind}: give {given}")
    what = ("the disk's volume ID (e.g. local-zfs:vm-101-disk-1)" if kind == "disk"
            else "the ID of its directory mapping (Datacenter > Directory Mappings)")
    return VolumeProblem(detail, f"set hosts.{role}.volumes.{name}.{given} in the site file to {what}")


def volume_places(role: str, definition_volumes: list[dict[str, Any]],
                  facts: Mapping[str, Mapping[str, Any]]) -> list[DataVolume | VolumeProblem]:
    """Each volume of the image definition with its key (disks scsi1.., shares virtiofs0.., in definition order)
    and its place from the site's hosts.<role>.volumes (`facts`), or what the site file lacks for it."""
    out: list[DataVolume | VolumeProblem] = []
    disks = shares = 0
    for volume in definition_volumes:
        name, kind = volume["name"], volume["kind"]
        # The key follows from the definition alone, so a volume keeps it whatever the site file says of the others.
        if kind == "disk":
            disks += 1
            key = f"scsi{disks}"
        else:
            key = f"virtiofs{shares}"
            shares += 1
        place = facts.get(name)
        given = (place or {}).get(_site_key(kind))
        if not given:
            out.append(_place_problem(role, name, kind, missing=place is None))
            continue
        out.append(DataVolume(name, kind, key, volume["mount"], volume["read_only"],
                              volid=given if kind == "disk" else None, mapping=given if kind == "share" else None))
    return out


def unknown_volumes(role: str, definition_volumes: list[dict[str, Any]],
                    facts: Mapping[str, Mapping[str, Any]]) -> dict[str, VolumeProblem]:
    """The site's hosts.<role>.volumes entries that are no volume of the image definition (a typo, a stale entry)."""
    known = {v["name"] for v in definition_volumes}
    return {name: VolumeProblem(f"hosts.{role}.volumes.{name} is not a volume of images/{role}.yaml",
                                f"remove it from the site file or add the volume to images/{role}.yaml")
            for name in sorted(set(facts) - known)}


def volume_keys(role: str, definition_volumes: list[dict[str, Any]], site: Site) -> list[DataVolume]:
    """The data volumes of volume_places; a volume without its place (or a place without its volume) is a bad
    input, the first one raised."""
    facts = site.host(role).volumes
    places = volume_places(role, definition_volumes, facts)
    problems = [p for p in places if isinstance(p, VolumeProblem)]
    problems += unknown_volumes(role, definition_volumes, facts).values()
    if problems:
        raise DeployError(f"site file {site.path}: {problems[0].detail}")
    return [p for p in places if isinstance(p, DataVolume)]


def mapping_problem(role: str, volume: DataVolume, mappings: set[str]) -> VolumeProblem | None:
    """A share whose directory mapping is not among `mappings` (GET /cluster/mapping/dir lists only those the token
    may use)."""
    if volume.mapping in mappings:
        return None
    return VolumeProblem(f"directory mapping {volume.mapping} does not exist (or the token may not use it)",
                         "add it under Datacenter > Directory Mappings, or fix "
                         f"hosts.{role}.volumes.{volume.name}.mapping")


def disk_problem(provider: Provider, role: str, volume: DataVolume) -> VolumeProblem | None:
    """A disk whose volume ID its storage does not list: where a first deploy attaches it from."""
    if volume.kind != "disk" or not volume.volid or provider.volume_exists(volume.volid):
        return None
    return VolumeProblem(f"{volume.volid} does not exist (hosts.{role}.volumes.{volume.name}.volid)",
                         "create it (zfs create -V) or fix the site file")


def held_by(role: str, vm: VmInfo, volume: DataVolume) -> DataVolume | VolumeProblem:
    """The volume as `vm` (the live VM, which a swap takes it from) holds it now: a disk's volume ID changes with
    each move_disk, so the site's volid only says where a first deploy finds it."""
    value = vm.config.get(volume.key)
    if value is None:
        what = "the disk" if volume.kind == "disk" else f"virtiofs {volume.mapping}"
        return VolumeProblem(f"VM {vm.vmid} (live) has no {volume.key}", f"attach it ({what}) or fix the site file")
    first = value.split(",")[0]
    if volume.kind == "disk":
        return replace(volume, volid=first)
    mapping = first.removeprefix("dirid=")
    if mapping != volume.mapping:
        return VolumeProblem(f"VM {vm.vmid} shares {mapping} as {volume.key}, the site says {volume.mapping}",
                             f"fix hosts.{role}.volumes.{volume.name}.mapping or VM {vm.vmid}'s {volume.key}")
    return volume


def _raise_for(volume: DataVolume, problem: VolumeProblem | None) -> None:
    if problem is not None:
        raise DeployError(f"data volume {volume.name}: {problem}")


def _of_role(vm: VmInfo, role: str) -> bool:
    return TAG in vm.tags and f"role-{role}" in vm.tags


def role_vms(provider: Provider, role: str) -> list[VmInfo]:
    return [vm for vm in provider.vms() if _of_role(vm, role)]


def live_vm(provider: Provider, role: str) -> VmInfo | None:
    return live_of(provider.vms(), role)


def live_of(vms: list[VmInfo], role: str) -> VmInfo | None:
    """The VM serving the role among `vms` (preflight lists the VMs once for every role)."""
    live = [vm for vm in vms if _of_role(vm, role) and "live" in vm.tags]
    if len(live) > 1:
        raise DeployError(f"VMs {', '.join(str(v.vmid) for v in live)} are all tagged live for {role}: untag all "
                          "but the one serving")
    return live[0] if live else None


def free_vmid(provider: Provider, site: Site, base: int) -> int:
    """The first VMID above the role's own that neither PVE nor the site's other roles use."""
    taken = {vm.vmid for vm in provider.vms()} | {h.vmid for h in site.hosts.values() if h.vmid is not None}
    vmid = base + 1
    while vmid in taken:
        vmid += 1
    return vmid


def new_deploy_id() -> str:
    """UTC time to the microsecond, fixed width: IDs (and the VMs' d- tags) sort by age."""
    now = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f"-{int(now * 1e6) % 1000000:06d}"


def seed_iso(settings: Settings, role: str, seed: Seed) -> tuple[Path, str]:
    """The seed ISO in build/<role>/, named by its content (so an unchanged seed is not uploaded again)."""
    digest = hashlib.sha256((seed.user_data + seed.meta_data + seed.network_config).encode()).hexdigest()[:12]
    path = settings.role_dir(role) / f"seed-{role}-{digest}.iso"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_seed_iso(seed, path)
    return path, sha256_file(path)


def plan_deploy(settings: Settings, site: Site, role: str, image: Path | None, swap: bool, *,
                provider: Provider, secrets_path: Path | None = None, seed: Seed | None = None,
                keep: int = KEEP_ROLLBACKS) -> DeployPlan:
    """Read-only: the steps of a first deploy or a swap, with the VMIDs and volume IDs each will touch."""
    host = site.deploy_host(role)
    assert host.vmid is not None
    definition = load_role(settings.project, role)
    qcow2, manifest = built_image(settings, role, image, DeployError)
    volumes = volume_keys(role, definition["volumes"], site)
    failures = provider.preflight(role)
    if failures:
        raise DeployError("preflight failed: " + "; ".join(failures))
    shares = [v for v in volumes if v.kind == "share"]
    known = provider.mappings() if shares else set()
    for volume in shares:
        _raise_for(volume, mapping_problem(role, volume, known))
    live = live_vm(provider, role)
    if swap:
        if live is None:
            raise DeployError(f"no VM of {role} is tagged live: deploy without --swap first")
        blue: int | None = live.vmid
        volumes = _volumes_on(role, live, volumes)
        vmid = free_vmid(provider, site, host.vmid)
    else:
        if live is not None:
            raise DeployError(f"VM {live.vmid} already serves {role}: use --swap to replace it")
        existing = provider.vm(host.vmid)
        if existing is not None:
            owner = "ours (a deploy that did not finish?)" if TAG in existing.tags else f"not tagged {TAG}"
            raise DeployError(f"VMID {host.vmid} (hosts.{role}.vmid) is taken by a VM {owner}: remove it or choose "
                              "another VMID")
        for volume in volumes:
            _raise_for(volume, disk_problem(provider, role, volume))
        blue, vmid = None, host.vmid
    if seed is None:
        # A share's virtiofs tag on Proxmox VE is its mapping ID: the guest reads them from volume-tags.json.
        tags_file = volume_tags_file(host.volumes)
        seed = render_seed(settings.project, role, site, load_secrets(secrets_path),
                           extra_files=[tags_file] if tags_file else [])
    seed_path, seed_sha = seed_iso(settings, role, seed)
    deploy_id = new_deploy_id()
    version = str(manifest["version"])
    vm = definition["vm"]
    tags = vm_tags(role, ("green",), version, deploy_id)
    endpoints = health_endpoints(definition["ports"])
    # What the role's testinfra suite expects of the new VM (run at the end of its health gate).
    expect = {"role": role, "hostname": host.hostname, "address": host.address, "user": site.admin_user,
              "manifest": str(manifest_of(qcow2))}
    if blue is not None:
        # Found out now rather than after the cutover (an outage, then a rollback): the suite logs in like this.
        problem = provider.ssh_problem(blue, expect)
        if problem:
            raise DeployError(f"the health gate runs the testinfra suite over ssh as {site.admin_user} on "
                              f"{host.address.split('/')[0]}, and this machine cannot log in to VM {blue} (live) "
                              f"there: {problem}")
    # A swap's green: blue's MAC with its link down (the link is the production identity: toggled at the cutover,
    # no reconfiguration, no ARP wait), the shares attached from the start (virtiofs cannot be hot-plugged on
    # PVE 8.4; the guest mounts nothing while its link is down), the disks hot-plugged at the cutover.
    drives = {v.key: (v.volid if v.kind == "disk" else v.mapping) for v in volumes
              if not swap or v.kind == "share"}
    spec = {"vmid": vmid, "name": host.name, "cores": vm["cores"], "memory_mb": vm["memory_mb"],
            "bridge": site.proxmox()["bridge"], "tags": list(tags), "link_down": swap, "drives": drives,
            "mac": parse_net(live.config.get("net0", ""))[1] if swap and live is not None else None}
    steps = [
        Step("preflight", "noop", {"checks": "passed"}, "read-only checks of the host (passed while planning)"),
        Step("upload-image", "upload_image", {"path": str(qcow2), "sha256": manifest["sha256"]},
             f"upload {qcow2.name} (content import, sha256 checked; skipped when there)"),
        Step("upload-seed", "upload_seed", {"path": str(seed_path), "sha256": seed_sha},
             f"upload {seed_path.name} (content iso)"),
        Step("create", "create_vm", spec, f"create VM {vmid} stopped from the image, tags {';'.join(tags)}"
             + (", blue's MAC with the link down, the shares attached (not mounted), no disk" if swap
                else ", data volumes attached")),
    ]
    if not swap:
        steps += [
            Step("start", "start", {"vmid": vmid}, f"start VM {vmid}"),
            Step("health-gate", "health_gate", {"vmid": vmid, "deadline": HEALTH_DEADLINE, "mark": "healthy",
                                                "endpoints": endpoints},
                 f"agent ping, {STACK_UNIT} active, compose services healthy{_asked(endpoints)} (deadline "
                 f"{HEALTH_DEADLINE:.0f} s)"),
            _suite_step(vmid, expect),
            Step("tag-live", "set_tags", {"vmid": vmid, "colour": ["live"]}, f"tag VM {vmid} live"),
        ]
        return DeployPlan(role, "first", deploy_id, version, str(qcow2), manifest["sha256"], str(seed_path),
                          seed_sha, vmid, None, tuple(volumes), tuple(steps))
    assert blue is not None
    steps += [
        Step("boot-isolated", "start", {"vmid": vmid}, f"start VM {vmid} with its NIC link down (isolated)"),
        Step("verify", "verify", {"vmid": vmid, "deadline": VERIFY_DEADLINE, "isolated": True},
             f"through the agent: cloud-init done, system running, compose config valid, {VOLUMES_UNIT} not "
             "active (nothing mounted while isolated); VM stays running"),
        Step("create-stack", "create_stack", {"vmid": vmid},
             f"agent exec on VM {vmid}: docker compose create (the network and containers, not started, made while "
             "blue serves: the cutover only starts them)"),
    ]
    cleanup = (
        Step("stop-green", "stop", {"vmid": vmid}, f"stop VM {vmid}"),
        *[Step(f"detach-{v.name}", "detach", {"vmid": vmid, "key": v.key},
               f"detach share {v.mapping} ({v.key}) from VM {vmid} (never mounted there)")
          for v in volumes if v.kind == "share"],
        Step("destroy-green", "destroy_checked", {"vmid": vmid}, f"delete VM {vmid} (it never held data)"),
    )
    cut = _cutover(role, deploy_id, blue, vmid, volumes, keep, green_running=True, endpoints=endpoints,
                   expect=expect)
    return DeployPlan(role, "swap", deploy_id, version, str(qcow2), manifest["sha256"], str(seed_path), seed_sha,
                      vmid, blue, tuple(volumes), tuple(steps + cut[0]), cleanup, cut[1], cut[0][0].name)


def _cutover(role: str, deploy_id: str, blue: int, green: int, volumes: list[DataVolume], keep: int, *,
             green_running: bool = False, endpoints: list[dict[str, Any]] | None = None,
             expect: dict[str, Any] | None = None) -> tuple[list[Step], tuple[Step, ...]]:
    """The cutover from blue to green and its rollback (shared by swap and `homelab rollback`).

    green_running (a swap): green was booted and verified while blue served, and keeps running: its disks are
    hot-plugged (move_disk to a running VM), its shares were attached at its creation, and the downtime is blue's
    stop plus green's stack start, never a boot. Otherwise (`homelab rollback`: the previous VM is stopped) the
    volumes move between stopped VMs and green boots with them. `endpoints` are asked of green only, and the
    testinfra suite (`expect`) runs against green only: they are the current definition's and suite, and a VM of
    an older image (blue, or the target of `homelab rollback`) may not have them."""
    disks = [v for v in volumes if v.kind == "disk"]
    snap = f"homelab-{deploy_id}"
    steps = [
        Step("stop-blue-stack", "stop_stack", {"vmid": blue, "mark": "blue_stopped"},
             f"agent exec on VM {blue}: systemctl stop {STACK_UNIT} (downtime starts)"),
        Step("shutdown-blue", "shutdown", {"vmid": blue}, f"shut VM {blue} down (then stop after "
             f"{SHUTDOWN_TIMEOUT:.0f} s)"),
    ]
    for v in volumes:
        if v.kind == "disk":
            how = " (hot-plugged into the running VM)" if green_running else ""
            steps.append(Step(f"hand-{v.name}", "hand_over", {"volume": asdict(v), "source": blue, "target": green},
                              f"move_disk {v.key} of VM {blue} to VM {green} ({v.volid}){how}"))
        elif green_running:
            steps.append(Step(f"release-{v.name}", "release_share", {"volume": asdict(v), "source": blue,
                                                                     "target": green},
                              f"virtiofs {v.mapping}: detach {v.key} from VM {blue} (VM {green} has it, unmounted)"))
        else:
            steps.append(Step(f"hand-{v.name}", "hand_over", {"volume": asdict(v), "source": blue, "target": green},
                              f"virtiofs {v.mapping}: detach {v.key} from VM {blue}, attach to VM {green}"))
    if disks:
        state = "running, the disks not mounted" if green_running else "stopped"
        steps.append(Step("snapshot-data", "snapshot", {"vmid": green, "name": snap},
                          f"snapshot {snap} of VM {green} ({state}; holding {', '.join(v.name for v in disks)})"))
    steps.append(Step("identity", "identity", {"from": blue, "to": green},
                      f"VM {green} takes the production identity: its link up with blue's MAC; VM {blue}'s down"))
    if not green_running:
        steps.append(Step("start-green", "start", {"vmid": green, "mark": "green_started"},
                          f"start VM {green} with its data"))
    steps += [
        # Hot: green has run with the data from the moment its stack (and so its volumes unit) starts.
        Step("start-stack", "start_stack", {"vmid": green, "deadline": HEALTH_DEADLINE,
                                            **({"mark": "green_started"} if green_running else {})},
             f"agent exec on VM {green}: systemctl start {STACK_UNIT} (mounts the volumes, starts the containers)"),
        Step("health-gate", "health_gate", {"vmid": green, "deadline": HEALTH_DEADLINE, "mark": "healthy",
                                            "endpoints": endpoints or []},
             f"{STACK_UNIT} active, compose services healthy{_asked(endpoints or [])} (deadline "
             f"{HEALTH_DEADLINE:.0f} s; downtime ends)"),
    ]
    if expect is not None:  # green serves from here; a failure still rolls back, with the data snapshot kept
        steps.append(_suite_step(green, expect))
    if disks:
        steps.append(Step("drop-snapshot", "drop_snapshot", {"vmid": green, "name": snap},
                          f"delete snapshot {snap} (move_disk refuses disks a snapshot references)"))
    steps += [
        Step("tag-live", "set_tags", {"vmid": green, "colour": ["live"]}, f"tag VM {green} live"),
        Step("tag-blue", "set_tags", {"vmid": blue, "colour": ["blue", "rollback"]},
             f"tag VM {blue} blue;rollback (kept stopped)"),
        Step("prune", "prune", {"role": role, "keep": keep, "spare": [green, blue]},
             f"delete all but the newest {keep} rollback VMs (never one holding a data volume)"),
    ]
    rollback = [
        Step("stop-green", "stop", {"vmid": green}, f"stop VM {green}"),
    ]
    if disks:
        rollback += [
            Step("restore-snapshot", "restore_snapshot", {"vmid": green, "name": snap},
                 f"if VM {green} ran with the data: roll back to {snap}"),
            Step("drop-snapshot", "drop_snapshot", {"vmid": green, "name": snap}, f"delete snapshot {snap}"),
        ]
    rollback += [Step(f"hand-back-{v.name}", "hand_over", {"volume": asdict(v), "source": green, "target": blue},
                      f"{v.name} back to VM {blue}") for v in volumes]
    rollback += [
        Step("identity-back", "identity", {"from": green, "to": blue}, f"VM {blue}'s link up, VM {green}'s down"),
        Step("start-blue", "start", {"vmid": blue}, f"start VM {blue}"),
        Step("start-blue-stack", "start_stack", {"vmid": blue, "deadline": HEALTH_DEADLINE, "retry_failed": True},
             f"systemctl start {STACK_UNIT} on VM {blue} (retried until the deadline: nowhere else to go)"),
        Step("blue-health-gate", "health_gate", {"vmid": blue, "deadline": HEALTH_DEADLINE, "mark": "healthy"},
             f"VM {blue} healthy again (downtime ends)"),
        Step("tag-failed", "set_tags", {"vmid": green, "colour": ["failed"]}, f"tag VM {green} failed (stopped)"),
    ]
    return steps, tuple(rollback)


def _suite_step(vmid: int, expect: dict[str, Any]) -> Step:
    return Step("testinfra", "run_suite", {"vmid": vmid, "expect": expect, "mark": "suite_passed"},
                f"the {expect['role']} testinfra suite (tests/infra) against VM {vmid}, over ssh as {expect['user']}")


def _asked(endpoints: list[dict[str, Any]]) -> str:
    return (", then " + ", ".join(f"{e['service']} :{e['port']}{e['path']}" for e in endpoints) + " answer"
            if endpoints else "")


def _volumes_on(role: str, vm: VmInfo, volumes: list[DataVolume]) -> list[DataVolume]:
    """The volumes as blue holds them now (held_by), the first one it does not hold raised."""
    out = []
    for volume in volumes:
        held = held_by(role, vm, volume)
        if isinstance(held, VolumeProblem):
            _raise_for(volume, held)
        else:
            out.append(held)
    return out


def plan_rollback(settings: Settings, site: Site, role: str, *, provider: Provider) -> DeployPlan:
    """`homelab rollback ROLE`: the newest `blue;rollback` VM takes the data back from the live one."""
    live = live_vm(provider, role)
    if live is None:
        raise DeployError(f"no VM of {role} is tagged live: nothing to roll back from")
    candidates = [vm for vm in role_vms(provider, role) if "rollback" in vm.tags and vm.vmid != live.vmid]
    if not candidates:
        raise DeployError(f"no previous VM of {role} is kept (tagged rollback)")
    previous = max(candidates, key=lambda vm: tag_value(vm.tags, "d-") or "")
    volumes = _volumes_on(role, live, volume_keys(role, load_role(settings.project, role)["volumes"], site))
    deploy_id = new_deploy_id()
    version = tag_value(previous.tags, "v-") or "unknown"
    steps, rollback = _cutover(role, deploy_id, live.vmid, previous.vmid, volumes, KEEP_ROLLBACKS)
    steps = [s for s in steps if s.name != "prune"]
    return DeployPlan(role, "rollback", deploy_id, version, "", "", "", "", previous.vmid, live.vmid,
                      tuple(volumes), tuple(steps), (), rollback, steps[0].name)


# --- the journal ---------------------------------------------------------------------------------------------------


class Journal:
    """build/<role>/deploy-journal.json: every deploy of the role, its steps' results, the active VM."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"deploys": [], "active": None}
        self._load()

    def _load(self) -> None:
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except ValueError as exc:
                raise DeployError(f"{self.path}: not a readable journal ({exc}): move it away to start afresh"
                                  ) from None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """One deploy of a role at a time: an flock held while steps run (the kernel drops it if the process dies),
        then the journal read again, so nothing another run wrote before is overwritten."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "a process"
                raise DeployError(f"{holder} is deploying with {self.path} now: wait for it to end (or stop it; "
                                  "a rerun resumes)") from None
            handle.truncate(0)
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            self._load()
            yield

    @classmethod
    def for_role(cls, settings: Settings, role: str) -> Journal:
        return cls(settings.role_dir(role) / JOURNAL)

    def save(self) -> None:
        """Atomically: a crash leaves the old journal or the new one, never half of one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".journal-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.data, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @property
    def deploys(self) -> list[dict[str, Any]]:
        deploys: list[dict[str, Any]] = self.data["deploys"]
        return deploys

    def unfinished(self) -> dict[str, Any] | None:
        return next((d for d in reversed(self.deploys) if d.get("outcome") is None), None)

    def record(self, plan: DeployPlan) -> dict[str, Any]:
        for entry in self.deploys:
            if entry["id"] == plan.deploy_id:
                return entry
        entry = {"id": plan.deploy_id, "kind": plan.kind, "version": plan.version, "vmid": plan.vmid,
                 "blue": plan.blue, "plan": plan.to_json(), "phase": "forward", "done": {}, "outcome": None,
                 "error": None, "marks": {}, "downtime_s": None, "started": time.time(), "finished": None}
        self.deploys.append(entry)
        self.save()
        return entry


# --- execution -------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    deploy_id: str
    outcome: str  # live | cleaned | rolled-back
    vmid: int
    downtime_s: float | None
    error: str | None = None


def execute(plan: DeployPlan, provider: Provider, journal: Journal,
            on_step: Callable[[str], None] | None = None) -> Outcome:
    """Run (or resume) the plan; a failure before the cutover cleans up, after it rolls back; then DeployError.

    A KeyboardInterrupt (or a killed process) stops right there: the journal says where, a rerun resumes.
    """
    with journal.exclusive():
        _still_current(journal, plan, provider)
        runner = _Runner(plan, provider, journal, journal.record(plan), on_step or (lambda line: None))
        return runner.run()


def _still_current(journal: Journal, plan: DeployPlan, provider: Provider) -> None:
    """Planning ran before the lock was taken: under it, refuse a plan another run overtook meanwhile (it left a
    deploy unfinished, or it changed which VM is tagged live, which is what planning chose blue by)."""
    pending = journal.unfinished()
    if pending is not None:
        if pending["id"] != plan.deploy_id:
            raise DeployError(f"deploy {pending['id']} of {plan.role} was left unfinished while this one was "
                              "planned: rerun to resume it, or add --abandon to undo it")
        return  # resuming this plan
    if any(entry["id"] == plan.deploy_id for entry in journal.deploys):
        return
    serving = live_vm(provider, plan.role)
    live = serving.vmid if serving is not None else None
    if live != plan.blue:
        def name(vmid: int | None) -> str:
            return f"VM {vmid}" if vmid is not None else "none"
        raise DeployError(f"the live VM of {plan.role} changed while this deploy was planned (planned against "
                          f"{name(plan.blue)}, now {name(live)}): run it again")


def abandon(journal: Journal, role: str, provider: Provider,
            on_step: Callable[[str], None] | None = None) -> tuple[Outcome, str]:
    """`--abandon`: undo the role's unfinished deploy instead of resuming it (its cleanup or its rollback, as a
    failure at that point would have run). Refused for a first deploy and for a green that already serves."""
    with journal.exclusive():
        plan = unfinished_plan(journal, role)
        runner = _Runner(plan, provider, journal, journal.record(plan), on_step or (lambda line: None))
        return runner.abandon()


def unfinished_plan(journal: Journal, role: str) -> DeployPlan:
    pending = journal.unfinished()
    if pending is None:
        raise DeployError(f"no deploy of {role} is unfinished ({journal.path}): nothing to abandon")
    return DeployPlan.from_json(pending["plan"])


def abandon_steps(journal: Journal, role: str) -> list[str]:
    """What --abandon would still do, for --dry-run (refusals raised as --abandon raises them)."""
    plan = unfinished_plan(journal, role)
    entry = journal.record(plan)
    return _still_to_do(plan, entry, abandon_phase(plan, entry))


def _green_serves(plan: DeployPlan, entry: Mapping[str, Any], current: str | None) -> bool:
    """Green passed its whole health gate (it serves): what is left (snapshot, tags, pruning) is finished, never
    undone. The gate ends with the testinfra suite where the plan runs it (plans journaled before it did not)."""
    names = [s.name for s in plan.steps]
    end = next((name for name in ("testinfra", "health-gate") if name in names), None)
    if end is None:
        return False
    past = current in names and names.index(current) > names.index(end)
    # The gate marks its end a save before it is journaled done: a kill in between still has green serving.
    mark = "suite_passed" if end == "testinfra" else "healthy"
    return past or end in entry.get("done", {}) or mark in entry.get("marks", {})


def _no_recovery(plan: DeployPlan, entry: Mapping[str, Any], current: str | None) -> str:
    if plan.kind == "first":
        return (f"a first deploy has no previous VM to go back to, and VM {plan.vmid} holds the data volumes "
                "(deleting it would delete them)")
    return f"VM {plan.vmid} passed its health gate and serves (`homelab rollback` goes back once it is finished)"


def recovery_phase(plan: DeployPlan, entry: Mapping[str, Any], current: str | None) -> str | None:
    """How a swap (or rollback) in its forward phase goes back, stopped at `current`: "cleanup" before the cutover
    (blue untouched), "rollback" once it began; None for a first deploy or a green that already serves."""
    if plan.kind == "first" or not (plan.cleanup or plan.rollback) or _green_serves(plan, entry, current):
        return None
    names = [s.name for s in plan.steps]
    cut = names.index(plan.cutover)
    started = any(name in entry.get("done", {}) for name in names[cut:]) or (current in names[cut:])
    return "rollback" if started else "cleanup"


def abandon_phase(plan: DeployPlan, entry: Mapping[str, Any]) -> str:
    """The phase --abandon runs: the recovery already under way, else the one a failure now would start."""
    if entry["phase"] != "forward":
        return str(entry["phase"])
    current = entry.get("current_done")
    phase = recovery_phase(plan, entry, current)
    if phase is None:
        raise DeployError(f"deploy {plan.deploy_id} cannot be abandoned: {_no_recovery(plan, entry, current)}")
    return phase


class _Runner:
    def __init__(self, plan: DeployPlan, provider: Provider, journal: Journal, entry: dict[str, Any],
                 say: Callable[[str], None]) -> None:
        self.plan, self.provider, self.journal, self.entry, self.say = plan, provider, journal, entry, say

    def run(self) -> Outcome:
        if self.entry["phase"] == "forward":
            try:
                self._steps(self.plan.steps, "done")
            except HomelabError as exc:
                failed = self._failed_step()
                self.entry["error"] = f"{failed}: {exc}"
                self.journal.save()
                phase = recovery_phase(self.plan, self.entry, failed)
                if phase is None and _green_serves(self.plan, self.entry, failed):
                    raise DeployError(f"deploy {self.plan.deploy_id}: VM {self.plan.vmid} serves, but {failed} "
                                      f"failed: {exc} (rerun to finish)") from None
                if phase is None:
                    raise DeployError(f"deploy {self.plan.deploy_id} failed at {failed}: {exc} (rerun to resume)"
                                      ) from None
                self.entry["phase"] = phase
                self.journal.save()
            else:
                return self._finish("live")
        raise DeployError(f"deploy {self.plan.deploy_id} failed at {self.entry['error']}; {self._recover()}")

    def abandon(self) -> tuple[Outcome, str]:
        """Go back instead of on: the cleanup before the cutover, the rollback from it on. (outcome, what)."""
        if self.entry["phase"] == "forward":
            phase = abandon_phase(self.plan, self.entry)
            pending = [s.name for s in self.plan.steps if s.name not in self.entry["done"]]
            self.entry["error"] = f"abandoned by the owner before {pending[0] if pending else 'the end'}"
            self.entry["phase"] = phase
            self.journal.save()
        what = self._recover()
        return Outcome(self.plan.deploy_id, self.entry["outcome"], self.plan.vmid, self.entry["downtime_s"],
                       self.entry["error"]), what

    def _recover(self) -> str:
        """Run (or resume) the entry's recovery phase to its end; what it left, in words."""
        phase = self.entry["phase"]
        recovery = self.plan.rollback if phase == "rollback" else self.plan.cleanup
        key = "rolled" if phase == "rollback" else "cleaned"
        try:
            self._steps(recovery, key)
        except HomelabError as exc:
            raise DeployError(f"deploy {self.plan.deploy_id}: {self.entry['error']}; then {phase} failed at "
                              f"{self._failed_step(key)}: {exc} (rerun to resume the {phase})") from None
        self._finish("rolled-back" if phase == "rollback" else "cleaned")
        if phase == "rollback":
            return f"rolled back to VM {self.plan.blue}"
        # `homelab rollback` has no cleanup: stopped before its first step, it had changed nothing.
        if not self.plan.cleanup:
            return "nothing changed"
        left = any("left" in result for result in self.entry.get("cleaned", {}).values())
        green = f"VM {self.plan.vmid} left alone (not this deploy's)" if left else f"VM {self.plan.vmid} deleted"
        return f"{green}, VM {self.plan.blue} untouched"

    def _failed_step(self, key: str = "done") -> str:
        return str(self.entry.get(f"current_{key}") or "?")

    def _steps(self, steps: tuple[Step, ...], key: str) -> None:
        done = self.entry.setdefault(key, {})
        for step in steps:
            if step.name in done:
                continue
            self.entry[f"current_{key}"] = step.name
            self.journal.save()
            self.say(f"{step.name}: {step.what}")
            result = self._not_ours(step) or getattr(self, f"_{step.action}")(**step.args)
            done[step.name] = {"at": time.time(), **(result or {})}
            self.entry[f"current_{key}"] = None
            self.journal.save()

    def _finish(self, outcome: str) -> Outcome:
        marks = self.entry["marks"]
        if "blue_stopped" in marks and "healthy" in marks:
            self.entry["downtime_s"] = round(marks["healthy"] - marks["blue_stopped"], 3)
        self.entry["outcome"] = outcome
        self.entry["finished"] = time.time()
        if outcome == "live":
            self.journal.data["active"] = {"vmid": self.plan.vmid, "version": self.plan.version,
                                           "deploy": self.plan.deploy_id}
        self.journal.save()
        return Outcome(self.plan.deploy_id, outcome, self.plan.vmid, self.entry["downtime_s"], self.entry["error"])

    def _mark(self, mark: str | None) -> None:
        if mark:
            self.entry["marks"][mark] = time.time()
            self.journal.save()

    # --- actions: each checks the state first, so a repeated step is harmless

    def _noop(self, **args: Any) -> dict[str, Any]:
        return dict(args)

    def _upload_image(self, path: str, sha256: str) -> dict[str, Any]:
        return self.provider.upload_image(Path(path), sha256)

    def _upload_seed(self, path: str, sha256: str) -> dict[str, Any]:
        return self.provider.upload_seed(Path(path), sha256)

    def _create_vm(self, **spec: Any) -> dict[str, Any]:
        done = self.entry["done"]
        existing = self.provider.vm(spec["vmid"])
        if existing is not None:
            if f"d-{self.plan.deploy_id}" in existing.tags:
                return {"vmid": spec["vmid"], "existed": True}
            raise DeployError(f"VMID {spec['vmid']} was taken meanwhile by another VM")
        return self.provider.create_vm(VmSpec(
            spec["vmid"], spec["name"], spec["cores"], spec["memory_mb"], done["upload-image"]["volid"],
            done["upload-seed"]["volid"], spec["bridge"], tuple(spec["tags"]), spec["link_down"], spec["drives"],
            spec.get("mac")))

    def _start(self, vmid: int, mark: str | None = None) -> dict[str, Any]:
        self._mark(mark)
        vm = self._vm(vmid)
        if vm.status == "running":
            return {"vmid": vmid, "already": "running"}
        return self.provider.start(vmid)

    def _not_ours(self, step: Step) -> dict[str, Any] | None:
        """A cleanup acts only on the green this deploy created: if its create failed because another VM took the
        VMID meanwhile, that VM is someone else's (no d-<deploy id> tag) and every cleanup step on it is skipped."""
        if self.entry["phase"] != "cleanup" or step.args.get("vmid") != self.plan.vmid:
            return None
        vm = self.provider.vm(self.plan.vmid)
        if vm is None or f"d-{self.plan.deploy_id}" in vm.tags:
            return None
        return {"vmid": vm.vmid, "left": "not this deploy's VM"}

    def _stop(self, vmid: int) -> dict[str, Any]:
        vm = self.provider.vm(vmid)
        if vm is None or vm.status == "stopped":
            return {"vmid": vmid, "already": "stopped" if vm else "gone"}
        return self.provider.stop(vmid)

    def _shutdown(self, vmid: int) -> dict[str, Any]:
        if self._vm(vmid).status == "stopped":
            return {"vmid": vmid, "already": "stopped"}
        return self.provider.shutdown(vmid, SHUTDOWN_TIMEOUT)

    def _verify(self, vmid: int, deadline: float, isolated: bool = False) -> dict[str, Any]:
        result = _until(self.provider, deadline, f"VM {vmid} did not pass verification",
                        lambda: _verify_once(self.provider, vmid))
        if isolated:
            # The guard that lets green have blue's shares attached: an isolated guest mounts nothing.
            active = self.provider.agent_exec(vmid, ("systemctl", "is-active", VOLUMES_UNIT), HEALTH_DEADLINE)
            if active.exitcode == 0:
                raise DeployError(f"VM {vmid} mounted its data volumes while isolated ({VOLUMES_UNIT} active): its "
                                  "image predates the link guard; rebuild it")
            result["isolated"] = (active.out or active.err).strip() or "inactive"
        return result

    def _health_gate(self, vmid: int, deadline: float, mark: str | None = None,
                     endpoints: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        result = self.provider.health_gate(vmid, deadline, tuple(Endpoint(**e) for e in endpoints or ()))
        self._mark(mark)
        return result

    def _run_suite(self, vmid: int, expect: dict[str, Any], mark: str | None = None) -> dict[str, Any]:
        result = self.provider.run_suite(vmid, expect)
        self._mark(mark)
        return result

    def _stop_stack(self, vmid: int, mark: str | None = None) -> dict[str, Any]:
        self._mark(mark)
        if self._vm(vmid).status != "running":
            return {"vmid": vmid, "already": "stopped"}
        result = self.provider.agent_exec(vmid, ("systemctl", "stop", STACK_UNIT), SHUTDOWN_TIMEOUT)
        if result.exitcode != 0:
            raise DeployError(f"VM {vmid}: systemctl stop {STACK_UNIT} exited {result.exitcode}: "
                              f"{(result.err or result.out).strip()[:200]}")
        return {"vmid": vmid}

    def _create_stack(self, vmid: int) -> dict[str, Any]:
        result = self.provider.agent_exec(vmid, CREATE_STACK, HEALTH_DEADLINE)
        if result.exitcode != 0:
            raise DeployError(f"VM {vmid}: `{' '.join(CREATE_STACK)}` exited {result.exitcode}: "
                              f"{(result.err or result.out).strip()[:200]}")
        return {"vmid": vmid, "created": "network and containers"}

    def _start_stack(self, vmid: int, deadline: float, mark: str | None = None,
                     retry_failed: bool = False) -> dict[str, Any]:
        self._mark(mark)

        def once() -> dict[str, Any] | str:
            try:
                self.provider.agent_ping(vmid)
            except HomelabError as exc:  # a guest agent not up yet (blue booting in a rollback): waited for
                return f"agent: {exc}"
            result = self.provider.agent_exec(vmid, ("systemctl", "start", STACK_UNIT), HEALTH_DEADLINE)
            if result.exitcode != 0:
                # The unit's `docker compose up --wait` already waited for every healthcheck (each with its own
                # start_period): its failure is the services' verdict. A new VM fails now, so a broken image is
                # rolled back at once rather than after the deadline (10 minutes of outage); the rollback's blue,
                # with nowhere else to go, is given until the deadline.
                failure = (f"VM {vmid}: systemctl start {STACK_UNIT} exited {result.exitcode}: "
                           f"{_why_stack_failed(self.provider, vmid, result)}")
                if retry_failed:
                    return failure
                raise NotWorthWaiting(failure)
            # A unit skipped by its ExecCondition (`volumes serving`: the link's carrier not seen yet) makes
            # `systemctl start` exit 0 too: started again at the next poll, not left to the health gate's deadline.
            inactive = _stack_not_active(self.provider, vmid)
            if inactive:
                return f"{inactive} (skipped: not serving yet)"
            return {"vmid": vmid}

        return _until(self.provider, deadline, f"VM {vmid}: the stack did not start", once)

    def _hand_over(self, volume: dict[str, Any], source: int, target: int) -> dict[str, Any]:
        v = DataVolume(**volume)
        src, dst = self._vm(source), self._vm(target)
        if v.key in dst.config and v.key not in src.config:
            return {"volume": v.name, "already": f"on VM {target}", "value": dst.config[v.key]}
        if v.key not in src.config and v.kind == "disk":
            raise DeployError(f"data volume {v.name} ({v.key}) is on neither VM {source} nor VM {target}")
        if v.kind == "share" and v.key in src.config and _dirid(dst.config.get(v.key, "")) == v.mapping:
            # A hot swap undone before blue let go of the share: both have it, the source (green) lets go.
            return self._release_share(volume, source, target)
        if v.key in dst.config:
            raise DeployError(f"data volume {v.name}: both VM {source} and VM {target} have {v.key}")
        if src.status != "stopped":
            raise DeployError(f"data volume {v.name}: VM {source} is {src.status}; a volume leaves a stopped VM only")
        if dst.status != "stopped" and v.kind == "share":
            raise DeployError(f"share {v.name}: VM {target} is {dst.status}; virtiofs cannot be hot-plugged")
        if v.kind == "disk":  # into a running target: hot-plugged (PVE's reassign, QMP locally)
            if dst.status != "stopped" and "disk" not in _hotplug_features(dst.config.get("hotplug", "1")):
                # Checked before the move: a disk PVE left pending on green is on neither VM as they run.
                raise DeployError(f"data volume {v.name}: VM {target} cannot hot-plug {v.key} (its hotplug option "
                                  f"{dst.config.get('hotplug')!r} lacks disk)")
            result = self.provider.move_disk(source, v.key, target)
            if dst.status != "stopped" and v.key not in self._vm(target).config:
                raise DeployError(f"data volume {v.name}: VM {target} did not hot-plug {v.key} (the change is "
                                  "pending until a restart): check its `hotplug` option holds disk")
        else:
            assert v.mapping is not None
            # A share is a host directory: between the detach and the attach (a crash) it is on neither VM,
            # and the rerun attaches it.
            if v.key in src.config:
                self.provider.detach(source, v.key)
            holders = [vm.vmid for vm in self.provider.vms()
                       if vm.vmid != target and v.mapping in _share_mappings(vm.config)]
            if holders:
                raise DeployError(f"share {v.mapping} is still attached to VM {holders[0]}: one share, one VM")
            result = self.provider.attach_share(target, v.key, v.mapping)
        return {"volume": v.name, "from": source, "to": target, "value": self._vm(target).config.get(v.key),
                **result}

    def _release_share(self, volume: dict[str, Any], source: int, target: int) -> dict[str, Any]:
        """Hot swap: green has the share since its creation; blue, stopped, lets go of it."""
        v = DataVolume(**volume)
        src, dst = self._vm(source), self._vm(target)
        if v.key not in dst.config or _dirid(dst.config[v.key]) != v.mapping:
            raise DeployError(f"share {v.name}: VM {target} does not have {v.mapping} as {v.key}")
        if v.key not in src.config:
            return {"volume": v.name, "already": f"not on VM {source}"}
        if src.status != "stopped":
            raise DeployError(f"share {v.name}: VM {source} is {src.status}; it lets go of a share stopped only")
        return {"volume": v.name, "from": source, **self.provider.detach(source, v.key)}

    def _detach(self, vmid: int, key: str) -> dict[str, Any]:
        vm = self.provider.vm(vmid)
        if vm is None or key not in vm.config:
            return {"vmid": vmid, "already": "detached"}
        return {"vmid": vmid, "detached": key, **self.provider.detach(vmid, key)}

    def _snapshot(self, vmid: int, name: str) -> dict[str, Any]:
        if name in self.provider.snapshots(vmid):
            return {"vmid": vmid, "snapshot": name, "already": "taken"}
        return {"snapshot": name, **self.provider.snapshot_volumes(vmid, name)}

    def _restore_snapshot(self, vmid: int, name: str) -> dict[str, Any]:
        """Green's data differs from what blue handed over only if green ran with it: the API shows no
        per-volume "written since the snapshot", so having been started after the handover counts as changed."""
        if "green_started" not in self.entry["marks"]:
            return {"vmid": vmid, "restored": False, "why": "never started with the data"}
        if name not in self.provider.snapshots(vmid):
            if "snapshot-data" in self.entry["done"]:
                raise DeployError(f"snapshot {name} of VM {vmid} is gone: the data cannot be restored")
            return {"vmid": vmid, "restored": False, "why": "no snapshot"}
        return {"restored": True, **self.provider.rollback_snapshot(vmid, name)}

    def _drop_snapshot(self, vmid: int, name: str) -> dict[str, Any]:
        if self.provider.vm(vmid) is None or name not in self.provider.snapshots(vmid):
            return {"vmid": vmid, "already": "gone"}
        return self.provider.delete_snapshot(vmid, name)

    def _identity(self, **args: int) -> dict[str, Any]:
        source, target = args["from"], args["to"]
        # The production MAC is the serving VM's (blue's): read once, before any NIC changes, and journaled.
        mac = self.entry["marks"].get("blue_mac")
        if mac is None:
            assert self.plan.blue is not None
            mac = parse_net(self._vm(self.plan.blue).config.get("net0", ""))[1]
            self.entry["marks"]["blue_mac"] = mac
            self.journal.save()
        self.provider.set_link(source, up=False)
        self._one_mounter(target)
        self.provider.set_link(target, up=True, mac=mac)
        return {"mac": mac, "up": target, "down": source}

    def _one_mounter(self, vmid: int) -> None:
        """PVE lets two VMs have one directory mapping: before `vmid` takes the production identity (and with it the
        right to mount its shares), no other running VM may have one of them attached."""
        shares = _share_mappings(self._vm(vmid).config)
        for vm in self.provider.vms():
            held = sorted(shares & _share_mappings(vm.config))
            if vm.vmid != vmid and vm.status != "stopped" and held:
                raise DeployError(f"share {held[0]} is attached to the running VM {vm.vmid}: VM {vmid} does not take "
                                  "the production identity while another VM may mount it")

    def _set_tags(self, vmid: int, colour: list[str]) -> dict[str, Any]:
        tags = recolour(self._vm(vmid).tags, tuple(colour))
        return {"tags": ";".join(tags), **self.provider.set_tags(vmid, tags)}

    def _prune(self, role: str, keep: int, spare: list[int]) -> dict[str, Any]:
        old = [vm for vm in role_vms(self.provider, role)
               if vm.vmid not in spare and ({"rollback", "failed"} & vm.tags) and vm.status == "stopped"]
        old.sort(key=lambda vm: tag_value(vm.tags, "d-") or "", reverse=True)
        rollbacks = [vm for vm in old if "rollback" in vm.tags]
        kept = {vm.vmid for vm in rollbacks[: max(keep - 1, 0)]}  # the blue of this deploy is one of the N
        deleted, refused = [], []
        for vm in old:
            if vm.vmid in kept:
                continue
            reason = self._holds_data(vm)
            if reason:
                refused.append(f"{vm.vmid}: {reason}")
                continue
            self.provider.destroy_vm(vm.vmid)
            deleted.append(vm.vmid)
        return {"deleted": deleted, "kept": sorted(kept), "refused": refused}

    def _destroy_checked(self, vmid: int) -> dict[str, Any]:
        vm = self.provider.vm(vmid)
        if vm is None:
            return {"vmid": vmid, "already": "gone"}
        reason = self._holds_data(vm)
        if reason:
            raise DeployError(f"VM {vmid} not deleted: {reason}")
        return self.provider.destroy_vm(vmid)

    def _holds_data(self, vm: VmInfo) -> str | None:
        """Why a VM must not be destroyed: a data key in its config, or a volume it owns besides its root disk
        (PVE's destroy frees every volume named after the VMID)."""
        data = sorted(k for k in vm.config if re.fullmatch(r"(scsi|virtio|sata|ide)\d+|unused\d+|virtiofs\d+", k)
                      and k not in (ROOT_DISK, SEED_DRIVE))
        if data:
            return f"it still has {', '.join(data)}"
        root = vm.config.get(ROOT_DISK, "").split(",")[0]
        extra = [v for v in self.provider.owned_volumes(vm.vmid) if v != root]
        if extra:
            return f"it owns {', '.join(extra)}"
        return None

    def _vm(self, vmid: int) -> VmInfo:
        vm = self.provider.vm(vmid)
        if vm is None:
            raise DeployError(f"VM {vmid} does not exist")
        return vm


def _dirid(value: str) -> str:
    return value.split(",")[0].removeprefix("dirid=")


def _hotplug_features(value: str) -> set[str]:
    """PVE's `hotplug` option: '0' nothing, '1' (the default) network,disk,usb, else the listed features."""
    return {"0": set(), "1": {"network", "disk", "usb"}}.get(value, set(value.split(",")))


def _share_mappings(config: Mapping[str, str]) -> set[str]:
    """The directory mappings a VM config has attached (its virtiofsN keys)."""
    return {_dirid(value) for key, value in config.items() if key.startswith("virtiofs")}


class NotWorthWaiting(DeployError):
    """A failure the deadline cannot change: _until raises it at once instead of retrying until then."""


def _until(provider: Provider, deadline: float, what: str,
           once: Callable[[], dict[str, Any] | str]) -> dict[str, Any]:
    """Retry `once` (a result dict, or the reason it is not there yet) until it passes or the deadline."""
    end = provider.now() + deadline
    while True:
        try:
            answer = once()
        except NotWorthWaiting:
            raise
        except HomelabError as exc:  # the API or the agent not answering for a moment
            answer = str(exc)
        if isinstance(answer, dict):
            return answer
        if provider.now() >= end:
            raise DeployError(f"{what} within {deadline:.0f} s: {answer}")
        provider.sleep(POLL)


def _verify_once(provider: Provider, vmid: int) -> dict[str, Any] | str:
    try:
        provider.agent_ping(vmid)
    except HomelabError as exc:
        return f"agent: {exc}"
    for argv in VERIFY_COMMANDS:
        result = provider.agent_exec(vmid, argv, HEALTH_DEADLINE)
        text = (result.out or result.err).strip()
        if result.exitcode != 0:
            return f"`{' '.join(argv)}` exited {result.exitcode}: {text[:200]}{_failed_units(provider, vmid, text)}"
        if argv[0] == "cloud-init" and "status: done" not in text:
            return f"cloud-init: {text[:200]}"
    return {"vmid": vmid, "verified": [" ".join(a) for a in VERIFY_COMMANDS]}


def _failed_units(provider: Provider, vmid: int, state: str) -> str:
    """Which units make a system "degraded": what the owner looks at first (the VM may be deleted by then)."""
    if state != "degraded":
        return ""
    listed = provider.agent_exec(vmid, FAILED_UNITS, HEALTH_DEADLINE)
    units = [line.split()[0] for line in listed.out.splitlines() if line.strip()]
    return f" (failed units: {', '.join(units)})" if units else ""


def compose_unhealthy(text: str) -> list[str]:
    """The services `docker compose ps --format json` shows not running or not healthy (a JSON array, or one
    object per line since compose 2.21); an empty stack counts as unhealthy."""
    text = text.strip()
    if not text:
        return ["no containers"]
    try:
        rows = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line]
    except ValueError:
        return [f"unreadable output {text[:80]!r}"]
    bad = []
    for row in rows:
        state, health = str(row.get("State", "")), str(row.get("Health", ""))
        if state != "running" or health not in ("", "healthy"):
            bad.append(f"{row.get('Service') or row.get('Name')}: {state}{'/' + health if health else ''}")
    return bad or ([] if rows else ["no containers"])


def _stack_not_active(provider: Provider, vmid: int) -> str | None:
    """Why the stack unit is not active (`systemctl is-active`), None when it is."""
    active = provider.agent_exec(vmid, HEALTH_COMMANDS[0], HEALTH_DEADLINE)
    if active.exitcode == 0:
        return None
    return f"{STACK_UNIT} is {(active.out or active.err).strip() or 'not active'}"


def _why_stack_failed(provider: Provider, vmid: int, start: GuestResult) -> str:
    """The services compose shows not running or not healthy after a failed start (systemctl itself only says
    "see journalctl"), else what systemctl said."""
    ps = provider.agent_exec(vmid, HEALTH_COMMANDS[1], HEALTH_DEADLINE)
    bad = compose_unhealthy(ps.out) if ps.exitcode == 0 else []
    if bad and bad != ["no containers"]:
        return "not healthy: " + ", ".join(bad)
    return " ".join((start.err or start.out).split())[:200] or "no output"  # one line


def health_once(provider: Provider, vmid: int, endpoints: tuple[Endpoint, ...] = ()) -> dict[str, Any] | str:
    try:
        provider.agent_ping(vmid)
    except HomelabError as exc:
        return f"agent: {exc}"
    inactive = _stack_not_active(provider, vmid)
    if inactive:
        return inactive
    ps = provider.agent_exec(vmid, HEALTH_COMMANDS[1], HEALTH_DEADLINE)
    if ps.exitcode != 0:
        return f"docker compose ps exited {ps.exitcode}: {ps.err.strip()[:200]}"
    bad = compose_unhealthy(ps.out)
    if bad:
        return "not healthy: " + ", ".join(bad)
    for endpoint in endpoints:  # compose's healthchecks run in the containers: this asks the published port
        answer = provider.agent_exec(vmid, endpoint.command(), HEALTH_DEADLINE)
        if answer.exitcode != 0:
            return f"{endpoint.service} {endpoint.url}: curl exited {answer.exitcode}: {answer.err.strip()[:200]}"
    return {"vmid": vmid, "healthy": True, **({"endpoints": [e.url for e in endpoints]} if endpoints else {})}


def health_gate(provider: Provider, vmid: int, deadline: float,
                endpoints: tuple[Endpoint, ...] = ()) -> dict[str, Any]:
    """Agent ping, the stack unit active, every compose service running and healthy, then each service's own HTTP
    health endpoint answering on the VM; retried until the deadline."""
    return _until(provider, deadline, f"VM {vmid} is not healthy", lambda: health_once(provider, vmid, endpoints))


# --- reading the journal -------------------------------------------------------------------------------------------


def status_lines(journal: Journal, role: str, last: int = 5) -> list[str]:
    active = journal.data.get("active")
    lines = [f"{role}: " + (f"live VM {active['vmid']}, version {active['version']} (deploy {active['deploy']})"
                            if active else "never deployed")]
    pending = journal.unfinished()
    if pending is not None:
        lines.append(f"unfinished: deploy {pending['id']} ({pending['phase']}): rerun `homelab deploy {role}` to "
                     "resume it, or add --abandon to undo it")
    swaps = [d for d in journal.deploys if d["kind"] in ("swap", "rollback") and d.get("outcome")][-last:]
    for d in swaps:
        lines.append("  " + _history_line(d))
    return lines


def _history_line(d: Mapping[str, Any]) -> str:
    downtime = f", downtime {d['downtime_s']:.1f} s" if d.get("downtime_s") is not None else ""
    error = f": {d['error']}" if d.get("error") else ""
    blue = f" (from VM {d['blue']})" if d.get("blue") else ""
    return f"{d['id']} {d['kind']} v{d['version']} VM {d['vmid']}{blue}: {d.get('outcome') or d['phase']}" \
           f"{downtime}{error}"


def history_lines(journal: Journal) -> list[str]:
    return [_history_line(d) for d in journal.deploys]



# --- one command -----------------------------------------------------------------------------------------------------


def resumable_plan(journal: Journal, image: Path | None) -> DeployPlan | None:
    """The journal's unfinished deploy, to be resumed as it was planned (None: nothing is unfinished); asking for
    another image meanwhile is refused."""
    pending = journal.unfinished()
    if pending is None:
        return None
    plan = DeployPlan.from_json(pending["plan"])
    if image is not None and Path(plan.image) != image:
        raise DeployError(f"deploy {plan.deploy_id} of {plan.image} is unfinished ({pending['phase']}): rerun "
                          "without --image to resume it first")
    return plan


def resume_or_plan(settings: Settings, site: Site, role: str, image: Path | None, swap: bool, *,
                   provider: Provider, journal: Journal, secrets_path: Path | None = None,
                   seed: Seed | None = None, keep: int = KEEP_ROLLBACKS) -> tuple[DeployPlan, bool]:
    """The unfinished deploy of the journal (resumed as planned), else a new plan. (plan, resumed)."""
    plan = resumable_plan(journal, image)
    if plan is not None:
        return plan, True
    return plan_deploy(settings, site, role, image, swap, provider=provider, secrets_path=secrets_path, seed=seed,
                       keep=keep), False


def pending_steps(plan: DeployPlan, journal: Journal) -> list[str]:
    """What a resumed deploy still has to do, for --dry-run."""
    entry = next((d for d in journal.deploys if d["id"] == plan.deploy_id), None)
    if entry is None:
        return [s.name for s in plan.steps]
    return _still_to_do(plan, entry, entry["phase"])


def _still_to_do(plan: DeployPlan, entry: Mapping[str, Any], phase: str) -> list[str]:
    steps, key = {"forward": (plan.steps, "done"), "rollback": (plan.rollback, "rolled"),
                  "cleanup": (plan.cleanup, "cleaned")}[phase]
    done = entry.get(key, {})
    return [f"{phase}: {s.name}" for s in steps if s.name not in done]
