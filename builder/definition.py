"""Image definitions (images/<role>.yaml): the IMAGE_FIELDS table validates them and yields DIB arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DefinitionError, UnknownRoleError
from .fields import Bool, Field, Int, ListOf, Record, Str, check_mapping, help_rows
from .site import ZONES, NonEmptyListOf
from .vpn import PEM_SECRETS, SITE_CONF
from .yamlload import load_located

# Debian release names by the `base` values the tool supports.
BASES = {"debian-13": "trixie"}
# Archive components of every image (debootstrap and the image's apt sources, DIB's debian-minimal): Debian 13 puts
# the GPU firmware (firmware-intel-graphics: i915's GuC/HuC/DMC for Jellyfin's VAAPI) in non-free-firmware.
DEBIAN_COMPONENTS = ["main", "non-free-firmware"]
KERNEL_PACKAGES = {"cloud": "linux-image-cloud-amd64", "generic": "linux-image-amd64"}
# Elements every image gets: DIB's own for a bootable cloud-init VM, then the project's.
BASE_ELEMENTS = ["vm", "cloud-init", "cloud-init-datasources", "openssh-server", "homelab-base", "homelab-bake"]
# DIB installs without Recommends, so what Debian would pull in for us is listed here.
BASE_PACKAGES = [
    "qemu-guest-agent",
    "docker.io",
    "docker-cli",
    "docker-compose",
    "e2fsprogs",
    "cloud-guest-utils",
    "ca-certificates",
    "iproute2",
    "sudo",
]
PACKAGE_NAME = r"[a-z0-9][a-z0-9+.-]+"
UNIT_NAME = r"[A-Za-z0-9@_.:-]+\.(service|timer|socket|path|target|mount)"


@dataclass
class DibArgs:
    """What one definition asks of disk-image-create."""

    elements: list[str] = field(default_factory=list)
    packages: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    image_size_gb: int = 4


def _base(value: str, dib: DibArgs) -> None:
    dib.elements.insert(0, "debian-minimal")
    dib.env["DIB_RELEASE"] = BASES[value]
    dib.env["DIB_DEBIAN_COMPONENTS"] = ",".join(DEBIAN_COMPONENTS)


def _kernel(value: str, dib: DibArgs) -> None:
    # debian-minimal always installs the generic kernel; homelab-base removes the other one.
    dib.env["HOMELAB_KERNEL_PACKAGE"] = KERNEL_PACKAGES[value]
    dib.packages.append(KERNEL_PACKAGES[value])


def _packages(value: list[str], dib: DibArgs) -> None:
    dib.packages.extend(p for p in value if p not in dib.packages)


def _elements(value: list[str], dib: DibArgs) -> None:
    dib.elements.extend(e for e in value if e not in dib.elements)


def _units(value: list[str], dib: DibArgs) -> None:
    dib.env["HOMELAB_ENABLE_UNITS"] = " ".join(value)


def _vm(value: dict[str, Any], dib: DibArgs) -> None:
    dib.image_size_gb = value["disk_gb"]


FILE_FIELDS = [
    Field("src", Str(what="a path relative to the project"), "File in this repository to bake.", required=True),
    Field("dest", Str(pattern=r"/[^\0]*", what="an absolute path"), "Where it goes in the image.", required=True),
    Field("mode", Str(pattern=r"0?[0-7]{3,4}", what="an octal mode like '0644'"), "File mode.", default="0644"),
]
VOLUME_FIELDS = [
    Field("name", Str(pattern=r"[a-z][a-z0-9-]*", what="a lowercase name"), "Volume name.", required=True),
    Field(
        "kind",
        Str(choices=["disk", "share"]),
        "disk: a block device (zvol) for databases; share: a directory (virtiofs) for files.",
        required=True,
    ),
    Field("mount", Str(pattern=r"/[^\0]+", what="an absolute path"), "Mount point in the VM.", required=True),
    Field("read_only", Bool(), "Mount read-only in this VM.", default=False),
]
VM_FIELDS = [
    Field("cores", Int(1, 64), "vCPUs.", default=2),
    Field("memory_mb", Int(512, 262144), "Memory in MiB.", default=2048),
    Field("disk_gb", Int(2, 2048), "Root disk size in GiB (the image's size).", default=4),
]
PORT_FIELDS = [
    Field("port", Int(1, 65535), "Port number.", required=True),
    Field("proto", Str(choices=["tcp", "udp"]), "Protocol.", default="tcp"),
    Field("service", Str(), "What listens there.", required=True),
    # The firewall matrix: a port is open to these zones only (networks in the site file's zones.<zone>).
    Field("from", NonEmptyListOf(Str(choices=ZONES)),
          "Firewall zones allowed to connect (the site file's zones.<zone>); every other source is refused.",
          required=True),
    Field("health", Str(pattern=r"/\S*", what="an HTTP path starting with /"),
          "The service's own HTTP health endpoint on this (tcp) port: a deploy's health gate asks it on the VM, "
          "and green serves only when it answers (an HTTP status below 400)."),
]

IMAGE_FIELDS = [
    Field("description", Str(), "One line saying what this VM is for.", required=True),
    Field("base", Str(choices=list(BASES)), "Distribution and release.", required=True, dib=_base),
    Field("kernel", Str(choices=list(KERNEL_PACKAGES)), "cloud (small, no DRM) or generic (GPU).", default="cloud",
          dib=_kernel),
    Field("packages", ListOf(Str(pattern=PACKAGE_NAME, what="a Debian package name")),
          "Debian packages to install (Recommends are not installed: list them).", default=list, dib=_packages),
    Field("elements", ListOf(Str(pattern=r"[a-z0-9][a-z0-9_-]*", what="an element name")),
          "Extra diskimage-builder elements.", default=list, dib=_elements),
    Field("files", ListOf(Record(FILE_FIELDS, "a file entry")), "Files of this repository baked into the image.",
          default=list),
    Field("compose", Str(what="a directory relative to the project"),
          "Compose stack directory baked to /opt/homelab/compose."),
    Field("units", ListOf(Str(pattern=UNIT_NAME, what="a systemd unit name")), "systemd units to enable.",
          default=list, dib=_units),
    Field("volumes", ListOf(Record(VOLUME_FIELDS, "a volume entry")), "Data volumes (kept across swaps).",
          default=list),
    Field("vm", Record(VM_FIELDS, "a vm mapping"), "VM size.", default=lambda: {f.name: f.default for f in VM_FIELDS},
          dib=_vm),
    Field("ports", ListOf(Record(PORT_FIELDS, "a port entry")),
          "Ports the VM serves and the zones each is open to: the role's firewall matrix. A compose stack may "
          "publish only these.", default=list),
    Field("vpn_gateway", Bool(),
          "The VM serves OpenVPN and routes its clients (site zones.vpn) to the LAN (zones.lan): the firewall "
          "forwards tun0 to the LAN and masquerades it, cloud-init writes the VPN's secrets and site lines.",
          default=False),
]


@dataclass(frozen=True)
class ImageDefinition:
    role: str
    path: Path
    values: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def dib_args(self) -> DibArgs:
        dib = DibArgs(elements=list(BASE_ELEMENTS), packages=list(BASE_PACKAGES))
        for f in IMAGE_FIELDS:
            if f.dib is not None and self.values.get(f.name) is not None:
                f.dib(self.values[f.name], dib)
        return dib


def known_roles(project: Path) -> list[str]:
    return sorted(p.stem for p in (project / "images").glob("*.yaml"))


def definition_path(project: Path, role: str) -> Path:
    path = project / "images" / f"{role}.yaml"
    if not path.is_file():
        known = ", ".join(known_roles(project)) or "none"
        raise UnknownRoleError(f"unknown role {role!r} (known roles: {known})")
    return path


def load_definition(path: Path, project: Path, role: str | None = None) -> ImageDefinition:
    doc = load_located(path)
    if not isinstance(doc.data, dict):
        raise DefinitionError(f"{path}: expected a mapping of image fields at the top level")
    values = check_mapping(doc.data, IMAGE_FIELDS, (), doc)
    _check_sources_exist(values, project, doc)
    _check_volume_names_unique(values, doc)
    _check_health_on_tcp(values, doc)
    return ImageDefinition(role=role or path.stem, path=path, values=values)


def load_role(project: Path, role: str) -> ImageDefinition:
    return load_definition(definition_path(project, role), project, role)


# Destinations the build itself writes (image info, baked list, the firewall ruleset of builder/firewall.py) or
# cloud-init writes at boot (the firewall's zones, OpenVPN's secrets and site lines): a definition's file must not
# replace them.
RESERVED_DESTINATIONS = ("/etc/homelab/image.json", "/etc/homelab/baked.list", "/etc/homelab/firewall.nft",
                         "/etc/homelab/volumes.json", "/etc/homelab/volumes.hold", "/etc/homelab/volumes.ephemeral",
                         "/etc/homelab/volume-tags.json", SITE_CONF, *(secret.path for secret in PEM_SECRETS))
RESERVED_TREES = ("/opt/homelab/compose/", "/var/lib/homelab/images/", "/etc/homelab/firewall.d/")


def _destination_problem(dest: str) -> str | None:
    if dest.endswith("/") or ".." in dest.split("/"):
        return "must name a file by its absolute path, without '..'"
    if dest in RESERVED_DESTINATIONS or dest.startswith(RESERVED_TREES):
        return "is written by the build itself"
    return None


def _check_sources_exist(values: dict[str, Any], project: Path, doc: Any) -> None:
    seen: set[str] = set()
    for i, entry in enumerate(values["files"]):
        problem = _destination_problem(entry["dest"])
        if entry["dest"] in seen:
            problem = "is given twice"
        if problem:
            raise DefinitionError(f"{doc.where(('files', i, 'dest'))}: files[{i}].dest: {entry['dest']!r} {problem}")
        seen.add(entry["dest"])
        if not (project / entry["src"]).is_file():
            raise DefinitionError(f"{doc.where(('files', i, 'src'))}: files[{i}].src: no such file {entry['src']!r}")
    compose = values.get("compose")
    if compose is not None and not (project / compose / "compose.yaml").is_file():
        raise DefinitionError(f"{doc.where(('compose',))}: compose: no compose.yaml in {compose!r}")


def _check_volume_names_unique(values: dict[str, Any], doc: Any) -> None:
    seen: set[str] = set()
    for i, volume in enumerate(values["volumes"]):
        for key in ("name", "mount"):
            marker = f"{key}:{volume[key]}"
            if marker in seen:
                where = doc.where(("volumes", i, key))
                raise DefinitionError(f"{where}: volumes[{i}].{key}: duplicate {volume[key]!r}")
            seen.add(marker)


def fields_help() -> list[tuple[str, str, str]]:
    return help_rows(IMAGE_FIELDS)


def _check_health_on_tcp(values: dict[str, Any], doc: Any) -> None:
    for i, port in enumerate(values["ports"]):
        if port["health"] is not None and port["proto"] != "tcp":
            raise DefinitionError(f"{doc.where(('ports', i, 'health'))}: ports[{i}].health: an HTTP endpoint needs a "
                                  f"tcp port, not {port['proto']}")
