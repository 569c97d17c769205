"""A role's compose stack checked against its definition, the site, the secrets and the image lock.

`check_stack` refuses, with one line naming the file, line and key:

- an image that is not `registry/name:exact-version` (no tag, latest/release, no x.y.z), or not in the lock;
- a service without `pull_policy: never` (images are baked and loaded; a booted VM never pulls), without a restart
  policy, or without a healthcheck. The healthcheck rule: every service declares `healthcheck.test` itself, even
  where the image has a HEALTHCHECK, because `docker compose up --wait` and the VM tests judge the stack by it and
  a stand-in image must answer the same check; `disable: true` is refused;
- a published port that the definition's `ports` (the role's firewall matrix) does not list, a random host port,
  and `network_mode: host` (it would publish everything);
- a bind mount outside the role's data volumes, its `/etc/homelab` files (read-only) and its own baked files; a
  read-write mount of a read-only volume; a named or anonymous volume (on the image's disk: lost at a swap);
- a secret-looking variable set in compose.yaml (it would be baked), an interpolated variable other than the
  runtime ones (RUNTIME_VARIABLES);
- an env file not written at boot for the role (ENV_FILES) or written for the VM's own units only (the backup's),
  a secret that env file needs missing from the secrets, or one failing its rule (SECRET_RULES: the DB password
  needs >= 20 characters of A-Za-z0-9, Immich's rule);
- a zone named by the definition's ports that the site file does not define.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .definition import ImageDefinition
from .errors import DefinitionError
from .lock import LOCK_NAME, Lock, check_no_unknown_images, display, image_problem, load_lock
from .site import Site
from .yamlload import KeyPath, Located, dotted, load_located

RESTART_POLICIES = ("unless-stopped", "always")
# Variables a stack may interpolate: values that exist only on the running VM. homelab-stack-prepare writes them
# to /run/homelab/stack.env, which homelab-stack.service passes with `docker compose --env-file`.
RUNTIME_VARIABLES = {"RENDER_GID": "the render group's GID, dynamic on Debian 13"}
# Variable names that hold secrets: never set in compose.yaml, which is baked into the image.
SECRET_VARIABLE = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|PRIVATE_KEY|API_KEY|CREDENTIAL")
# Host files of the VM a stack may bind, read-only: the clock, and cloud-init's per-host files (a directory).
HOST_FILES = ("/etc/localtime", "/etc/homelab/")


@dataclass(frozen=True)
class SecretRule:
    min_length: int = 1
    pattern: str | None = None
    why: str = ""


@dataclass(frozen=True)
class EnvFile:
    """An env file written at boot by cloud-init (root:root 0600) from the secrets file, read by the stack or a unit."""

    path: str
    role: str
    # variable in the file -> the secret (secrets file `<role>.NAME` or `common.NAME`) that gives its value
    secrets: Mapping[str, str]
    # variables with fixed values, kept beside the secrets so that every reader of the file agrees on them
    constants: Mapping[str, str] = field(default_factory=dict)
    # False for a file only a baked systemd unit reads (the backup's): no container may read it, so a secret that
    # is not the stack's (the restic password) never enters a container's environment.
    stack: bool = True


# The one table of what each role's stack and units read at boot. Immich's server and its database read the same
# file, so they cannot disagree on the password, user or database (the original stack gave the server no password).
ENV_FILES: tuple[EnvFile, ...] = (
    EnvFile(
        "/etc/homelab/immich.env", "intranet",
        secrets={"DB_PASSWORD": "DB_PASSWORD", "POSTGRES_PASSWORD": "DB_PASSWORD"},
        constants={"DB_USERNAME": "immich", "DB_DATABASE_NAME": "immich",
                   "POSTGRES_USER": "immich", "POSTGRES_DB": "immich"},
    ),
    EnvFile(
        "/etc/homelab/grafana.env", "intranet",
        secrets={"GF_SECURITY_ADMIN_PASSWORD": "GRAFANA_ADMIN_PASSWORD"},
        constants={"GF_SECURITY_ADMIN_USER": "admin"},
    ),
    EnvFile(
        "/etc/homelab/npm.env", "extranet",
        secrets={"INITIAL_ADMIN_EMAIL": "NPM_ADMIN_EMAIL", "INITIAL_ADMIN_PASSWORD": "NPM_ADMIN_PASSWORD"},
    ),
    # The restic backups (images/files/intranet/homelab-backup*): the repository is on the backups volume, the
    # password arrives at boot like every secret; the keep policy of `forget` sits here so it is changed in one place.
    EnvFile(
        "/etc/homelab/backup.env", "intranet",
        secrets={"RESTIC_PASSWORD": "RESTIC_PASSWORD"},
        constants={"RESTIC_REPOSITORY": "/srv/backups/restic", "HOMELAB_BACKUP_KEEP_DAILY": "7",
                   "HOMELAB_BACKUP_KEEP_WEEKLY": "4", "HOMELAB_BACKUP_KEEP_MONTHLY": "6"},
        stack=False,
    ),
)
SECRET_RULES: Mapping[str, SecretRule] = {
    "DB_PASSWORD": SecretRule(20, r"[A-Za-z0-9]+", "Immich requires a database password of A-Za-z0-9 only"),
    "GRAFANA_ADMIN_PASSWORD": SecretRule(12),
    "NPM_ADMIN_PASSWORD": SecretRule(12),
    "NPM_ADMIN_EMAIL": SecretRule(3, r"[^@\s]+@[^@\s]+\.[^@\s]+", "Nginx Proxy Manager logs in with an email address"),
    # /etc/ddclient.conf (builder/ddclient.py): ddclient ends a login at whitespace or a comma and refuses whitespace
    # in a password (which it reads single-quoted, so quotes are refused for every secret already).
    "OVH_DYNHOST_LOGIN": SecretRule(3, r"[A-Za-z0-9._@-]+", "an OVH DynHost login is like example.org-home: "
                                                            "letters, digits and . _ @ - only"),
    "OVH_DYNHOST_PASSWORD": SecretRule(8, r"\S+", "ddclient cannot read a password with whitespace"),
    # The repository key is derived from it: whoever reads the backups' disk must not be able to guess it.
    "RESTIC_PASSWORD": SecretRule(20),
}


def env_files(role: str) -> dict[str, EnvFile]:
    """Every env file cloud-init writes for the role (its stack's and its units')."""
    return {f.path: f for f in ENV_FILES if f.role == role}


def stack_env_files(role: str) -> dict[str, EnvFile]:
    """The env files the role's compose stack may read."""
    return {path: f for path, f in env_files(role).items() if f.stack}


