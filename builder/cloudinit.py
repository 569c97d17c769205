"""cloud-init NoCloud seeds: render cloudinit/*.j2 for a role, validate with cloud-init's schemas, write the ISO."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import jsonschema
import pycdlib
import yaml

from .compose import (
    PROMETHEUS_SCRAPER,
    PROMETHEUS_TARGETS,
    check_stack,
    merged_secrets,
    prometheus_node_targets,
    role_env_files,
)
from .ddclient import ddclient_files
from .definition import load_role
from .errors import RenderError
from .firewall import ZONES_FILE, zones_file
from .npm import DESIRED_PATH, NPM_ROLE, check_targets, desired_state_json
from .site import Site, load_secrets, load_site, ssh_key_problem
from .vpn import PEM_SECRET_NAMES, vpn_files

SCHEMAS = Path(__file__).resolve().parent / "schemas"
TEMPLATES = "cloudinit"
CLOUD_CONFIG_HEADER = "#cloud-config"
VOLUME_ID = "cidata"
# (ISO9660 name, Rock Ridge / Joliet name, Seed attribute): NoCloud looks files up by their exact long names.
SEED_FILES = (
    ("/USER_DATA.;1", "user-data", "user_data"),
    ("/META_DATA.;1", "meta-data", "meta_data"),
    ("/NETWORK_CONFIG.;1", "network-config", "network_config"),
)


@dataclass(frozen=True)
class HostNetwork:
    """One interface's static configuration. `mac` pins the name to a NIC (needed with more than one)."""

    address: str  # CIDR interface, e.g. 10.0.2.15/24
    gateway: str | None  # None: on-link only, no default route through this interface
    dns: list[str]
    name: str = "eth0"
    mac: str | None = None


@dataclass(frozen=True)
class Seed:
    user_data: str
    meta_data: str
    network_config: str


def yaml_scalar(value: str | Sequence[str]) -> str:
    """A string (or list of strings) as one double-quoted YAML flow node that reads back exactly.

    Unlike JSON, PyYAML's emitter escapes what YAML would fold or refuse (NEL, U+2028, astral characters as
    \\U........), and cloud-init reads user-data with PyYAML.
    """
    if isinstance(value, jinja2.StrictUndefined):
        str(value)  # raises UndefinedError naming the missing variable
    if isinstance(value, str):
        plain: str | list[str] = value
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        plain = list(value)
    else:
        raise RenderError(f"cannot render {value!r} into YAML: only strings and lists of strings are quoted")
    text: str = yaml.safe_dump(plain, default_style='"', default_flow_style=True, width=1 << 30, allow_unicode=False)
    return text.rstrip("\n")


