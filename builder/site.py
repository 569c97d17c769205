"""The site file (site.yaml: domain, admin keys, addresses) and the secrets file (secrets.yaml).

Both are checked by Field tables like image definitions, so an unknown key, a wrong type or a bad address is one
error naming file:line and key. Neither file is in git; site.example.yaml shows the shape.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import urllib.parse
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DefinitionError
from .fields import Bool, Field, Int, Kind, ListOf, MapOf, Record, Str, check_mapping, help_rows
from .vpn import PEM_SECRET_NAMES
from .yamlload import KeyPath, Located, dotted, load_located

LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN = rf"{LABEL}(\.{LABEL})*"
# A public name the proxy answers for: at least two labels (a bare label would never be resolved from outside).
PUBLIC_NAME = rf"{LABEL}(\.{LABEL})+"
# A POSIX login name; root is refused because cloud-init's disable_root locks it to key-less.
USER_NAME = r"(?!root$)[a-z_][a-z0-9_-]{0,31}"
TIMEZONE = r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*"
SECRET_NAME = r"[A-Z][A-Z0-9_]*"
# Secrets sections: a role name or "common" (shared by every role).
SECRET_SECTION = r"[a-z][a-z0-9-]*"
# Key type -> how many SSH strings its key data holds (type + key; type + curve + point; type + e + n).
SSH_KEY_FIELDS = {"ssh-ed25519": 2, "ecdsa-sha2-nistp256": 3, "ecdsa-sha2-nistp384": 3, "ecdsa-sha2-nistp521": 3,
                  "ssh-rsa": 3}
SSH_KEY_TYPES = tuple(SSH_KEY_FIELDS)
# Firewall zones: the site maps each to its networks (zones.<zone>), image definitions name them in ports[].from.
ZONES = ("lan", "dmz", "vpn", "wan", "monitoring")


def ssh_key_problem(text: str) -> str | None:
    """Why `text` is not an OpenSSH public key line ('<type> <base64> [comment]'), or None if it is one."""
    if any(c in text for c in "\r\n\0"):
        # One key is one authorized_keys line: a newline would smuggle in a second key.
        return "a key must be a single line"
    parts = text.split()
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        return f"expected '<type> <base64> [comment]' with type one of {', '.join(SSH_KEY_TYPES)}"
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except binascii.Error:
        return "the key data is not base64"
    # The blob is a run of SSH strings (RFC 4253) starting with its own type: catches truncated or mixed pastes.
    fields = _ssh_strings(blob)
    if not fields or fields[0] != parts[0].encode() or len(fields) != SSH_KEY_FIELDS[parts[0]]:
        return f"the key data is not a whole {parts[0]} key"
    return None


def _ssh_strings(blob: bytes) -> list[bytes] | None:
    """Split length-prefixed strings; None if the data does not end exactly at a string's end."""
    fields = []
    while blob:
        size = int.from_bytes(blob[:4], "big")
        if len(blob) < 4 + size:
            return None
        fields.append(blob[4 : 4 + size])
        blob = blob[4 + size :]
    return fields


class SshPublicKey(Kind):
    describe = "an OpenSSH public key line"

    def check(self, value: Any, keypath: KeyPath, doc: Located) -> str:
        if not isinstance(value, str):
            raise self.fail(value, keypath, doc)
        problem = ssh_key_problem(value)
        if problem:
            raise DefinitionError(f"{doc.where(keypath)}: {dotted(keypath)}: {problem}")
        return value


class NonEmptyListOf(ListOf):
    """A ListOf that must hold at least one item (a host nobody can log in to is useless)."""

    def __init__(self, item: Kind) -> None:
        super().__init__(item)
        self.describe = f"a non-empty list of {item.describe}"

    def check(self, value: Any, keypath: KeyPath, doc: Located) -> list[Any]:
        items = super().check(value, keypath, doc)
        if not items:
            raise self.fail(value, keypath, doc)
        return items


