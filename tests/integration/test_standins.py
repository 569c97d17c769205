"""Stand-in images served from a real registry on loopback, for real (marked `host`: local programs, no VM).

One module-wide setup: Debian's docker-registry on 127.0.0.1, every stand-in of tests/standins built and pushed,
and both roles of a copy of the project locked through the registries.conf by builder.lock (the code path of
`homelab lock ROLE --registries-conf FILE`). Then:

- the registries.conf sends the real names to the loopback registry, and never falls back to the real ones;
- each lock entry is what the registry serves (manifest digest) and what was built (config digest);
- fetching by digest through the registries.conf, as the image build does, gives the locked image back;
- each role's stand-ins, unpacked from what was fetched, run together in a network namespace of their own
  (chroots, the service names resolving to loopback as on compose's network), pass the stack's own compose
  healthchecks, answer their health endpoints, stop on SIGTERM, and then fail those healthchecks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.compose import env_files
from builder.errors import CommandFailedError
from builder.lock import LOCK_NAME, images_in_compose, load_lock, repository, skopeo_argv
from builder.runner import Result, run, start
from tests.standins import (
    CATALOG,
    PROJECT,
    ROLES,
    Served,
    copy_project,
    serve_standins,
)
from tests.standins.images import APPLETS, Http, archive_config_digest, extract_rootfs

pytestmark = pytest.mark.host

IMMICH = "ghcr.io/immich-app/immich-server:v3.4.0"
# Test values for the stacks' env files (never real secrets): long enough and alphanumeric for every rule.
TEST_SECRET = "StandinTestSecret0123456789"
HEALTHY_WITHIN = 20.0


@dataclass
class Setup:
    served: Served
    project: Path
    fetched: dict[str, Path]  # real name -> docker-archive fetched back by digest through the registries.conf
    workdir: Path


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("standins")
    project = copy_project(workdir / "project")
    checkout_locks = {role: _stat(PROJECT / "compose" / role / LOCK_NAME) for role in ROLES}
    with serve_standins(workdir, project=project) as served:
        fetched: dict[str, Path] = {}
        for image, entry in sorted(served.entries.items()):
            out = workdir / "fetched" / served.archives[image].path.name
            out.parent.mkdir(exist_ok=True)
            # What the image build runs (builder.build.fetch_image): by digest, under the real name.
            run(skopeo_argv("copy", "--quiet", f"docker://{repository(image)}@{entry.digest}",
                            f"docker-archive:{out}:{image}", registries_conf=served.registry.registries_conf),
                timeout=120)
            fetched[image] = out
        yield Setup(served, project, fetched, workdir)
    for role in ROLES:
        assert _stat(PROJECT / "compose" / role / LOCK_NAME) == checkout_locks[role], "the checkout's lock changed"


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_mtime_ns, info.st_size


def _compose(project: Path, role: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((project / "compose" / role / "compose.yaml").read_text())
    return data


# --- the registry and the lock ---------------------------------------------------------------------------------


def test_busybox_has_every_applet_the_standins_link() -> None:
    listed = set(run(["busybox", "--list"]).stdout.split())
    assert sorted(set(APPLETS) - listed) == []


def test_the_registries_conf_sends_the_real_names_to_the_loopback_registry(standins: Setup) -> None:
    registry = standins.served.registry
    answer = json.loads(run(["skopeo", "--registries-conf", str(registry.registries_conf), "inspect", "--no-tags",
                             f"docker://{IMMICH}"], timeout=60).stdout)
    assert answer["Digest"] == standins.served.entries[IMMICH].digest
    assert answer["Name"] == repository(IMMICH), "skopeo reports the real name"
    assert answer["Labels"]["homelab.standin"] == IMMICH, "... and what it got is the stand-in"


def test_there_is_no_fallback_to_the_real_registry(standins: Setup) -> None:
    # Forcing TLS makes the loopback registry unusable (it speaks plain HTTP): skopeo must fail on it, not go on
    # to ghcr.io as it would with a [[registry.mirror]].
    registry = standins.served.registry
    with pytest.raises(CommandFailedError) as failure:
        run(skopeo_argv("inspect", "--tls-verify=true", "--no-tags", f"docker://{IMMICH}",
                        registries_conf=registry.registries_conf), timeout=60)
    assert registry.address in str(failure.value)
    assert "ghcr.io/v2" not in str(failure.value)


def _served_manifest(address: str, image: str) -> tuple[str, dict[str, Any]]:
    """The registry's own answer for a tag: its Docker-Content-Digest and the manifest."""
    name, _, tag = image.rpartition(":")
    request = urllib.request.Request(
        f"http://{address}/v2/{name}/manifests/{tag}",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as answer:
        body = answer.read()
        digest = answer.headers["Docker-Content-Digest"]
    manifest: dict[str, Any] = json.loads(body)
    assert digest == "sha256:" + hashlib.sha256(body).hexdigest()
    return digest, manifest


@pytest.mark.parametrize("role", ROLES)
def test_lock_role_pins_each_image_to_what_the_registry_serves(standins: Setup, role: str) -> None:
    path = standins.served.locks[role]
    assert path == standins.project / "compose" / role / LOCK_NAME
    images = images_in_compose(path.parent / "compose.yaml")
    lock = load_lock(path, images, project=standins.project, role=role)
    assert sorted(lock.images) == images
    for image in images:
        digest, manifest = _served_manifest(standins.served.registry.address, image)
        assert lock[image].digest == digest, image
        built = standins.served.archives[image].config_digest
        assert lock[image].config_digest == manifest["config"]["digest"] == built, image
        assert len(manifest["layers"]) == 2


def test_fetching_by_digest_through_the_registries_conf_gives_the_locked_image(standins: Setup) -> None:
    for image, archive in standins.fetched.items():
        assert archive_config_digest(archive) == standins.served.entries[image].config_digest, image
        with tarfile.open(archive) as tar:
            handle = tar.extractfile("manifest.json")
            assert handle is not None
            assert json.load(handle)[0]["RepoTags"] == [image]


# --- the stand-ins running: one network namespace per role -----------------------------------------------------


@dataclass
class Container:
    """A stand-in run as docker would: its rootfs (from the fetched archive), entrypoint + command, env."""

    service: str
    root: Path
    env: dict[str, str]
    argv: list[str]
    proc: subprocess.Popen[str] | None = None
    log: Path | None = None


class Namespace:
    """A network namespace with only loopback, held by a sleeping busybox; programs enter it with nsenter."""

    def __init__(self) -> None:
        self.holder = start(["unshare", "--net", "--", "busybox", "sh", "-c", "ip link set lo up && exec sleep 600"])
        self.netns = f"/proc/{self.holder.pid}/ns/net"
        deadline = time.monotonic() + 5
        while not self._lo_up():
            assert time.monotonic() < deadline, "the namespace's loopback did not come up"
            time.sleep(0.05)

    def _lo_up(self) -> bool:
        result = run(["nsenter", f"--net={self.netns}", "busybox", "ip", "link", "show", "lo"], check=False)
        return "UP" in result.stdout.split(">")[0]

    def chroot_argv(self, container: Container, argv: list[str]) -> list[str]:
        env = [f"{key}={value}" for key, value in container.env.items()]
        return ["nsenter", f"--net={self.netns}", "--", "chroot", str(container.root), "/usr/bin/env", "-i", *env,
                *argv]

    def start(self, container: Container, logs: Path) -> None:
        container.log = logs / f"{container.service}.log"
        with container.log.open("w") as out:
            container.proc = start(self.chroot_argv(container, container.argv), stdout=out)

    def exec(self, container: Container, argv: list[str], timeout: float = 30) -> Result:
        return run(self.chroot_argv(container, argv), check=False, timeout=timeout)

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


def _image_config(archive: Path) -> dict[str, Any]:
    with tarfile.open(archive) as tar:
        handle = tar.extractfile("manifest.json")
        assert handle is not None
        config = tar.extractfile(json.load(handle)[0]["Config"])
        assert config is not None
        data: dict[str, Any] = json.load(config)["config"]
        return data


def _env_file_values(role: str, path: str) -> dict[str, str]:
    env_file = env_files(role)[path]
    return {**env_file.constants, **dict.fromkeys(env_file.secrets, TEST_SECRET)}


def _containers(standins: Setup, role: str, roots: Path) -> list[Container]:
    """Each service of the role's real compose file as docker compose would run it, rootfs unpacked here."""
    compose = _compose(standins.project, role)
    services: Mapping[str, Any] = compose["services"]
    containers: list[Container] = []
    for name, service in services.items():
        image = service["image"]
        root = roots / name
        extract_rootfs(standins.fetched[image], root)
        os.mknod(root / "dev" / "null", 0o666 | 0o020000, os.makedev(1, 3))  # what the runtime's /dev gives
        # compose's network: every service name resolves, here to the namespace's loopback.
        (root / "etc" / "hosts").write_text(f"127.0.0.1\tlocalhost {' '.join(services)}\n")
        for volume in service.get("volumes", []):  # the stack's own files, bind-mounted from beside compose.yaml
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                copy = shutil.copytree if (standins.project / "compose" / role / source).is_dir() else shutil.copyfile
                (root / target.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
                copy(standins.project / "compose" / role / source, root / target.lstrip("/"))
        config = _image_config(standins.fetched[image])
        env = dict(item.split("=", 1) for item in config["Env"])
        for path in service.get("env_file", []):
            env.update(_env_file_values(role, path))
        env.update({key: str(value) for key, value in (service.get("environment") or {}).items()})
        argv = [*config["Entrypoint"], *(service.get("command") or config.get("Cmd") or [])]
        containers.append(Container(name, root, env, argv))
    return containers


def _healthcheck(service: Mapping[str, Any]) -> list[str]:
    test: list[str] = list(service["healthcheck"]["test"])
    if test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", test[1]]
    assert test[0] == "CMD", test
    return test[1:]


def _wait_healthy(namespace: Namespace, container: Container, check: list[str]) -> Result:
    deadline = time.monotonic() + HEALTHY_WITHIN
    while True:
        result = namespace.exec(container, check)
        if result.returncode == 0 or time.monotonic() > deadline:
            return result
        assert container.proc is not None
        if container.proc.poll() is not None:
            return result
        time.sleep(0.25)


@pytest.mark.parametrize("role", ROLES)
def test_the_standins_pass_the_stacks_healthchecks_and_fail_them_when_stopped(
    standins: Setup, role: str, tmp_path: Path
) -> None:
    services = _compose(standins.project, role)["services"]
    containers = _containers(standins, role, tmp_path / "roots")
    namespace = Namespace()
    try:
        for container in containers:
            namespace.start(container, tmp_path)
        for container in containers:
            check = _healthcheck(services[container.service])
            result = _wait_healthy(namespace, container, check)
            log = container.log.read_text() if container.log else ""
            assert result.returncode == 0, f"{container.service}: {check} -> {result.stdout}{result.stderr}\n{log}"
        for container in containers:  # every health endpoint, with its body
            standin = CATALOG[services[container.service]["image"]]
            for port, kind in standin.ports.items():
                if not isinstance(kind, Http):
                    continue
                for path, body in kind.paths.items():
                    got = namespace.exec(container, ["wget", "-q", "-O", "-", f"http://127.0.0.1:{port}{path}"])
                    assert (got.returncode, got.stdout) == (0, body), f"{container.service} :{port}{path}"
        for container in containers:  # docker stop: SIGTERM, and it ends at once
            assert container.proc is not None
            container.proc.send_signal(signal.SIGTERM)
            assert container.proc.wait(timeout=5) == 0, container.service
        for container in containers:
            check = _healthcheck(services[container.service])
            result = namespace.exec(container, check)
            assert result.returncode != 0, f"{container.service}: {check} passed with the stand-in stopped"
    finally:
        for container in containers:
            if container.proc is not None and container.proc.poll() is None:
                os.killpg(container.proc.pid, signal.SIGKILL)
                container.proc.wait()
        namespace.close()


def test_a_standin_refuses_to_start_without_what_the_real_service_needs(standins: Setup, tmp_path: Path) -> None:
    containers = {c.service: c for c in _containers(standins, "intranet", tmp_path / "roots")}
    namespace = Namespace()
    try:
        immich = containers["immich-server"]
        del immich.env["DB_PASSWORD"]
        result = namespace.exec(immich, immich.argv, timeout=10)
        assert result.returncode == 1 and "DB_PASSWORD is not set" in result.stderr
        prometheus = containers["prometheus"]
        (prometheus.root / "etc" / "prometheus" / "prometheus.yml").unlink()
        result = namespace.exec(prometheus, prometheus.argv, timeout=10)
        assert result.returncode == 1 and "/etc/prometheus/prometheus.yml is missing" in result.stderr
    finally:
        namespace.close()
