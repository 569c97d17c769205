"""A real container registry on loopback, and the registries.conf that sends the real names to it.

`LoopbackRegistry` runs Debian's `docker-registry` (distribution 2.8) on 127.0.0.1 with a free port and its own
storage, for as long as the `with` block lasts. Images are pushed to it under `127.0.0.1:PORT/<registry>/<path>`
(`location(image)`), and `registries_conf` is a containers-registries.conf(5) that rewrites each real registry the
stacks name (docker.io, ghcr.io) to that location, so `skopeo --registries-conf FILE inspect
docker://ghcr.io/immich-app/immich-server:v3.4.0` is answered by the loopback registry and never by ghcr.io.

The form that works with Debian's skopeo 1.9 (checked by tests/integration/test_standins.py):

    [[registry]]
    prefix = "ghcr.io"
    location = "127.0.0.1:PORT/ghcr.io"
    insecure = true

- a location rewrite, not a `[[registry.mirror]]`: with a mirror, any failure on it (e.g. `--tls-verify=true`)
  falls back to the real registry; a rewrite has no fallback, so a test can never pass against the internet;
- the file is given with skopeo's global `--registries-conf` option (builder.lock.skopeo_argv): skopeo 1.9
  ignores the CONTAINERS_REGISTRIES_CONF environment variable;
- `insecure = true` lets skopeo speak plain HTTP to it, unless the command forces `--tls-verify=true`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from builder.lock import skopeo_inspect
from builder.runner import run, start

HOST = "127.0.0.1"
# The registries the stacks' images come from (compose/*/compose.yaml); tests/unit/test_standins.py checks it.
REAL_REGISTRIES = ("docker.io", "ghcr.io")
# Debian packages the stand-ins need: the registry, the copier, and a static busybox for the images' rootfs.
PACKAGES = {"docker-registry": "docker-registry", "skopeo": "skopeo", "busybox": "busybox-static"}
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class RegistryError(RuntimeError):
    pass


def registry_of(image: str) -> str:
    """ghcr.io/immich-app/immich-server:v3.4.0 -> ghcr.io (the names here always name their registry)."""
    return image.split("/", 1)[0]


def ensure_packages() -> None:
    """apt-get install the Debian packages whose program is missing (as root; setup.sh installs them too)."""
    missing = [package for program, package in PACKAGES.items() if shutil.which(program) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise RegistryError(f"missing Debian packages {', '.join(missing)}: run ./setup.sh (as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env, timeout=900)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def registries_conf_text(address: str, registries: Sequence[str] = REAL_REGISTRIES) -> str:
    lines = [
        "# containers-registries.conf(5) written by tests/standins: each real registry is served by the loopback",
        f"# registry at {address}, under its own name; there is no fallback to the real one.",
        "unqualified-search-registries = []",
    ]
    for registry in registries:
        lines += ["", "[[registry]]", f'prefix = "{registry}"', f'location = "{address}/{registry}"',
                  "insecure = true"]
    return "\n".join(lines) + "\n"


def registry_config_text(address: str, storage: Path) -> str:
    # distribution's configuration is YAML; JSON is YAML.
    return (
        "version: 0.1\n"
        "log: {level: warn, accesslog: {disabled: true}}\n"
        f"storage: {{filesystem: {{rootdirectory: \"{storage}\"}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: \"{address}\", secret: \"homelab-standins\"}}\n"
    )


class LoopbackRegistry:
    """`with LoopbackRegistry(workdir) as registry:` a registry on 127.0.0.1:registry.port until the block ends.

    `workdir` (created if missing; a temporary directory, removed at exit, when None) holds the registry's
    configuration, storage and log (`registry.log`), and `registries.conf`.
    """

    def __init__(self, workdir: Path | None = None, registries: Sequence[str] = REAL_REGISTRIES) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="homelab-registry.")) if workdir is None else workdir
        self.registries = tuple(registries)
        self.port = 0
        self.registries_conf = self.workdir / "registries.conf"
        self.log_path = self.workdir / "registry.log"
        self._proc: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def location(self, image: str) -> str:
        """Where the registries.conf sends a real name: 127.0.0.1:PORT/ghcr.io/immich-app/immich-server:v3.4.0."""
        if registry_of(image) not in self.registries:
            raise RegistryError(f"{image}: registry {registry_of(image)} is not served here ({self.registries})")
        return f"{self.address}/{image}"

    def inspect(self, image: str) -> dict[str, Any]:
        """builder.lock.skopeo_inspect of a real name, through this registry's registries.conf."""
        return skopeo_inspect(image, registries_conf=self.registries_conf)

    # --- lifetime ---------------------------------------------------------------------------------------------

    def __enter__(self) -> LoopbackRegistry:
        ensure_packages()
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _start(self) -> None:
        storage = self.workdir / "storage"
        storage.mkdir(exist_ok=True)
        for _attempt in range(3):  # another program may take the free port before the registry binds it
            self.port = free_port()
            config = self.workdir / "config.yml"
            config.write_text(registry_config_text(self.address, storage))
            self._log = self.log_path.open("a", encoding="utf-8")
            self._proc = start(["docker-registry", "serve", config], stdout=self._log, stderr=subprocess.STDOUT)
            if self._wait_ready():
                self.registries_conf.write_text(registries_conf_text(self.address, self.registries))
                return
            self._kill()
            if "address already in use" not in self.log_path.read_text(errors="replace"):
                break
        tail = " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-5:])
        raise RegistryError(f"docker-registry did not answer on http://{self.address}/v2/: {tail}")

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        # Straight to loopback, whatever http_proxy says.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with opener.open(f"http://{self.address}/v2/", timeout=2) as answer:
                    if answer.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """Stop the registry; remove the work directory if it was a temporary one of ours."""
        self._kill()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _kill(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; only the process this object started."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
