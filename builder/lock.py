"""Image lock files: every container image of a role's stack pinned to what the registry serves.

`compose/<role>/compose.yaml` names each image `registry/name:exact-version`; `images.lock.json` beside it (written
by `homelab lock ROLE`, baked with the stack) maps each of those names to

- `digest`: the registry's manifest digest for the tag, what `name@digest` pulls (for a multi-arch image, the
  manifest list's digest), which the build fetches;
- `config_digest`: the digest of the linux/amd64 image's config, which is the image ID `docker load` gives, so a
  booted VM can check that what it loaded is what was locked.

    {"images": {"docker.io/jellyfin/jellyfin:10.11.11": {"digest": "sha256:<64 hex>", "config_digest": "sha256:..."}}}

Resolving talks to registries through `skopeo inspect` (an injected `inspect` callable, so tests use fixtures).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .definition import load_role
from .errors import DefinitionError, LockError
from .runner import run
from .yamlload import load_located, read_input

LOCK_NAME = "images.lock.json"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# The platform the VMs run (Proxmox on x86-64): the image of a manifest list whose config is locked.
PLATFORM = ("linux", "amd64")
SKOPEO_TIMEOUT = 300.0

# registry/path:tag, the registry named (docker's rule: a first component with a dot or a port, or localhost).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_REGISTRY = rf"(?:{_LABEL}(?:\.{_LABEL})+(?::[0-9]+)?|{_LABEL}:[0-9]+|localhost(?::[0-9]+)?)"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
REFERENCE = re.compile(rf"(?P<name>{_REGISTRY}/{_COMPONENT}(?:/{_COMPONENT})*):(?P<tag>{_TAG})")
# Tags that move by design: never a pin.
MOVING_TAGS = {"latest", "release", "stable", "main", "master", "edge", "nightly", "dev", "beta", "lts", "current"}
# An exact version has three numeric parts somewhere in its tag: 10.11.11, v3.4.0, 14-vectorchord0.4.3-...
EXACT_VERSION = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+")

MANIFEST_LISTS = (
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
)

Inspect = Callable[[str], Mapping[str, Any]]


@dataclass(frozen=True)
class LockEntry:
    digest: str  # registry manifest digest of the tag (what name@digest pulls)
    config_digest: str  # image ID after `docker load` (digest of the linux/amd64 config)

    def as_json(self) -> dict[str, str]:
        return {"digest": self.digest, "config_digest": self.config_digest}


@dataclass(frozen=True)
class Lock:
    path: Path
    images: Mapping[str, LockEntry]

    def __contains__(self, image: object) -> bool:
        return image in self.images

    def __getitem__(self, image: str) -> LockEntry:
        return self.images[image]


def display(path: Path, project: Path | None = None) -> str:
    """A path as the user knows it: relative to the project when inside it."""
    if project is not None:
        try:
            return str(path.resolve().relative_to(project.resolve()))
        except ValueError:
            pass
    return str(path)


def image_problem(image: Any) -> str | None:
    """Why `image` is not a pinnable `registry/name:exact-version` reference, or None if it is one."""
    if not isinstance(image, str):
        return f"expected an image reference string, got {image!r}"
    if "$" in image:
        return f"{image!r}: an image reference must be literal (no ${{...}}): the lock pins exactly what it names"
    if "@" in image:
        return (f"{image!r}: name the image as name:tag only; its digest belongs in {LOCK_NAME} "
                "(docker load records no repository digest, so a name@digest reference would not find it)")
    match = REFERENCE.fullmatch(image)
    if match is None:
        first = image.split("/", 1)[0]
        if "/" not in image or not ("." in first or ":" in first or first == "localhost"):
            return (f"{image!r}: name the registry (docker.io/..., ghcr.io/...): the lock and registry mirrors "
                    "match full names")
        if ":" not in image.rsplit("/", 1)[-1]:
            return f"{image!r}: no tag: pin an exact version (name:x.y.z)"
        return f"{image!r}: expected registry/name:tag like docker.io/library/nginx:1.27.3"
    tag = match["tag"]
    if tag.lower() in MOVING_TAGS:
        return f"{image!r}: tag {tag!r} moves: pin an exact version (x.y.z)"
    if not EXACT_VERSION.search(tag):
        return f"{image!r}: tag {tag!r} is not an exact version (it has no x.y.z): pin one"
    return None


def repository(image: str) -> str:
    """docker.io/jellyfin/jellyfin:10.11.11 -> docker.io/jellyfin/jellyfin."""
    name, _, _tag = image.rpartition(":")
    return name


# --- reading and writing lock files ----------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def load_lock(
    path: Path, images: Iterable[str] | None = None, *, project: Path | None = None, role: str = "ROLE"
) -> Lock:
    """Read and validate a lock file; with `images` (the stack's), an image the stack does not use is an error."""
    shown = display(path, project)
    text = read_input(path, shown)
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise DefinitionError(f"{shown}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except ValueError as exc:
        raise DefinitionError(f"{shown}: invalid lock: {exc}") from None
    if not isinstance(data, dict) or set(data) != {"images"}:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DefinitionError(f"{shown}: expected {{\"images\": {{...}}}} at the top level, got {got}")
    table = data["images"]
    if not isinstance(table, dict):
        raise DefinitionError(f"{shown}: images: expected a mapping of image to digests, got {table!r}")
    entries: dict[str, LockEntry] = {}
    for image, entry in table.items():
        key = f"images[{json.dumps(image)}]"
        problem = image_problem(image)
        if problem:
            raise DefinitionError(f"{shown}: {key}: {problem}")
        if not isinstance(entry, dict):
            raise DefinitionError(f"{shown}: {key}: expected a mapping of digest and config_digest, got {entry!r}")
        for field in ("digest", "config_digest"):
            value = entry.get(field)
            if value is None:
                raise DefinitionError(f"{shown}: {key}.{field}: missing")
            if not isinstance(value, str) or not DIGEST.fullmatch(value):
                raise DefinitionError(f"{shown}: {key}.{field}: expected sha256:<64 lowercase hex>, got {value!r}")
        unknown = sorted(set(entry) - {"digest", "config_digest"})
        if unknown:
            raise DefinitionError(f"{shown}: {key}.{unknown[0]}: unknown key (known: config_digest, digest)")
        entries[image] = LockEntry(entry["digest"], entry["config_digest"])
    lock = Lock(path=path, images=entries)
    if images is not None:
        check_no_unknown_images(lock, images, project=project, role=role)
    return lock


def check_no_unknown_images(
    lock: Lock, images: Iterable[str], *, project: Path | None = None, role: str = "ROLE"
) -> None:
    """An image in the lock that the stack does not use means the lock is stale (or for another stack)."""
    wanted = set(images)
    for image in lock.images:
        if image not in wanted:
            raise DefinitionError(
                f"{display(lock.path, project)}: images[{json.dumps(image)}]: unknown image: the stack does not use "
                f"it (a stale lock: run `homelab lock {role}`)"
            )


def lock_text(entries: Mapping[str, LockEntry]) -> str:
    body = {"images": {image: entries[image].as_json() for image in sorted(entries)}}
    return json.dumps(body, indent=2) + "\n"


def write_lock(path: Path, entries: Mapping[str, LockEntry]) -> None:
    """Atomically: a temp file in the same directory, then os.replace(). World-readable: it is baked, not secret."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(lock_text(entries))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- resolving -------------------------------------------------------------------------------------------------


def images_in_compose(compose_path: Path) -> list[str]:
    """Every image a compose file names, sorted, each once. A service without `image:` is an error."""
    doc = load_located(compose_path)
    services = doc.data.get("services") if isinstance(doc.data, dict) else None
    if not isinstance(services, dict) or not services:
        raise DefinitionError(f"{doc.where(('services',))}: services: expected a mapping of services")
    images: set[str] = set()
    for name, service in services.items():
        image = service.get("image") if isinstance(service, dict) else None
        if not isinstance(image, str):
            raise DefinitionError(
                f"{doc.where(('services', name))}: services.{name}.image: expected an image reference (the stack "
                f"is never built on the VM), got {image!r}"
            )
        images.add(image)
    return sorted(images)


def resolve(image: str, inspect: Inspect) -> LockEntry:
    """The lock entry of one `registry/name:exact-version` from the registry, through `inspect`.

    `inspect(image)` returns `skopeo inspect`'s JSON (its `Digest`: the top-level manifest's digest) plus
    `ConfigDigest` (see skopeo_inspect).
    """
    problem = image_problem(image)
    if problem:
        raise DefinitionError(f"cannot lock {problem}")
    answer = inspect(image)
    digest, config = answer.get("Digest"), answer.get("ConfigDigest")
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise LockError(f"{image}: the registry gave no sha256 manifest digest (Digest: {digest!r})")
    if not isinstance(config, str) or not DIGEST.fullmatch(config):
        raise LockError(f"{image}: the registry gave no sha256 config digest (ConfigDigest: {config!r})")
    return LockEntry(digest=digest, config_digest=config)


def lock_path(project: Path, role: str) -> Path:
    definition = load_role(project, role)
    compose: str | None = definition["compose"]
    if not compose:
        raise DefinitionError(f"{definition.path}: compose: role {role} has no compose stack to lock")
    return project / compose / LOCK_NAME


def lock_role(project: Path, role: str, inspect: Inspect) -> Path:
    """Resolve every image of the role's stack and write its lock file; returns the lock's path."""
    path = lock_path(project, role)
    images = images_in_compose(path.parent / "compose.yaml")
    entries = {image: resolve(image, inspect) for image in images}
    write_lock(path, entries)
    return path


# --- skopeo ----------------------------------------------------------------------------------------------------


def _skopeo_json(argv: list[str], what: str) -> dict[str, Any]:
    result = run(argv, timeout=SKOPEO_TIMEOUT)
    try:
        data = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise LockError(f"{what}: skopeo did not answer JSON") from None
    if not isinstance(data, dict):
        raise LockError(f"{what}: skopeo answered {type(data).__name__}, not an object")
    return data


def platform_instance(manifest_list: Mapping[str, Any], image: str) -> str:
    """The digest of the linux/amd64 image in a manifest list or OCI index."""
    os_name, architecture = PLATFORM
    for entry in manifest_list.get("manifests") or []:
        platform = entry.get("platform") or {}
        if platform.get("os") == os_name and platform.get("architecture") == architecture:
            digest = entry.get("digest")
            if isinstance(digest, str) and DIGEST.fullmatch(digest):
                return digest
    raise LockError(f"{image}: the registry has no {os_name}/{architecture} image for this tag")


def is_manifest_list(manifest: Mapping[str, Any]) -> bool:
    return manifest.get("mediaType") in MANIFEST_LISTS or ("manifests" in manifest and "config" not in manifest)


def skopeo_argv(*args: str, registries_conf: Path | None = None) -> list[str]:
    """`skopeo [--registries-conf FILE] --override-os linux --override-arch amd64 ARGS...`: the VMs' platform.

    `registries_conf` replaces the system's containers-registries.conf(5) (e.g. one rewriting docker.io and ghcr.io
    to a mirror on loopback that serves stand-ins under the real names). It is given with skopeo's global
    `--registries-conf` option, never the CONTAINERS_REGISTRIES_CONF environment variable: Debian's skopeo 1.9
    ignores that variable and would silently ask the real registries.
    """
    os_name, architecture = PLATFORM
    conf = ["--registries-conf", str(registries_conf)] if registries_conf is not None else []
    return ["skopeo", *conf, "--override-os", os_name, "--override-arch", architecture, *args]


def skopeo_inspect(
    image: str, registries_conf: Path | None = None, tls_verify: bool | None = None
) -> dict[str, Any]:
    """`skopeo inspect docker://IMAGE`'s JSON plus "ConfigDigest": the linux/amd64 image's config digest.

    skopeo documents `Digest` as the top-level manifest's digest (a manifest list's for a multi-arch image) and the
    other values as those of the platform's image. The config digest comes from the raw manifests: the tag's (by
    that digest, so a tag moved meanwhile cannot mix two images), then, for a list, the linux/amd64 instance's.
    `registries_conf`: see skopeo_argv. `tls_verify` None leaves TLS to the registries configuration (a registry
    marked `insecure = true` there is spoken to over plain HTTP); True or False forces it, and True overrides
    `insecure = true`.
    """
    tls = [] if tls_verify is None else [f"--tls-verify={'true' if tls_verify else 'false'}"]
    base = skopeo_argv("inspect", *tls, registries_conf=registries_conf)
    info = _skopeo_json([*base, "--no-tags", f"docker://{image}"], image)
    digest = info.get("Digest")
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise LockError(f"{image}: skopeo gave no sha256 manifest digest (Digest: {digest!r})")
    repo = repository(image)
    manifest = _skopeo_json([*base, "--raw", f"docker://{repo}@{digest}"], image)
    if is_manifest_list(manifest):
        instance = platform_instance(manifest, image)
        manifest = _skopeo_json([*base, "--raw", f"docker://{repo}@{instance}"], image)
    config = manifest.get("config")
    config_digest = config.get("digest") if isinstance(config, dict) else None
    if not isinstance(config_digest, str) or not DIGEST.fullmatch(config_digest):
        raise LockError(f"{image}: the image manifest has no sha256 config digest (schema 1 images cannot be locked)")
    return {**info, "ConfigDigest": config_digest}