def _environment(project: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(project / TEMPLATES),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # YAML, not HTML: quoting is the `yaml` filter's job
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["yaml"] = yaml_scalar
    return env


def _render(env: jinja2.Environment, name: str, context: Mapping[str, Any]) -> str:
    try:
        return env.get_template(f"{name}.j2").render(context)
    except jinja2.TemplateNotFound as exc:
        raise RenderError(f"{TEMPLATES}/{exc.name}: template not found") from None
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(f"{TEMPLATES}/{name}.j2:{exc.lineno}: {exc.message}") from None
    except jinja2.UndefinedError as exc:
        raise RenderError(f"{TEMPLATES}/{name}.j2: {exc.message}") from None


def secrets_env(role: str, secrets: Mapping[str, Mapping[str, str]]) -> str:
    """KEY=value lines, common first; a role's value replaces a common one of the same name. The PEM secrets
    are left out: multi-line, they are written as their own files (vpn_files)."""
    merged = {name: value for name, value in merged_secrets(role, secrets).items() if name not in PEM_SECRET_NAMES}
    for name, value in merged.items():
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            raise RenderError(f"secret {name} of {role}: must be a one-line string (it becomes a KEY=value line)")
    return "".join(f"{name}={value}\n" for name, value in merged.items())


def _networks(site: Site, role: str, networks: Sequence[HostNetwork] | None) -> list[HostNetwork]:
    chosen = list(networks or [HostNetwork(site.host(role).address, site.gateway, list(site.dns))])
    for net in chosen:
        _check_network(role, net)
    if sum(net.gateway is not None for net in chosen) > 1:
        raise RenderError(f"network of {role}: more than one interface has a default gateway")
    return chosen


def primary_network(networks: Sequence[HostNetwork]) -> HostNetwork:
    """The host's production interface: the one that has the default route (the first when none has)."""
    return next((net for net in networks if net.gateway), networks[0])


def primary_address(networks: Sequence[HostNetwork]) -> str:
    return primary_network(networks).address


def _check_network(role: str, net: HostNetwork) -> None:
    where = f"network of {role} ({net.name})"
    try:
        iface = ipaddress.IPv4Interface(net.address)
        gateway = ipaddress.IPv4Address(net.gateway) if net.gateway is not None else None
        for server in net.dns:
            ipaddress.IPv4Address(server)
    except ValueError as exc:
        raise RenderError(f"{where}: {exc}") from None
    if "/" not in net.address:
        raise RenderError(f"{where}: address {net.address} has no prefix (like /24)")
    if gateway is not None and gateway not in iface.network:
        raise RenderError(f"{where}: gateway {gateway} is not in {net.address}")


def _ssh_keys(site: Site, extra: Sequence[str]) -> list[str]:
    keys = list(site.ssh_authorized_keys)
    for key in extra:
        problem = ssh_key_problem(key)
        if problem:
            raise RenderError(f"extra ssh key {key[:40]!r}: {problem}")
        if key not in keys:
            keys.append(key)
    return keys


def render_seed(
    project: Path,
    role: str,
    site: Site,
    secrets: Mapping[str, Mapping[str, str]],
    *,
    networks: Sequence[HostNetwork] | None = None,
    extra_ssh_keys: Sequence[str] = (),
    extra_zones: Mapping[str, Sequence[str]] | None = None,
    extra_files: Sequence[Mapping[str, str]] = (),
) -> Seed:
    """The three NoCloud files for `role`; `networks` replace the site's address and `extra_zones` adds
    networks to firewall zones (local QEMU boots: the host reaching the VM through QEMU's user network);
    `extra_files` ({path, permissions, content}) are written beside the host's files (the data volumes' markers,
    builder/localvolumes.py)."""
    definition = load_role(project, role)  # an unknown role fails here, naming the known ones
    # The stack's secrets must be present and strong before anything boots (the lock is the build's concern).
    check_stack(project, definition, site, secrets, require_lock=False)
    if role == NPM_ROLE and site["proxy_hosts"]:
        check_targets(site, {entry["to"]: load_role(project, entry["to"]) for entry in site["proxy_hosts"]})
    host = site.host(role)
    nets = _networks(site, role, networks)
    fqdn = site.fqdn(role)
    # "interface": the NIC whose link is the production identity (homelab-volumes' `serving`).
    host_info = {"role": role, "hostname": host.hostname, "fqdn": fqdn, "address": primary_address(nets),
                 "interface": primary_network(nets).name}
    env = _environment(project)
    user_data = _render(env, "user-data", {
        "hostname": host.hostname,
        "fqdn": fqdn,
        "timezone": site.timezone,
        "admin_user": site.admin_user,
        "ssh_authorized_keys": _ssh_keys(site, extra_ssh_keys),
        "host_json": json.dumps(host_info, indent=2, sort_keys=True) + "\n",
        "secrets_env": secrets_env(role, secrets),
        "host_files": [*host_files(role, site, secrets),
                       *vpn_files(role, site, merged_secrets(role, secrets), definition["vpn_gateway"],
                                  f"images/{role}.yaml"),
                       *[dict(file) for file in extra_files]],
        "firewall_zones_path": ZONES_FILE,
        "firewall_zones": zones_file(site.zones, extra_zones),
    })
    network_config = _render(env, "network-config", {"interfaces": nets, "domain": site.domain})
    validate_user_data(user_data, f"user-data ({role})")
    validate_network_config(network_config, f"network-config ({role})")
    meta_data = _render(env, "meta-data", {"instance_id": instance_id(role, user_data, network_config),
                                           "hostname": host.hostname})
    return Seed(user_data=user_data, meta_data=meta_data, network_config=network_config)


def render_role(project: Path, role: str, site_path: Path, secrets_path: Path | None, iso: Path | None = None) -> Seed:
    """`homelab render`: the role's seed from the site and secrets files, validated; written as an ISO if asked."""
    seed = render_seed(project, role, load_site(site_path), load_secrets(secrets_path))
    if iso is not None:
        write_seed_iso(seed, iso)
    return seed


def stack_files(role: str, site: Site, secrets: Mapping[str, Mapping[str, str]]) -> list[dict[str, str]]:
    """Per-host files the role's compose stack reads: its env files (secrets, 0600), on the scraper Prometheus'
    targets (the other VMs' addresses: site facts, never baked) and on the proxy the desired proxy hosts (no
    secret: 0644; absent without proxy_hosts, so homelab-npm-proxy-hosts.service is skipped by its condition)."""
    files = [{"path": path, "permissions": "0600", "content": content}
             for path, content in sorted(role_env_files(role, secrets).items())]
    if role == PROMETHEUS_SCRAPER and role in site.hosts:
        files.append({"path": PROMETHEUS_TARGETS, "permissions": "0644", "content": prometheus_node_targets(site)})
    if role == NPM_ROLE and site["proxy_hosts"]:
        files.append({"path": DESIRED_PATH, "permissions": "0644", "content": desired_state_json(site)})
    return files


def host_files(role: str, site: Site, secrets: Mapping[str, Mapping[str, str]]) -> list[dict[str, str]]:
    """Every per-host file cloud-init writes beside host.json and secrets.env: the stack's, then the services'
    (ddclient.conf on the extranet when the site names a dynhost: it holds the DynHost password, so 0600)."""
    files = stack_files(role, site, secrets)
    files += [{"path": path, "permissions": "0600", "content": content}
              for path, content in sorted(ddclient_files(role, site, secrets).items())]
    return files


def instance_id(role: str, user_data: str, network_config: str) -> str:
    digest = hashlib.sha256((user_data + network_config).encode()).hexdigest()
    return f"{role}-{digest[:12]}"


# --- validation against cloud-init's own schemas --------------------------------------------------------------


def _deprecated(validator: Any, deprecated: Any, instance: Any, schema: Mapping[str, Any]) -> Iterator[Any]:
    """cloud-init only warns on deprecated keys; our templates are ours to fix, so they are errors here."""
    if deprecated:
        why = schema.get("deprecated_description") or schema.get("description") or "use the replacement"
        yield jsonschema.ValidationError(f"deprecated: {why}")


# cloud-init validates with a Draft4Validator extended with a `deprecated` keyword (cloudinit/config/schema.py).
# (types-jsonschema leaves extend() unannotated.)
CloudInitValidator = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft4Validator, {"deprecated": _deprecated}
)