def required_secrets(role: str) -> list[str]:
    """Secret names the role's env files need, in table order, each once."""
    names: list[str] = []
    for env_file in env_files(role).values():
        names.extend(name for name in env_file.secrets.values() if name not in names)
    return names


def merged_secrets(role: str, secrets: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """common, then the role's (which wins), as cloud-init writes them."""
    return {**secrets.get("common", {}), **secrets.get(role, {})}


def secret_problem(name: str, value: str) -> str | None:
    """Why a secret's value is refused (never quoting the value), or None."""
    if "'" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "must be one line without single quotes or control characters (env files quote values with ')"
    rule = SECRET_RULES.get(name, SecretRule())
    if len(value) < rule.min_length:
        return f"too weak: {len(value)} characters, at least {rule.min_length} needed"
    if rule.pattern and not re.fullmatch(rule.pattern, value):
        return f"not accepted: {rule.why}"
    return None


def role_env_files(role: str, secrets: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """Path -> content of every env file the role reads, as cloud-init must write them (root:root 0600).

    Values are single-quoted, which docker compose reads literally (no interpolation, no escapes).
    """
    merged = merged_secrets(role, secrets)
    files: dict[str, str] = {}
    for path, env_file in env_files(role).items():
        lines = [f"{name}='{value}'\n" for name, value in env_file.constants.items()]
        for variable, secret in env_file.secrets.items():
            if secret not in merged:
                raise DefinitionError(f"secrets: {role}.{secret}: missing: {path} needs it")
            problem = secret_problem(secret, merged[secret])
            if problem:
                raise DefinitionError(f"secrets: {role}.{secret}: {problem}")
            lines.append(f"{variable}='{merged[secret]}'\n")
        files[path] = "".join(lines)
    return files


# Where cloud-init writes, on the VM running Prometheus, the other VMs' node_exporter targets (file_sd_configs in
# compose/intranet/prometheus/prometheus.yml; addresses are site facts, never baked).
PROMETHEUS_TARGETS = "/etc/homelab/prometheus/nodes.json"
# The role whose stack runs Prometheus.
PROMETHEUS_SCRAPER = "intranet"
NODE_EXPORTER_PORT = 9100


def prometheus_node_targets(site: Site, scraper: str = PROMETHEUS_SCRAPER) -> str:
    """The file_sd JSON listing every other host's node_exporter (the scraper's own is in prometheus.yml)."""
    groups = [
        {"targets": [f"{host.address.split('/')[0]}:{NODE_EXPORTER_PORT}"], "labels": {"instance": role, "role": role}}
        for role, host in sorted(site.hosts.items())
        if role != scraper
    ]
    return json.dumps(groups, indent=2) + "\n"


# --- the check ---------------------------------------------------------------------------------------------------


@dataclass
class _Stack:
    project: Path
    definition: ImageDefinition
    doc: Located
    directory: Path
    secrets: dict[str, str] | None
    raw_secrets: Mapping[str, Mapping[str, str]]
    secrets_source: str

    @property
    def role(self) -> str:
        return self.definition.role

    def error(self, keypath: KeyPath, message: str) -> DefinitionError:
        return DefinitionError(f"{self.doc.where(keypath)}: {dotted(keypath)}: {message}")


def check_stack(
    project: Path,
    definition: ImageDefinition,
    site: Site | None,
    secrets: Mapping[str, Mapping[str, str]] | None,
    lock: Lock | None = None,
    *,
    secrets_source: str = "secrets file",
    require_lock: bool = True,
) -> Lock | None:
    """Raise DefinitionError (one line: file:line: key: what) at the first problem of the role's stack; the lock it
    checked the stack against (None without one).

    `secrets` is the secrets file's mapping (common and roles), named `secrets_source` in errors; None skips the
    secrets (a build has none: they arrive at boot). `site` None skips the zones. `lock` None reads the stack's
    images.lock.json, which must exist unless `require_lock` is false (rendering cloud-init needs no lock).
    A role without a compose stack has nothing to check.
    """
    if not definition["compose"]:
        return None
    directory = project / definition["compose"]
    compose_path = directory / "compose.yaml"
    doc = load_located(compose_path)
    doc.path = Path(display(compose_path, project))
    merged = None if secrets is None else merged_secrets(definition.role, secrets)
    stack = _Stack(project, definition, doc, directory, merged, secrets or {}, secrets_source)
    services = doc.data.get("services") if isinstance(doc.data, dict) else None
    if not isinstance(services, dict) or not services:
        raise stack.error(("services",), "expected a mapping of services")
    for name, service in services.items():
        keypath = ("services", name)
        if not isinstance(service, dict):
            raise stack.error(keypath, f"expected a mapping, got {service!r}")
        _check_service(stack, keypath, service)
    _check_interpolation(stack, doc.data, ())
    if site is not None:
        _check_zones(definition, site)
    return _check_lock(stack, services, lock, require_lock)


def _got(service: dict[str, Any], key: str) -> str:
    return f"got {service[key]!r}" if key in service else "missing"


def _check_service(stack: _Stack, keypath: KeyPath, service: dict[str, Any]) -> None:
    if "image" not in service:
        raise stack.error((*keypath, "image"), "missing: every service runs a baked image (nothing is built on "
                                               "the VM)")
    problem = image_problem(service["image"])
    if problem:
        raise stack.error((*keypath, "image"), problem)
    if service.get("pull_policy") != "never":
        raise stack.error((*keypath, "pull_policy"),
                          f"must be 'never' (images are baked and loaded; a booted VM never pulls): "
                          f"{_got(service, 'pull_policy')}")
    if service.get("restart") not in RESTART_POLICIES:
        raise stack.error((*keypath, "restart"),
                          f"expected one of {', '.join(RESTART_POLICIES)}: {_got(service, 'restart')}")
    _check_healthcheck(stack, keypath, service.get("healthcheck"))
    if service.get("network_mode") == "host":
        raise stack.error((*keypath, "network_mode"),
                          "host networking would publish every port the container opens: publish ports instead")
    for i, entry in enumerate(service.get("ports") or []):
        _check_port(stack, (*keypath, "ports", i), entry)
    for i, entry in enumerate(service.get("volumes") or []):
        _check_volume(stack, (*keypath, "volumes", i), entry)
    _check_environment(stack, (*keypath, "environment"), service.get("environment"))
    env_file = service.get("env_file")
    entries = env_file if isinstance(env_file, list) else [] if env_file is None else [env_file]
    for i, entry in enumerate(entries):
        _check_env_file(stack, (*keypath, "env_file", i) if isinstance(env_file, list) else (*keypath, "env_file"),
                        entry)


def _check_healthcheck(stack: _Stack, keypath: KeyPath, healthcheck: Any) -> None:
    where = (*keypath, "healthcheck")
    if not isinstance(healthcheck, dict):
        raise stack.error(where, "missing: every service declares healthcheck.test (docker compose up --wait and "
                                 "the VM tests judge the stack by it)")
    if healthcheck.get("disable"):
        raise stack.error((*where, "disable"), "a disabled healthcheck: every service must have one")
    test = healthcheck.get("test")
    if not test or (isinstance(test, list) and test[0] == "NONE"):
        raise stack.error((*where, "test"), f"expected a command (CMD or CMD-SHELL), got {test!r}")


# --- ports --------------------------------------------------------------------------------------------------


def _port_numbers(stack: _Stack, keypath: KeyPath, text: str) -> list[int]:
    match = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", text)
    if match is None:
        raise stack.error(keypath, f"expected a literal host port like 8096, got {text!r}")
    first = int(match[1])
    last = int(match[2]) if match[2] else first
    if not 1 <= first <= last <= 65535:
        raise stack.error(keypath, f"invalid port range {text!r}")
    return list(range(first, last + 1))


def _published(stack: _Stack, keypath: KeyPath, entry: Any) -> tuple[list[int], str]:
    """Host ports and protocol a `ports:` entry publishes (short or long syntax)."""
    if isinstance(entry, dict):
        proto = str(entry.get("protocol", "tcp"))
        published = entry.get("published")
        if published is None or published == "":
            raise stack.error(keypath, f"publishes {entry.get('target')} on a random host port: publish an "
                                       "explicit port")
        return _port_numbers(stack, keypath, str(published)), proto
    if isinstance(entry, bool) or not isinstance(entry, str | int):
        raise stack.error(keypath, f"expected 'HOST:CONTAINER' or a mapping, got {entry!r}")
    text, proto = str(entry), "tcp"
    if "/" in text:
        text, proto = text.rsplit("/", 1)
    if text.startswith("["):  # [IPv6]:host:container
        end = text.find("]:")
        if end < 0:
            raise stack.error(keypath, f"cannot read {entry!r}")
        text = text[end + 2 :]
        parts = ["", *text.split(":")]
    else:
        parts = text.split(":")
    if len(parts) == 1 or (len(parts) in (2, 3) and not parts[-2]):
        raise stack.error(keypath, f"{entry!r} publishes on a random host port: publish an explicit port")
    if len(parts) not in (2, 3):
        raise stack.error(keypath, f"cannot read {entry!r} (expected [IP:]HOST:CONTAINER[/PROTO])")
    return _port_numbers(stack, keypath, parts[-2]), proto


def _check_port(stack: _Stack, keypath: KeyPath, entry: Any) -> None:
    ports, proto = _published(stack, keypath, entry)
    if proto not in ("tcp", "udp"):
        raise stack.error(keypath, f"protocol {proto!r}: expected tcp or udp")
    allowed = {(p["port"], p["proto"]) for p in stack.definition["ports"]}
    for port in ports:
        if (port, proto) not in allowed:
            matrix = ", ".join(f"{p['port']}/{p['proto']}" for p in stack.definition["ports"]) or "none"
            definition = display(stack.definition.path, stack.project)
            raise stack.error(keypath, f"publishes {port}/{proto}, which {definition} ports does not list (the "
                                       f"role's firewall matrix: {matrix})")


# --- volumes ------------------------------------------------------------------------------------------------


def _check_volume(stack: _Stack, keypath: KeyPath, entry: Any) -> None:
    if isinstance(entry, dict):
        kind = entry.get("type")
        if kind == "tmpfs":
            return
        if kind != "bind":
            raise stack.error(keypath, f"a docker volume (type: {kind}) lives on the image's disk and is lost at "
                                       "the next swap: bind a path under a data volume")
        source, read_only = str(entry.get("source", "")), bool(entry.get("read_only", False))
    elif isinstance(entry, str):
        parts = entry.split(":")
        if len(parts) == 1:
            raise stack.error(keypath, f"{entry!r} is an anonymous volume on the image's disk (lost at the next "
                                       "swap): bind a path under a data volume")
        source = parts[0]
        read_only = len(parts) > 2 and "ro" in parts[2].split(",")
    else:
        raise stack.error(keypath, f"expected 'SOURCE:TARGET[:ro]' or a mapping, got {entry!r}")
    _check_bind(stack, keypath, source, read_only)


def _check_bind(stack: _Stack, keypath: KeyPath, source: str, read_only: bool) -> None:
    if source.startswith("."):
        baked = (stack.directory / source).resolve()
        inside = baked == stack.directory.resolve() or stack.directory.resolve() in baked.parents
        if not inside or not baked.exists():
            raise stack.error(keypath, f"{source!r} is not a file or directory of the stack (only the stack's own "
                                       "baked files may be bound by relative path)")
        return
    if not source.startswith("/"):
        raise stack.error(keypath, f"{source!r} is a named volume on the image's disk (lost at the next swap): "
                                   "bind a path under a data volume")
    path = posixpath.normpath(source)
    for volume in stack.definition["volumes"]:
        mount = volume["mount"]
        if path == mount or path.startswith(mount.rstrip("/") + "/"):
            if volume["read_only"] and not read_only:
                raise stack.error(keypath, f"{source} is on volume {volume['name']}, read-only in this VM: mount "
                                           "it read-only (:ro)")
            return
    if any(path == f.rstrip("/") or (f.endswith("/") and path.startswith(f)) for f in HOST_FILES):
        if not read_only:
            raise stack.error(keypath, f"{source} is the host's: mount it read-only (:ro)")
        return
    mounts = ", ".join(v["mount"] for v in stack.definition["volumes"]) or "none"
    raise stack.error(keypath, f"{source} is on the image's disk (lost at the next swap): bind a path under a data "
                               f"volume ({mounts}) or a file baked with the stack")


# --- environment and secrets ---------------------------------------------------------------------------------


def _environment_names(environment: Any) -> Iterator[tuple[Any, str]]:
    if isinstance(environment, dict):
        for name in environment:
            yield name, str(name)
    elif isinstance(environment, list):
        for i, item in enumerate(environment):
            yield i, str(item).split("=", 1)[0]


def _check_environment(stack: _Stack, keypath: KeyPath, environment: Any) -> None:
    for key, name in _environment_names(environment):
        if SECRET_VARIABLE.search(name.upper()):
            raise stack.error((*keypath, key), f"{name} looks like a secret: compose.yaml is baked into the image, "
                                               "so secrets come from an env file written at boot (ENV_FILES)")


def _check_env_file(stack: _Stack, keypath: KeyPath, entry: Any) -> None:
    path = entry.get("path") if isinstance(entry, dict) else entry
    if not isinstance(path, str):
        raise stack.error(keypath, f"expected a path, got {entry!r}")
    if not path.startswith("/"):
        baked = stack.directory / path
        if not baked.is_file():
            raise stack.error(keypath, f"{path!r}: no such file in the stack")
        for line in baked.read_text(encoding="utf-8").splitlines():
            name = line.split("=", 1)[0].strip()
            if "=" in line and not name.startswith("#") and SECRET_VARIABLE.search(name.upper()):
                raise stack.error(keypath, f"{path} sets {name}, which looks like a secret: baked files hold none")
        return
    known = stack_env_files(stack.role)
    env_file = known.get(path)
    if env_file is None:
        names = ", ".join(known) or "none"
        if path in env_files(stack.role):
            raise stack.error(keypath, f"{path} is read by the VM's own units, never by a container (the stack's "
                                       f"env files: {names})")
        raise stack.error(keypath, f"{path} is not written at boot for {stack.role} (its env files: {names})")
    if stack.secrets is not None:
        for secret in dict.fromkeys(env_file.secrets.values()):
            _check_secret(stack, keypath, env_file, secret)


def _check_secret(stack: _Stack, keypath: KeyPath, env_file: EnvFile, secret: str) -> None:
    in_role = secret in stack.raw_secrets.get(stack.role, {})
    section = stack.role if in_role or secret not in stack.raw_secrets.get("common", {}) else "common"
    reader = f"{env_file.path} needs it ({stack.doc.where(keypath)}: {dotted(keypath)})"
    value = (stack.secrets or {}).get(secret)
    if value is None:
        raise DefinitionError(f"{stack.secrets_source}: {section}.{secret}: missing: {reader}")
    problem = secret_problem(secret, value)
    if problem:
        raise DefinitionError(f"{stack.secrets_source}: {section}.{secret}: {problem} ({env_file.path})")


# --- interpolation ---------------------------------------------------------------------------------------------

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_VARIABLE = re.compile(rf"\$(?:\{{(?P<braced>{_NAME})(?:[:?+-][^}}]*)?\}}|(?P<plain>{_NAME}))")


def interpolated(text: str) -> list[str]:
    """Variables docker compose would interpolate in `text` ($$ is a literal $); a malformed one as '$...'."""
    names, i = [], 0
    while (j := text.find("$", i)) >= 0:
        if text.startswith("$$", j):
            i = j + 2
            continue
        match = _VARIABLE.match(text, j)
        if match is None:
            names.append(text[j : j + 12])
            i = j + 1
            continue
        names.append(match["braced"] or match["plain"])
        i = match.end()
    return names


def _check_interpolation(stack: _Stack, node: Any, keypath: KeyPath) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _check_interpolation(stack, value, (*keypath, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_interpolation(stack, value, (*keypath, i))
    elif isinstance(node, str):
        for name in interpolated(node):
            if name not in RUNTIME_VARIABLES:
                allowed = "; ".join(f"{k}: {v}" for k, v in RUNTIME_VARIABLES.items())
                raise stack.error(keypath, f"interpolates {name}: only the values resolved on the running VM may be "
                                           f"({allowed}); secrets come from env files, the rest is literal ($$ "
                                           "for a literal $)")


# --- zones and lock --------------------------------------------------------------------------------------------


def _check_zones(definition: ImageDefinition, site: Site) -> None:
    for i, port in enumerate(definition["ports"]):
        for zone in port["from"]:
            if zone not in site.zones:
                raise DefinitionError(
                    f"{site.path}: zones.{zone}: missing: {definition.path.name} ports[{i}].from opens "
                    f"{port['port']}/{port['proto']} to it"
                )


def _check_lock(stack: _Stack, services: dict[str, Any], lock: Lock | None, require_lock: bool) -> Lock | None:
    images = {name: service["image"] for name, service in services.items()}
    if lock is None:
        path = stack.directory / LOCK_NAME
        if not path.is_file() and not require_lock:
            return None
        if not path.is_file():
            raise DefinitionError(
                f"{display(stack.directory, stack.project)}: no lock file: run `homelab lock {stack.role}`"
            )
        lock = load_lock(path, images.values(), project=stack.project, role=stack.role)
    else:
        check_no_unknown_images(lock, images.values(), project=stack.project, role=stack.role)
    for name, image in images.items():
        if image not in lock:
            raise stack.error(("services", name, "image"), f"{image} is not in {display(lock.path, stack.project)}: "
                                                           f"run `homelab lock {stack.role}`")
    return lock