class IPv4(Kind):
    describe = "an IPv4 address like 192.168.1.1"

    def check(self, value: Any, keypath: KeyPath, doc: Located) -> str:
        if not isinstance(value, str):
            raise self.fail(value, keypath, doc)
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            raise self.fail(value, keypath, doc) from None


class IPv4Interface(Kind):
    """A host address with its prefix (192.168.1.10/24): the prefix is needed to route and to check the gateway."""

    describe = "an IPv4 address with prefix like 192.168.1.10/24"

    def check(self, value: Any, keypath: KeyPath, doc: Located) -> str:
        if not isinstance(value, str) or "/" not in value:
            raise self.fail(value, keypath, doc)
        try:
            iface = ipaddress.IPv4Interface(value)
        except ValueError:
            raise self.fail(value, keypath, doc) from None
        net = iface.network
        if net.prefixlen < 31 and iface.ip in (net.network_address, net.broadcast_address):
            raise DefinitionError(f"{doc.where(keypath)}: {dotted(keypath)}: {value} is not a host address of {net}")
        return str(iface)


class IPv4Network(Kind):
    """A network with its prefix (192.168.1.0/24, 10.8.0.0/24, 0.0.0.0/0); host bits must be zero."""

    describe = "an IPv4 network like 192.168.1.0/24"

    def check(self, value: Any, keypath: KeyPath, doc: Located) -> str:
        if not isinstance(value, str) or "/" not in value:
            raise self.fail(value, keypath, doc)
        try:
            return str(ipaddress.IPv4Network(value))
        except ValueError:
            try:
                network = ipaddress.IPv4Network(value, strict=False)
            except ValueError:
                raise self.fail(value, keypath, doc) from None
            raise DefinitionError(
                f"{doc.where(keypath)}: {dotted(keypath)}: {value} has host bits set (the network is {network})"
            ) from None


class ZoneMap(MapOf):
    """zones.<zone>: the networks of one firewall zone; only the zones in ZONES exist."""

    def __init__(self) -> None:
        super().__init__(NonEmptyListOf(IPv4Network()), key_pattern="|".join(ZONES),
                         what="a mapping of zone (" + ", ".join(ZONES) + ") to IPv4 networks")

    def check(self, value: Any, keypath: KeyPath, doc: Located) -> dict[str, Any]:
        if isinstance(value, dict):
            for key in value:
                if key not in ZONES:
                    raise DefinitionError(
                        f"{doc.where((*keypath, key))}: {dotted((*keypath, key))}: unknown zone {key!r} "
                        f"(zones: {', '.join(ZONES)})"
                    )
        return super().check(value, keypath, doc)


class Timezone(Str):
    def __init__(self) -> None:
        super().__init__(pattern=TIMEZONE, what="a tz database name like Europe/Paris")

    def check(self, value: Any, keypath: KeyPath, doc: Located) -> str:
        name = super().check(value, keypath, doc)
        # Only checked when this machine has tz data; cloud-init would otherwise just log a warning at boot.
        known = zoneinfo.available_timezones()
        if known and name not in known and name != "UTC":
            raise DefinitionError(f"{doc.where(keypath)}: {dotted(keypath)}: unknown timezone {name!r}")
        return name


class SecretValue(Str):
    """A secret: any string on one line, since each becomes one KEY=value line of secrets.env. The PEM secrets
    (builder/vpn.py) are the exception: multi-line, they are written as their own files, never as env lines."""

    def __init__(self) -> None:
        super().__init__(what="a string")

    def check(self, value: Any, keypath: KeyPath, doc: Located) -> str:
        text = super().check(value, keypath, doc)
        if keypath and keypath[-1] in PEM_SECRET_NAMES and "\0" not in text:
            return text
        if any(c in text for c in "\r\n\0"):
            raise DefinitionError(
                f"{doc.where(keypath)}: {dotted(keypath)}: a secret must be one line (it becomes a KEY=value line)"
            )
        return text