@cache
def _schema(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
    return data


def _network_v2_schema() -> dict[str, Any]:
    """The v2 schema's bare form only (no top-level `network:`), which is what the template writes.

    The full schema is a oneOf of the bare and the wrapped form, whose errors only say "not valid under any of
    the given schemas"; checking the bare branch directly names the offending key.
    """
    full = _schema("schema-network-config-v2.json")
    return {"$defs": full["$defs"], "$ref": "#/$defs/network_config_version2"}


def _check(data: Any, schema: dict[str, Any], source: str) -> None:
    validator = CloudInitValidator(schema, format_checker=jsonschema.FormatChecker())
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is None:
        return
    path = ".".join(str(p) for p in error.absolute_path)
    if not path and error.validator == "additionalProperties":
        # Like cloud-init, name an unknown top-level key as the path rather than "(top level)".
        unknown = sorted(set(data) - set(schema.get("properties", {})))
        path = unknown[0] if unknown else ""
    raise RenderError(f"{source}: {path or '(top level)'}: {error.message}")


def _parse(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise RenderError(f"{source}: invalid YAML{line}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise RenderError(f"{source}: (top level): expected a mapping, got {type(data).__name__}")
    return data


def validate_user_data(text: str, source: str) -> None:
    if not text.startswith(CLOUD_CONFIG_HEADER + "\n"):
        raise RenderError(f"{source}: does not start with {CLOUD_CONFIG_HEADER!r} (cloud-init would ignore it)")
    _check(_parse(text, source), _schema("schema-cloud-config-v1.json"), source)


def validate_network_config(text: str, source: str) -> None:
    data = _parse(text, source)
    if "network" in data:
        raise RenderError(f"{source}: network: write the v2 keys at the top level, not under 'network:'")
    _check(data, _network_v2_schema(), source)


# --- the seed ISO ------------------------------------------------------------------------------------------------


def _build_iso(seed: Seed) -> pycdlib.PyCdlib:
    iso = pycdlib.PyCdlib()
    # Joliet and Rock Ridge carry the exact lower-case names; ISO9660 level 3 allows the long plain ones.
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_ID)
    for iso_path, name, attr in SEED_FILES:
        data = getattr(seed, attr).encode()
        iso.add_fp(io.BytesIO(data), len(data), iso_path, rr_name=name, joliet_path=f"/{name}")
    return iso


def write_seed_iso(seed: Seed, path: Path) -> None:
    """Write atomically: a temp file in the same directory, then os.replace(); it may hold secrets, so 0600."""
    iso = _build_iso(seed)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            iso.write_fp(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        iso.close()


def read_seed_iso(path: Path) -> Seed:
    iso = pycdlib.PyCdlib()
    try:
        iso.open(str(path))
    except (OSError, pycdlib.pycdlibexception.PyCdlibException) as exc:
        raise RenderError(f"{path}: not a readable ISO: {exc}") from None
    try:
        volume = iso.pvd.volume_identifier.decode("ascii", "replace").strip()
        if volume != VOLUME_ID:
            raise RenderError(f"{path}: volume id is {volume!r}, NoCloud needs {VOLUME_ID!r}")
        return Seed(**{attr: _read_file(iso, path, name) for _, name, attr in SEED_FILES})
    finally:
        iso.close()


def _read_file(iso: pycdlib.PyCdlib, path: Path, name: str) -> str:
    out = io.BytesIO()
    try:
        iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
    except pycdlib.pycdlibexception.PyCdlibException:
        raise RenderError(f"{path}: no {name} in the seed") from None
    return out.getvalue().decode("utf-8")
