"""Where things are: the project checkout, outputs, caches, mirrors. Overridable from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MIRROR = "http://deb.debian.org/debian"
# The default security mirror (security.debian.org) is not always reachable; Debian's archive host
# serves the same suite.
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"


@dataclass(frozen=True)
class Settings:
    project: Path
    build_dir: Path
    cache_dir: Path
    mirror: str
    security_mirror: str
    # containers-registries.conf(5) for fetching container images (a mirror); None: the registries themselves.
    registries_conf: Path | None = None

    def role_dir(self, role: str) -> Path:
        return self.build_dir / role

    def site_path(self, given: Path | None = None) -> Path:
        """The site file: given, else $HOMELAB_SITE, else site.yaml in the project."""
        return given or Path(os.environ.get("HOMELAB_SITE") or self.project / "site.yaml")

    def secrets_path(self, given: Path | None = None) -> Path | None:
        """The secrets file: given, else $HOMELAB_SECRETS, else secrets.yaml in the project if it exists."""
        if given is not None:
            return given
        if os.environ.get("HOMELAB_SECRETS"):
            return Path(os.environ["HOMELAB_SECRETS"])
        default = self.project / "secrets.yaml"
        return default if default.exists() else None


def default_project() -> Path:
    """The checkout this package lives in (the tool always works on its own repository)."""
    return Path(__file__).resolve().parent.parent


def load_settings(project: Path | None = None) -> Settings:
    root = Path(os.environ.get("HOMELAB_PROJECT") or project or default_project()).resolve()
    build = Path(os.environ.get("HOMELAB_BUILD_DIR") or root / "build").resolve()
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache = Path(os.environ.get("HOMELAB_CACHE_DIR") or cache_home / "homelab").resolve()
    return Settings(
        project=root,
        build_dir=build,
        cache_dir=cache,
        mirror=os.environ.get("HOMELAB_MIRROR", DEFAULT_MIRROR),
        security_mirror=os.environ.get("HOMELAB_SECURITY_MIRROR", DEFAULT_SECURITY_MIRROR),
        registries_conf=Path(os.environ["HOMELAB_REGISTRIES_CONF"]) if os.environ.get("HOMELAB_REGISTRIES_CONF")
        else None,
    )
