"""The stand-in catalog against the real compose files, and the archives it writes (no process is started).

tests/integration/test_standins.py runs them for real; here: every image the stacks name has a stand-in that
serves the ports compose publishes, carries the executables the stack's healthchecks run and answers the URLs they
ask; what a stand-in requires, the stack gives it; archives are well-formed and reproducible.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from builder.compose import env_files
from builder.lock import image_problem, images_in_compose
from tests.conftest import PROJECT
from tests.standins.images import (
    APPLETS,
    CATALOG,
    PATH,
    Http,
    StandIn,
    Tcp,
    Tree,
    archive_config_digest,
    base_layer,
    build_standins,
    http_files,
    is_static_elf,
    standin_layer,
)
from tests.standins.registry import REAL_REGISTRIES, registries_conf_text, registry_of

COMPOSE_FILES = sorted(PROJECT.glob("compose/*/compose.yaml"))


def _services() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(role, service name, service) of every compose file of the project."""
    for path in COMPOSE_FILES:
        for name, service in yaml.safe_load(path.read_text())["services"].items():
            yield path.parent.name, name, service


SERVICES = list(_services())
IDS = [f"{role}.{name}" for role, name, _service in SERVICES]


def _fake_busybox() -> bytes:
    """A 64-bit little-endian ELF header with no program headers: static, as far as the check goes."""
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    return bytes(header)


def _rootfs(standin: StandIn) -> Tree:
    base, own = base_layer(_fake_busybox()), standin_layer(standin)
    return Tree({**base.files, **own.files}, {**base.links, **own.links}, {**base.dirs, **own.dirs})


def _executable(tree: Tree, standin: StandIn, program: str) -> str | None:
    """Where the image's PATH finds `program` (a file or a busybox link), as docker's exec would."""
    candidates = [program] if program.startswith("/") else [
        f"{directory}/{program}" for directory in standin.config_env()["PATH"].split(":")]
    for candidate in candidates:
        path = candidate.strip("/")
        if path in tree.links or (path in tree.files and tree.files[path][1] & 0o111):
            return candidate
    return None


def test_compose_files_are_found() -> None:
    assert {path.parent.name for path in COMPOSE_FILES} == {"intranet", "extranet"}


def test_the_catalog_has_exactly_the_images_the_stacks_name() -> None:
    used = sorted({image for path in COMPOSE_FILES for image in images_in_compose(path)})
    assert [image for image in used if image not in CATALOG] == [], "add a stand-in to tests/standins/images.py"
    assert [image for image in CATALOG if image not in used] == [], "a stand-in no stack uses (a version bump?)"


def test_every_catalog_name_is_a_pinnable_reference_of_a_served_registry() -> None:
    for image, standin in CATALOG.items():
        assert standin.image == image
        assert image_problem(image) is None
        assert registry_of(image) in REAL_REGISTRIES


@pytest.mark.parametrize(("role", "name", "service"), SERVICES, ids=IDS)
def test_each_standin_serves_the_ports_its_service_publishes(role: str, name: str, service: dict[str, Any]) -> None:
    standin = CATALOG[service["image"]]
    for mapping in service.get("ports", []):
        container_port = int(str(mapping).split(":")[-1].split("/")[0])
        assert container_port in standin.ports, f"{role}.{name}: port {container_port} is not served by the stand-in"


@pytest.mark.parametrize(("role", "name", "service"), SERVICES, ids=IDS)
def test_each_standin_carries_and_answers_its_services_healthcheck(
    role: str, name: str, service: dict[str, Any]
) -> None:
    standin = CATALOG[service["image"]]
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD", f"{role}.{name}: the stacks' healthchecks are CMD lists"
    tree = _rootfs(standin)
    assert _executable(tree, standin, test[1]) is not None, f"{role}.{name}: {test[1]} is not in the stand-in"
    for url in [arg for arg in test[2:] if arg.startswith("http")]:
        match = re.fullmatch(r"http://(?:localhost|127\.0\.0\.1):([0-9]+)(/\S*)", url)
        assert match, url
        port, path = int(match[1]), match[2]
        kind = standin.ports.get(port)
        assert isinstance(kind, Http) and path in kind.paths, f"{role}.{name}: the stand-in does not answer {url}"


def test_the_healthcheck_executables_probe_the_standins_own_port() -> None:
    # Each tool asks a port its stand-in serves (so a stopped stand-in is unhealthy), never a constant answer.
    for standin in CATALOG.values():
        for path, body in standin.tools.items():
            if path.endswith("/curl"):
                continue  # generic: asks the URL it is given
            asks = {int(number) for number in re.findall(r"\b[0-9]{2,5}\b", body)} & set(standin.ports)
            assert asks, f"{standin.image}: {path} names none of the stand-in's ports"
            assert "standin_get" in body or "standin_ask" in body, path


