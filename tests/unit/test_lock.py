"""Image lock files: references, reading and writing locks, resolving through an injected inspect, and the skopeo
calls behind the real inspect, answered from tests/fixtures/lock (synthetic digests, see its README). No test here
reaches a registry or starts skopeo: `builder.lock.run` is replaced by a fake that refuses any call a test did not
give an answer for, on top of the suite's guard against starting processes.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from builder import lock as lockmod
from builder.errors import DefinitionError, LockError
from builder.lock import (
    LOCK_NAME,
    LockEntry,
    image_problem,
    images_in_compose,
    is_manifest_list,
    load_lock,
    lock_path,
    lock_role,
    lock_text,
    repository,
    resolve,
    skopeo_inspect,
    write_lock,
)
from builder.runner import Result
from tests.conftest import FIXTURES, PROJECT, ProcessStartedInUnitTest

LOCK_FIXTURES = FIXTURES / "lock"
SKOPEO = LOCK_FIXTURES / "skopeo"
ANSWERS: dict[str, dict[str, Any]] = json.loads((LOCK_FIXTURES / "inspect-answers.json").read_text())
JELLYFIN = "docker.io/jellyfin/jellyfin:10.11.11"
NPM = "docker.io/jc21/nginx-proxy-manager:2.13.7"


def _fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SKOPEO / f"{name}.json").read_text())
    return data


# --- references ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        JELLYFIN,
        "ghcr.io/immich-app/immich-server:v3.4.0",
        "ghcr.io/immich-app/postgres:14-vectorchord0.4.3-pgvectors0.2.0",
        "docker.io/prom/prometheus:v3.10.0",
        "docker.io/library/nginx:1.27.3",
        "localhost:5000/homelab/stand-in:1.0.0",
        "registry.example.org:5000/a/b/c:2.0.1-alpine",
    ],
)
def test_pinnable_references(image: str) -> None:
    assert image_problem(image) is None


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        ("docker.io/library/nginx:latest", "tag 'latest' moves"),
        ("ghcr.io/immich-app/immich-server:release", "tag 'release' moves"),
        ("docker.io/library/nginx:stable", "tag 'stable' moves"),
        ("docker.io/library/nginx", "no tag"),
        ("docker.io/valkey/valkey:9", "not an exact version"),
        ("docker.io/valkey/valkey:8-bookworm", "not an exact version"),
        ("docker.io/grafana/grafana:12.4", "not an exact version"),
        ("nginx:1.27.3", "name the registry"),
        ("jellyfin/jellyfin:10.11.11", "name the registry"),
        ("docker.io/library/nginx:1.27.3@sha256:" + "0" * 64, "belongs in images.lock.json"),
        ("ghcr.io/immich-app/immich-server:${IMMICH_VERSION:-release}", "must be literal"),
        ("docker.io/Library/Nginx:1.27.3", "expected registry/name:tag"),
        ("docker.io/library/nginx:", "expected registry/name:tag"),
        (None, "expected an image reference string"),
        (3, "expected an image reference string"),
    ],
)
def test_unpinnable_references(image: Any, problem: str) -> None:
    found = image_problem(image)
    assert found is not None and problem in found


def test_repository_drops_the_tag_only() -> None:
    assert repository(JELLYFIN) == "docker.io/jellyfin/jellyfin"
    assert repository("localhost:5000/a/b:1.0.0") == "localhost:5000/a/b"


# --- images in a compose file ----------------------------------------------------------------------------------


def test_images_in_the_real_stacks() -> None:
    assert images_in_compose(PROJECT / "compose" / "extranet" / "compose.yaml") == [NPM]
    intranet = images_in_compose(PROJECT / "compose" / "intranet" / "compose.yaml")
    assert intranet == sorted(intranet) and len(intranet) == 6
    assert "ghcr.io/immich-app/immich-server:v3.4.0" in intranet


def test_images_are_listed_once(tmp_path: Path) -> None:
    compose = tmp_path / "compose.yaml"
    compose.write_text(f"services:\n  a: {{image: {NPM}}}\n  b: {{image: {NPM}}}\n  c: {{image: {JELLYFIN}}}\n")
    assert images_in_compose(compose) == [NPM, JELLYFIN]


def test_a_service_without_an_image_cannot_be_locked() -> None:
    with pytest.raises(DefinitionError, match=r"compose\.yaml:4: services\.web\.image: expected an image reference"):
        images_in_compose(FIXTURES / "compose" / "image-missing" / "compose.yaml")


def test_a_compose_file_without_services_cannot_be_locked() -> None:
    with pytest.raises(DefinitionError, match=r"compose\.yaml:2: services: expected a mapping of services"):
        images_in_compose(FIXTURES / "compose" / "services-missing" / "compose.yaml")


# --- lock files --------------------------------------------------------------------------------------------------


def test_load_lock_reads_every_entry() -> None:
    lock = load_lock(FIXTURES / "compose" / "real-stack-lock" / "extranet.json")
    assert list(lock.images) == [NPM]
    assert NPM in lock and JELLYFIN not in lock
    assert lock[NPM].digest.startswith("sha256:") and len(lock[NPM].config_digest) == 71


def test_lock_text_is_what_load_lock_reads_back(tmp_path: Path) -> None:
    for source in sorted((FIXTURES / "compose" / "real-stack-lock").glob("*.json")):
        lock = load_lock(source)
        assert lock_text(lock.images) == source.read_text(), "the committed test locks are in the written format"
        copy = tmp_path / source.name
        write_lock(copy, lock.images)
        assert load_lock(copy).images == lock.images


def test_a_missing_lock_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DefinitionError, match=r"images\.lock\.json: file not found$"):
        load_lock(tmp_path / LOCK_NAME)


def test_a_lock_with_a_duplicate_image_is_refused(tmp_path: Path) -> None:
    entry = json.dumps({"digest": "sha256:" + "a" * 64, "config_digest": "sha256:" + "b" * 64})
    path = tmp_path / LOCK_NAME
    path.write_text(f'{{"images": {{"{NPM}": {entry}, "{NPM}": {entry}}}}}')
    with pytest.raises(DefinitionError, match=r"invalid lock: duplicate key"):
        load_lock(path)


def test_an_unknown_image_is_named_with_the_role(tmp_path: Path) -> None:
    path = tmp_path / LOCK_NAME
    write_lock(path, {NPM: LockEntry("sha256:" + "a" * 64, "sha256:" + "b" * 64)})
    with pytest.raises(DefinitionError) as caught:
        load_lock(path, [JELLYFIN], project=tmp_path, role="extranet")
    assert str(caught.value) == (
        f'images.lock.json: images["{NPM}"]: unknown image: the stack does not use it (a stale lock: run '
        "`homelab lock extranet`)"
    )


def test_write_lock_is_atomic_and_world_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / LOCK_NAME
    write_lock(path, {NPM: LockEntry("sha256:" + "a" * 64, "sha256:" + "b" * 64)})
    before = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644

    def refuse(*args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(lockmod.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_lock(path, {JELLYFIN: LockEntry("sha256:" + "c" * 64, "sha256:" + "d" * 64)})
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME], "no temp file is left behind"


# --- resolving through an injected inspect -----------------------------------------------------------------------


@dataclass
class FakeInspect:
    answers: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: ANSWERS)
    asked: list[str] = field(default_factory=list)

    def __call__(self, image: str) -> Mapping[str, Any]:
        self.asked.append(image)
        if image not in self.answers:
            raise LockError(f"{image}: manifest unknown")
        return self.answers[image]


def test_resolve_takes_the_manifest_digest_and_the_config_digest() -> None:
    entry = resolve(JELLYFIN, FakeInspect())
    assert entry == LockEntry(ANSWERS[JELLYFIN]["Digest"], ANSWERS[JELLYFIN]["ConfigDigest"])


@pytest.mark.parametrize(
    ("image", "error"),
    [
        ("docker.io/example/no-digest:1.0.0", "gave no sha256 manifest digest"),
        ("docker.io/example/bad-config:1.0.0", "gave no sha256 config digest"),
    ],
)
def test_resolve_refuses_an_answer_without_digests(image: str, error: str) -> None:
    with pytest.raises(LockError, match=error):
        resolve(image, FakeInspect())


def test_resolve_never_asks_the_registry_about_an_unpinnable_reference() -> None:
    inspect = FakeInspect()
    message = "cannot lock 'docker.io/library/nginx:latest': tag 'latest' moves"
    with pytest.raises(DefinitionError, match=re.escape(message)):
        resolve("docker.io/library/nginx:latest", inspect)
    assert inspect.asked == []


def _project_with_stack(tmp_path: Path, images: list[str]) -> Path:
    project = tmp_path / "project"
    shutil.copytree(FIXTURES / "project", project)
    services = "".join(f"  s{i}:\n    image: {image}\n" for i, image in enumerate(images))
    (project / "compose" / "web" / "compose.yaml").write_text(f"services:\n{services}")
    return project


def test_lock_role_writes_every_image_of_the_stack(tmp_path: Path) -> None:
    project = _project_with_stack(tmp_path, [NPM, JELLYFIN, NPM])
    inspect = FakeInspect()
    path = lock_role(project, "web", inspect)
    assert path == project / "compose" / "web" / LOCK_NAME
    assert sorted(inspect.asked) == [NPM, JELLYFIN]
    lock = load_lock(path, [NPM, JELLYFIN])
    assert lock[JELLYFIN].config_digest == ANSWERS[JELLYFIN]["ConfigDigest"]
    assert json.loads(path.read_text()) == {"images": {
        JELLYFIN: {"digest": ANSWERS[JELLYFIN]["Digest"], "config_digest": ANSWERS[JELLYFIN]["ConfigDigest"]},
        NPM: {"digest": ANSWERS[NPM]["Digest"], "config_digest": ANSWERS[NPM]["ConfigDigest"]},
    }}
    assert sorted(p.name for p in path.parent.iterdir()) == ["compose.yaml", "config", LOCK_NAME]
    first = path.read_text()
    lock_role(project, "web", FakeInspect())
    assert path.read_text() == first, "the same answers write the same lock"


def test_a_failed_lock_keeps_the_previous_one(tmp_path: Path) -> None:
    project = _project_with_stack(tmp_path, [NPM])
    path = lock_role(project, "web", FakeInspect())
    before = path.read_text()
    (project / "compose" / "web" / "compose.yaml").write_text(
        f"services:\n  a: {{image: {NPM}}}\n  b: {{image: docker.io/example/unknown:1.0.0}}\n"
    )
    with pytest.raises(LockError, match="manifest unknown"):
        lock_role(project, "web", FakeInspect())
    assert path.read_text() == before


def test_lock_role_refuses_a_stack_with_a_moving_tag(tmp_path: Path) -> None:
    # A stack naming nginx:stable is refused with the reason, before any registry call.
    project = tmp_path / "project"
    shutil.copytree(FIXTURES / "project", project)
    compose = project / "compose" / "web" / "compose.yaml"
    compose.write_text(compose.read_text().replace("docker.io/library/nginx:1.27.3", "nginx:stable"))
    inspect = FakeInspect()
    with pytest.raises(DefinitionError, match="cannot lock 'nginx:stable': name the registry"):
        lock_role(project, "web", inspect)
    assert inspect.asked == []


def test_a_role_without_a_stack_has_nothing_to_lock() -> None:
    with pytest.raises(DefinitionError, match=r"minimal\.yaml: compose: role minimal has no compose stack to lock"):
        lock_path(FIXTURES / "project", "minimal")


def test_the_real_roles_lock_beside_their_compose_file() -> None:
    for role in ("intranet", "extranet"):
        assert lock_path(PROJECT, role) == PROJECT / "compose" / role / LOCK_NAME


# --- skopeo ------------------------------------------------------------------------------------------------------


@dataclass
class FakeSkopeo:
    """Answers `skopeo ... inspect ...` argv from fixture files; records each call and its environment."""

    answers: dict[str, str]  # the docker:// reference -> fixture name
    calls: list[tuple[list[str], Mapping[str, str] | None]] = field(default_factory=list)

    def __call__(self, argv: list[str], *, env: Mapping[str, str] | None = None, **kwargs: Any) -> Result:
        self.calls.append((list(argv), env))
        reference = argv[-1]
        assert reference.startswith("docker://"), argv
        name = self.answers.get(reference.removeprefix("docker://"))
        if name is None:
            raise AssertionError(f"unexpected skopeo call {argv}")
        return Result(list(argv), 0, (SKOPEO / f"{name}.json").read_text(), "")


@pytest.fixture(autouse=True)
def no_real_skopeo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """skopeo_inspect's `run` refuses by default; tests that need it install a FakeSkopeo."""

    def refuse(argv: list[str], **kwargs: Any) -> Result:
        raise AssertionError(f"a unit test reached skopeo: {argv}")

    monkeypatch.setattr(lockmod, "run", refuse)
    yield


