"""Container images for tests without the internet: stand-ins under the real names, from a registry on loopback.

    with serve_standins(tmp / "standins", project=copy_project(tmp / "project")) as served:
        # served.registry.registries_conf: give it to `homelab build` (HOMELAB_REGISTRIES_CONF) or skopeo
        # served.locks["intranet"]: the copy's compose/intranet/images.lock.json, pinning the stand-ins
        ...

- registry.py: `LoopbackRegistry`, Debian's docker-registry on 127.0.0.1 and a registries.conf rewriting
  docker.io and ghcr.io to it;
- images.py: `CATALOG` (one stand-in per image of compose/*/compose.yaml), `build_standins` (docker-archive
  tarballs written by hand from busybox-static), `push_standins` (push, then lock the real names through the
  registries.conf with builder.lock, as `homelab lock` does).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from builder.lock import LockEntry, lock_role

from .images import CATALOG, Archive, StandIn, build_standins, push_standins
from .registry import LoopbackRegistry, ensure_packages

PROJECT = Path(__file__).resolve().parents[2]
ROLES = ("intranet", "extranet")
# Not copied into a test's copy of the project: version control, environments, outputs, caches.
NOT_COPIED = (".git", ".venv", "build", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "*.egg-info")

__all__ = [
    "CATALOG",
    "PROJECT",
    "ROLES",
    "Archive",
    "LoopbackRegistry",
    "Served",
    "StandIn",
    "build_standins",
    "copy_project",
    "lock_roles",
    "push_standins",
    "serve_standins",
]


@dataclass
class Served:
    registry: LoopbackRegistry
    archives: dict[str, Archive]  # real name -> the docker-archive built here
    entries: dict[str, LockEntry]  # real name -> what the registry serves for it (as `homelab lock` resolves it)
    locks: dict[str, Path] = field(default_factory=dict)  # role -> the lock file written in the project copy


def copy_project(dest: Path, source: Path = PROJECT) -> Path:
    """A copy of the checkout to lock and build in (the checkout's own compose/ is never written)."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(*NOT_COPIED), symlinks=True)
    return dest


def lock_roles(project: Path, registry: LoopbackRegistry, roles: Sequence[str] = ROLES) -> dict[str, Path]:
    """builder.lock.lock_role of each role through the registry's registries.conf; role -> lock file."""
    if project.resolve() == PROJECT:
        raise ValueError(f"{project}: lock a copy of the project (copy_project), never the checkout")
    return {role: lock_role(project, role, registry.inspect) for role in roles}


@contextmanager
def serve_standins(
    workdir: Path, project: Path | None = None, roles: Sequence[str] = ROLES
) -> Iterator[Served]:
    """The registry running with every stand-in pushed; given a project copy, its roles locked against it.

    workdir holds the archives (workdir/archives) and the registry (workdir/registry, with its registries.conf).
    The registry stops when the block ends.
    """
    ensure_packages()
    archives = build_standins(workdir / "archives")
    with LoopbackRegistry(workdir / "registry") as registry:
        served = Served(registry, archives, push_standins(registry, archives))
        if project is not None:
            served.locks = lock_roles(project, registry, roles)
        yield served