class ProxmoxUrl(Kind):
    """https://host[:port] of the Proxmox VE API; stored with its port (8006 unless given), no path."""

    describe = "an https URL like https://pve.home.arpa:8006"

    def check(self, value: Any, keypath: KeyPath, doc: Located) -> str:
        if not isinstance(value, str):
            raise self.fail(value, keypath, doc)
        try:
            url = urllib.parse.urlsplit(value)
            port = url.port or PVE_PORT
        except ValueError:
            raise self.fail(value, keypath, doc) from None
        # Plain HTTP would send the token in clear; a path would be silently dropped by proxmoxer.
        if url.scheme != "https" or not url.hostname or url.path.strip("/") or url.query or url.username:
            raise self.fail(value, keypath, doc)
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        return f"https://{host}:{port}"


class Fingerprint(Str):
    """A certificate's SHA-256 fingerprint as `pvenode cert info` prints it; stored upper case."""

    def __init__(self) -> None:
        super().__init__(pattern=r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){31}",
                         what="a SHA-256 fingerprint AA:BB:... (32 hex pairs, as pvenode cert info prints it)")

    def check(self, value: Any, keypath: KeyPath, doc: Located) -> str:
        return super().check(value, keypath, doc).upper()


PVE_PORT = 8006
# Proxmox VE's own ID formats: pve-storage-id, pve-node, pve-iface (a bridge name).
PVE_ID = r"[a-z][a-z0-9\-_.]*[a-z0-9]"
STORAGE_FIELDS = [
    Field("import", Str(pattern=PVE_ID, what="a storage ID"),
          "Storage the images are uploaded to (content type import, a directory storage).", default="local"),
    Field("images", Str(pattern=PVE_ID, what="a storage ID"),
          "Storage of the VMs' disks (content type images, e.g. ZFS).", default="local-zfs"),
    Field("iso", Str(pattern=PVE_ID, what="a storage ID"),
          "Storage of the cloud-init seed ISOs (content type iso).", default="local"),
]
TLS_FIELDS = [
    Field("fingerprint", Fingerprint(),
          "Pin the API's certificate by its SHA-256 fingerprint instead of checking it against the system CAs "
          "(PVE's self-signed certificate)."),
    Field("insecure", Bool(), "Do not check the certificate at all (only when set to true explicitly).",
          default=False),
]
PROXMOX_FIELDS = [
    Field("url", ProxmoxUrl(), "The API, https://host[:port] (port 8006 by default).", required=True),
    Field("node", Str(pattern=PVE_ID, what="a node name"), "The node the VMs run on.", required=True),
    Field("storages", Record(STORAGE_FIELDS, "a storages mapping"), "Storage IDs by use (import, images, iso).",
          default=lambda: {f.name: f.default for f in STORAGE_FIELDS}),
    Field("bridge", Str(pattern=r"[a-zA-Z][a-zA-Z0-9_.-]{0,14}", what="a bridge name like vmbr0"),
          "Bridge the VMs' NIC is on.", default="vmbr0"),
    Field("tls", Record(TLS_FIELDS, "a tls mapping"),
          "How the API's certificate is checked: system CAs by default, tls.fingerprint pins it.",
          default=lambda: {f.name: f.default for f in TLS_FIELDS}),
]

# hosts.<role>.volumes.<name>: where each data volume of the role's image definition lives on Proxmox VE.
VOLUME_ID = r"[a-z][a-z0-9\-_.]*[a-z0-9]:[A-Za-z0-9][A-Za-z0-9+._/-]*"
HOST_VOLUME_FIELDS = [
    Field("volid", Str(pattern=VOLUME_ID, what="a volume ID like local-zfs:vm-101-disk-1"),
          "A disk-kind volume: the existing zvol (STORAGE:NAME) the first deploy attaches; swaps move it on."),
    Field("mapping", Str(pattern=r"[a-zA-Z][a-zA-Z0-9\-_]{0,127}", what="a directory mapping ID"),
          "A share-kind volume: the PVE directory mapping (Datacenter > Directory Mappings) shared by virtiofs."),
]