def _jellyfin_skopeo() -> FakeSkopeo:
    listing = _fixture("jellyfin-list")
    amd64 = next(m["digest"] for m in listing["manifests"] if m["platform"]["architecture"] == "amd64")
    return FakeSkopeo({
        JELLYFIN: "jellyfin-inspect",
        f"docker.io/jellyfin/jellyfin@{_fixture('jellyfin-inspect')['Digest']}": "jellyfin-list",
        f"docker.io/jellyfin/jellyfin@{amd64}": "jellyfin-amd64",
    })


def test_skopeo_inspect_of_a_multi_arch_image_locks_the_list_and_the_amd64_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = _jellyfin_skopeo()
    monkeypatch.setattr(lockmod, "run", fake)
    conf = tmp_path / "registries.conf"
    answer = skopeo_inspect(JELLYFIN, registries_conf=conf, tls_verify=False)
    assert answer["Digest"] == _fixture("jellyfin-inspect")["Digest"]
    assert answer["ConfigDigest"] == _fixture("jellyfin-amd64")["config"]["digest"]
    assert answer["Name"] == "docker.io/jellyfin/jellyfin"
    argvs = [argv for argv, _env in fake.calls]
    # The file goes in skopeo's global option: skopeo 1.9 ignores CONTAINERS_REGISTRIES_CONF.
    platform = ["skopeo", "--registries-conf", str(conf), "--override-os", "linux", "--override-arch", "amd64",
                "inspect", "--tls-verify=false"]
    assert argvs[0] == [*platform, "--no-tags", f"docker://{JELLYFIN}"]
    assert argvs[1][:-1] == [*platform, "--raw"] and "@sha256:" in argvs[1][-1]
    assert argvs[2][:-1] == [*platform, "--raw"]
    for _argv, env in fake.calls:
        assert env is None, "skopeo runs in the caller's environment"
    assert resolve(JELLYFIN, lambda image: skopeo_inspect(image)) == LockEntry(
        answer["Digest"], answer["ConfigDigest"]
    )