@pytest.mark.parametrize(("role", "name", "service"), SERVICES, ids=IDS)
def test_what_a_standin_requires_its_stack_gives(role: str, name: str, service: dict[str, Any]) -> None:
    standin = CATALOG[service["image"]]
    given = set(service.get("environment") or {})
    for path in service.get("env_file", []):
        env_file = env_files(role)[path]
        given |= set(env_file.secrets) | set(env_file.constants)
    assert [variable for variable in standin.required_env if variable not in given] == []
    targets = {volume.split(":")[1] for volume in service.get("volumes", [])}
    assert [path for path in standin.required_files if path not in targets] == []


def test_the_standins_applets_and_scripts_are_in_the_rootfs() -> None:
    for standin in CATALOG.values():
        tree = _rootfs(standin)
        assert tree.files["bin/busybox"][1] == 0o755
        for applet in APPLETS:
            assert tree.links[f"bin/{applet}"] == "busybox"
        assert tree.files["standin/run"][0].startswith(b"#!/bin/sh\n")
        for path in standin.tools:
            content, mode = tree.files[path.strip("/")]
            assert mode == 0o755 and content.startswith(b"#!/bin/sh\n. /standin/lib.sh\n")
            assert not path.strip("/").startswith("bin/"), "a tool would hide a busybox applet"
        for port, kind in standin.ports.items():
            if isinstance(kind, Tcp):
                assert f"standin/tcp/{port}" in tree.files


def test_http_paths_become_files_and_directory_indexes() -> None:
    assert http_files(81, Http({"/api/": "{}", "/-/healthy": "ok"})) == {
        "standin/www/81/api/index.html": "{}", "standin/www/81/-/healthy": "ok"}
    with pytest.raises(ValueError, match="both a file and a directory"):
        http_files(80, Http({"/api": "a", "/api/x": "b"}))
    with pytest.raises(ValueError, match="bad path"):
        http_files(80, Http({"/../etc/passwd": "x"}))


def test_a_dynamic_busybox_is_refused() -> None:
    assert is_static_elf(_fake_busybox())
    dynamic = bytearray(_fake_busybox() + bytes(56))
    dynamic[0x20:0x28] = (64).to_bytes(8, "little")  # program headers at 64
    dynamic[0x36:0x38] = (56).to_bytes(2, "little")
    dynamic[0x38:0x3A] = (1).to_bytes(2, "little")
    dynamic[64:68] = (3).to_bytes(4, "little")  # PT_INTERP
    assert not is_static_elf(bytes(dynamic))
    with pytest.raises(ValueError, match="busybox-static"):
        base_layer(bytes(dynamic))


def test_archives_are_docker_archives_and_reproducible(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(_fake_busybox())
    first = build_standins(tmp_path / "one", busybox=busybox)
    second = build_standins(tmp_path / "two", busybox=busybox)
    assert sorted(first) == sorted(CATALOG)
    for image, archive in first.items():
        assert archive.path.read_bytes() == second[image].path.read_bytes(), image
        assert archive_config_digest(archive.path) == archive.config_digest
        with tarfile.open(archive.path) as tar:
            manifest = json.load(_read(tar, "manifest.json"))
            assert len(manifest) == 1 and manifest[0]["RepoTags"] == [image]
            config_bytes = _read(tar, manifest[0]["Config"]).read()
            config = json.loads(config_bytes)
            layers = [_read(tar, name).read() for name in manifest[0]["Layers"]]
        assert "sha256:" + hashlib.sha256(config_bytes).hexdigest() == archive.config_digest
        assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
        assert (config["os"], config["architecture"]) == ("linux", "amd64")
        standin = CATALOG[image]
        assert config["config"]["Entrypoint"] == ["/standin/run"]
        assert config["config"]["ExposedPorts"] == {f"{port}/tcp": {} for port in standin.ports}
        assert f"PATH={standin.config_env()['PATH']}" in config["config"]["Env"]
        assert config["config"]["Labels"]["homelab.standin"] == image
        assert PATH in standin.config_env()["PATH"]
        if standin.healthcheck:
            assert config["config"]["Healthcheck"]["Test"] == list(standin.healthcheck)
        with tarfile.open(fileobj=io.BytesIO(layers[1])) as own:
            assert _read(own, "standin/image").read().decode() == image + "\n"
            assert {member.mtime for member in own.getmembers()} == {1767225600}
    base_digests = {json.loads(_config(a.path))["rootfs"]["diff_ids"][0] for a in first.values()}
    assert len(base_digests) == 1, "every stand-in shares the busybox layer"


def _read(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    handle = tar.extractfile(name)
    assert handle is not None, name
    return handle


def _config(archive: Path) -> bytes:
    with tarfile.open(archive) as tar:
        return _read(tar, json.load(_read(tar, "manifest.json"))[0]["Config"]).read()


def test_the_registries_conf_rewrites_each_real_registry_to_loopback() -> None:
    conf = tomllib.loads(registries_conf_text("127.0.0.1:5000"))
    assert conf["unqualified-search-registries"] == []
    assert conf["registry"] == [
        {"prefix": registry, "location": f"127.0.0.1:5000/{registry}", "insecure": True}
        for registry in REAL_REGISTRIES
    ]
    assert all("mirror" not in entry for entry in conf["registry"]), "a rewrite, not a mirror: no fallback"