HOST_FIELDS = [
    Field("hostname", Str(pattern=LABEL, what="a lowercase host name (one DNS label)"), "Host name (no domain).",
          required=True),
    Field("address", IPv4Interface(), "Static address with prefix; booting never waits for DHCP.", required=True),
    # Deploy facts: where the role's VM lives on Proxmox VE (needed by preflight and deploy, not by boot).
    Field("vmid", Int(100, 999999999), "Proxmox VE VMID of the role's VM (deploy)."),
    Field("name", Str(pattern=LABEL, what="a VM name (one DNS label)"),
          "Proxmox VE name of the role's VM (deploy); default the hostname."),
    Field("volumes", MapOf(Record(HOST_VOLUME_FIELDS, "a volume mapping"),
                           what="a mapping of volume name to its facts"),
          "Data volumes of the role (deploy): volumes.<name>.volid (disk) or .mapping (share), one per volume of "
          "the image definition.", default=dict),
]

# proxy_hosts[]: one public name of the DMZ proxy (Nginx Proxy Manager), applied through NPM's API at boot
# (builder/npm.py renders them, images/files/extranet/npm-apply applies them).
PROXY_HOST_FIELDS = [
    Field("domain", Str(pattern=PUBLIC_NAME, what="a lowercase host name like media.example.org"),
          "Public name the proxy answers for.", required=True),
    Field("to", Str(pattern=r"[a-z][a-z0-9-]*", what="a role of the site's hosts"),
          "Role whose host (hosts.<role>.address) serves it.", required=True),
    Field("port", Int(1, 65535), "Port of the service on that host.", required=True),
    Field("access", NonEmptyListOf(Str(choices=ZONES)),
          "Zones allowed in (an NPM access list of their networks, everyone else denied); default: everyone.",
          default=None),
    Field("timeout_s", Int(1, 86400), "Proxy read/send timeout in seconds.", default=60),
    Field("rate_per_s", Int(1, 100000), "Requests per second per client address (burst twice that); default: no limit.",
          default=None),
    Field("websockets", Bool(), "Allow WebSocket upgrades.", default=True),
    Field("max_body_mb", Int(0, 1048576), "Largest request body in MiB, 0 = unlimited (uploads); default: NPM's 2000.",
          default=None),
]

# One row per key of site.yaml; a new section (e.g. proxmox:) is one more row, reachable as site["proxmox"].
SITE_FIELDS = [
    Field("domain", Str(pattern=DOMAIN, what="a lowercase DNS domain like home.arpa"),
          "DNS domain of the hosts (fqdn = hostname.domain).", required=True),
    Field("timezone", Timezone(), "Time zone of the hosts.", default="UTC"),
    Field("admin_user", Str(pattern=USER_NAME, what="a lowercase login name other than root"),
          "The only login user (SSH key only, passwordless sudo).", default="homelab"),
    Field("ssh_authorized_keys", NonEmptyListOf(SshPublicKey()), "Public keys allowed to log in as admin_user.",
          required=True),
    Field("gateway", IPv4(), "Default IPv4 gateway of the hosts.", required=True),
    Field("dns", NonEmptyListOf(IPv4()), "IPv4 DNS servers of the hosts.", required=True),
    Field("hosts", MapOf(Record(HOST_FIELDS, "a host mapping"), what="a mapping of role to host"),
          "Host of each role: hosts.<role>.hostname and hosts.<role>.address.", required=True),
    Field("dynhost", Str(pattern=DOMAIN, what="a lowercase DNS name like home.example.org"),
          "OVH DynHost name the extranet's ddclient keeps on the home's public IPv4 (needs extranet.OVH_DYNHOST_LOGIN "
          "and extranet.OVH_DYNHOST_PASSWORD in the secrets file); absent: ddclient stays off."),
    Field("zones", ZoneMap(),
          "Firewall zones (" + ", ".join(ZONES) + "): zones.<zone> lists its IPv4 networks; image definitions "
          "name the zones each port is open to (ports[].from). Zones may overlap (the DMZ host is in the LAN).",
          default=dict),
    Field("proxy_hosts", ListOf(Record(PROXY_HOST_FIELDS, "a proxy host mapping"), unique=False),
          "Public names of the DMZ's Nginx Proxy Manager, applied through its API at every boot.", default=list),
    Field("proxmox", Record(PROXMOX_FIELDS, "a proxmox mapping"),
          "The Proxmox VE host deploys go to (the API token comes from $PVE_TOKEN, never from this file)."),
]