def test_skopeo_inspect_of_a_single_image_reads_its_own_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    digest = _fixture("npm-inspect")["Digest"]
    fake = FakeSkopeo({NPM: "npm-inspect", f"docker.io/jc21/nginx-proxy-manager@{digest}": "npm-manifest"})
    monkeypatch.setattr(lockmod, "run", fake)
    answer = skopeo_inspect(NPM)
    assert answer["ConfigDigest"] == _fixture("npm-manifest")["config"]["digest"]
    assert len(fake.calls) == 2
    for argv, env in fake.calls:
        # TLS is left to the registries configuration (an `insecure = true` mirror stays reachable).
        assert not any(arg.startswith("--tls-verify") for arg in argv)
        assert "--registries-conf" not in argv, "without registries_conf skopeo uses the system's configuration"
        assert env is None


def test_skopeo_inspect_without_an_amd64_image_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    image = "docker.io/example/arm-only:1.0.0"
    digest = _fixture("arm-only-inspect")["Digest"]
    monkeypatch.setattr(lockmod, "run", FakeSkopeo({image: "arm-only-inspect",
                                                   f"docker.io/example/arm-only@{digest}": "arm-only-list"}))
    with pytest.raises(LockError, match="no linux/amd64 image"):
        skopeo_inspect(image)


def test_skopeo_answering_garbage_is_a_lock_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def garbage(argv: list[str], **kwargs: Any) -> Result:
        return Result(list(argv), 0, "Error: not JSON", "")

    monkeypatch.setattr(lockmod, "run", garbage)
    with pytest.raises(LockError, match="skopeo did not answer JSON"):
        skopeo_inspect(NPM)


def test_manifest_lists_are_recognised_by_media_type_or_shape() -> None:
    assert is_manifest_list(_fixture("jellyfin-list"))
    assert is_manifest_list(_fixture("arm-only-list"))
    assert is_manifest_list({"schemaVersion": 2, "manifests": []})
    assert not is_manifest_list(_fixture("jellyfin-amd64"))
    assert not is_manifest_list(_fixture("npm-manifest"))


def test_skopeo_inspect_never_starts_skopeo_in_unit_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    from builder import runner

    monkeypatch.setattr(lockmod, "run", runner.run)
    with pytest.raises(ProcessStartedInUnitTest):
        skopeo_inspect(NPM)