@dataclass(frozen=True)
class SiteHost:
    role: str
    hostname: str
    address: str  # CIDR interface, e.g. 192.168.1.101/24
    vmid: int | None = None  # Proxmox VE VMID; only deploys need it
    name: str = ""  # Proxmox VE VM name (the hostname unless the site says otherwise)
    # Data volume name -> {"volid": ...} (disk) or {"mapping": ...} (share); only deploys need them.
    volumes: Mapping[str, Mapping[str, str | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class Site:
    path: Path
    domain: str
    timezone: str
    admin_user: str
    ssh_authorized_keys: tuple[str, ...]
    gateway: str
    dns: tuple[str, ...]
    hosts: Mapping[str, SiteHost]
    zones: Mapping[str, tuple[str, ...]]
    dynhost: str | None
    # Every validated key, including ones added to SITE_FIELDS later.
    values: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def host(self, role: str) -> SiteHost:
        if role not in self.hosts:
            known = ", ".join(sorted(self.hosts)) or "none"
            raise DefinitionError(f"site file {self.path} has no hosts.{role} (hosts: {known})")
        return self.hosts[role]

    def fqdn(self, role: str) -> str:
        return f"{self.host(role).hostname}.{self.domain}"

    def proxmox(self) -> dict[str, Any]:
        """The proxmox section (url, node, storages, bridge, tls); an error naming the file when absent."""
        section: dict[str, Any] | None = self.values.get("proxmox")
        if section is None:
            raise DefinitionError(f"site file {self.path} has no proxmox section (see site.example.yaml)")
        return section

    def deploy_host(self, role: str) -> SiteHost:
        """The role's host with the deploy facts a Proxmox VE VM needs (vmid)."""
        host = self.host(role)
        if host.vmid is None:
            raise DefinitionError(f"site file {self.path} has no hosts.{role}.vmid (the role's Proxmox VE VMID)")
        return host


def load_site(path: Path) -> Site:
    doc = load_located(path)
    if not isinstance(doc.data, dict):
        raise DefinitionError(f"{path}: expected a mapping of site keys at the top level")
    _refuse_token_in_file(doc)
    values = check_mapping(doc.data, SITE_FIELDS, (), doc)
    _check_hosts(values, doc)
    _check_proxy_hosts(values, doc)
    _check_proxmox(values, doc)
    hosts = {role: SiteHost(role, h["hostname"], h["address"], h["vmid"], h["name"], h["volumes"])
             for role, h in values["hosts"].items()}
    return Site(
        path=path,
        domain=values["domain"],
        timezone=values["timezone"],
        admin_user=values["admin_user"],
        ssh_authorized_keys=tuple(values["ssh_authorized_keys"]),
        gateway=values["gateway"],
        dns=tuple(values["dns"]),
        hosts=hosts,
        zones={zone: tuple(networks) for zone, networks in values["zones"].items()},
        dynhost=values["dynhost"],
        values=values,
    )


def _check_hosts(values: dict[str, Any], doc: Located) -> None:
    """Every host must reach the gateway directly, and no two hosts may share a name or an address."""
    gateway = ipaddress.IPv4Address(values["gateway"])
    seen: dict[str, str] = {}
    for role, host in values["hosts"].items():
        host["name"] = host["name"] or host["hostname"]
        iface = ipaddress.IPv4Interface(host["address"])
        where = doc.where(("hosts", role, "address"))
        if gateway not in iface.network:
            raise DefinitionError(f"{where}: hosts.{role}.address: gateway {gateway} is not in {iface.network}")
        if iface.ip == gateway:
            raise DefinitionError(f"{where}: hosts.{role}.address: {iface.ip} is the gateway's address")
        for name, volume in host["volumes"].items():
            if (volume["volid"] is None) == (volume["mapping"] is None):
                raise DefinitionError(f"{doc.where(('hosts', role, 'volumes', name))}: hosts.{role}.volumes.{name}: "
                                      "give exactly one of volid (a disk) or mapping (a share)")
        markers = [("hostname", host["hostname"]), ("address", str(iface.ip)), ("name", f"vm {host['name']}")]
        if host["vmid"] is not None:
            markers.append(("vmid", f"vmid {host['vmid']}"))
        for key, marker in markers:
            if marker in seen:
                raise DefinitionError(
                    f"{doc.where(('hosts', role, key))}: hosts.{role}.{key}: {marker!r} is also {seen[marker]}"
                )
            seen[marker] = f"hosts.{role}.{key}"


def _check_proxy_hosts(values: dict[str, Any], doc: Located) -> None:
    """Each proxy host targets a host of the site and names defined zones; a domain is proxied once."""
    seen: dict[str, int] = {}
    for i, entry in enumerate(values["proxy_hosts"]):
        def fail(key: str, problem: str, i: int = i) -> DefinitionError:
            keypath = ("proxy_hosts", i, key)
            return DefinitionError(f"{doc.where(keypath)}: {dotted(keypath)}: {problem}")

        if entry["to"] not in values["hosts"]:
            raise fail("to", f"{entry['to']!r} is not a host of the site (hosts: {', '.join(sorted(values['hosts']))})")
        for zone in entry["access"] or ():
            if zone not in values["zones"]:
                # An undefined zone has no networks: its access list would let nobody in.
                raise fail("access", f"zone {zone!r} is not defined in zones")
        if entry["domain"] in seen:
            raise fail("domain", f"{entry['domain']!r} is also proxy_hosts[{seen[entry['domain']]}].domain")
        seen[entry["domain"]] = i


def _refuse_token_in_file(doc: Located) -> None:
    """A token pasted into the site file (which people share and back up) gets a pointer to $PVE_TOKEN."""
    section = doc.data.get("proxmox")
    for key in ("token", "password", "secret"):
        if isinstance(section, dict) and key in section:
            raise DefinitionError(
                f"{doc.where(('proxmox', key))}: proxmox.{key}: credentials never go in the site file: "
                "set PVE_TOKEN=user@realm!tokenid=secret in the environment"
            )


def _check_proxmox(values: dict[str, Any], doc: Located) -> None:
    """A pinned fingerprint and insecure contradict each other: refuse rather than guess which was meant."""
    tls = (values.get("proxmox") or {}).get("tls") or {}
    if tls.get("fingerprint") and tls.get("insecure"):
        raise DefinitionError(
            f"{doc.where(('proxmox', 'tls', 'insecure'))}: proxmox.tls.insecure: cannot be true with a pinned "
            "proxmox.tls.fingerprint (the fingerprint already trusts that certificate)"
        )


def load_secrets(path: Path | None) -> dict[str, dict[str, str]]:
    """{section: {NAME: value}}; no path means no secrets. Values must be strings on one line (KEY=value lines)."""
    if path is None:
        return {}
    doc = load_located(path)
    if not isinstance(doc.data, dict):
        raise DefinitionError(f"{path}: expected a mapping of <role or common> to secrets at the top level")
    kind = MapOf(MapOf(SecretValue(), key_pattern=SECRET_NAME, what="a mapping of NAME to value"),
                 key_pattern=SECRET_SECTION, what="a mapping of role or common to secrets")
    secrets: dict[str, dict[str, str]] = kind.check(doc.data, (), doc)
    return secrets


def fields_help() -> list[tuple[str, str, str]]:
    return help_rows(SITE_FIELDS)
