"""The build plan and the pure-Python build steps, on a copy of tests/fixtures/project (role `web`).

Nothing here starts a process: steps that run commands (check_prerequisites, run_diskimage_builder) are not called.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder import build
from builder.build import (
    COMPOSE_DEST,
    ELEMENTS_DIR,
    BuildContext,
    BuildPlan,
    baked_sources,
    built_image,
    is_built,
    latest_build,
    plan_build,
    publish,
    read_manifest,
    remove_workdir,
    stage_baked_files,
)
from builder.definition import BASE_PACKAGES
from builder.errors import BootError, BuildError, DeployError, VerifyError
from builder.firewall import RULESET_DEST, ruleset
from builder.localvolumes import VOLUMES_DEST, volumes_json
from builder.progress import Silent
from builder.runner import describe
from builder.settings import Settings
from tests.conftest import PROJECT

ROLE = "web"


@pytest.fixture
def plan(settings: Settings) -> BuildPlan:
    return plan_build(settings, ROLE)


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _elements(argv: list[str]) -> list[str]:
    # Elements are the positional arguments after the last option's value (-p here).
    return argv[argv.index("-p") + 2 :]


# --- argv ----------------------------------------------------------------------------------------


def test_argv_starts_with_disk_image_create(plan: BuildPlan) -> None:
    assert plan.argv[0] == "disk-image-create"


def test_argv_asks_for_an_amd64_qcow2_of_the_definitions_size(plan: BuildPlan) -> None:
    # A full build also leaves its root as a tarball: the package layer of later builds.
    assert _option(plan.argv, "-t") == "qcow2,tar"
    assert _option(plan.argv, "-a") == "amd64"
    assert _option(plan.argv, "--image-size") == "5"


def test_argv_output_is_under_the_roles_build_dir(settings: Settings, plan: BuildPlan) -> None:
    output = Path(_option(plan.argv, "-o"))
    assert output.is_relative_to(settings.build_dir / ROLE)
    assert output.name == ROLE


def test_argv_packages_are_the_base_packages_then_the_definitions(plan: BuildPlan) -> None:
    packages = _option(plan.argv, "-p").split(",")
    assert packages == [*BASE_PACKAGES, "linux-image-cloud-amd64", "nginx", "curl"]


def test_argv_elements_start_with_debian_minimal_and_include_homelab_bake(plan: BuildPlan) -> None:
    elements = _elements(plan.argv)
    assert elements[0] == "debian-minimal"
    assert "homelab-bake" in elements
    assert "homelab-base" in elements
    assert not any(e.startswith("-") for e in elements)


# --- environment ---------------------------------------------------------------------------------


def test_env_selects_trixie(plan: BuildPlan) -> None:
    assert plan.env["DIB_RELEASE"] == "trixie"


def test_env_enables_the_non_free_firmware_component(plan: BuildPlan) -> None:
    # debian-minimal passes it to debootstrap and writes it into the image's apt sources.
    assert plan.env["DIB_DEBIAN_COMPONENTS"] == "main,non-free-firmware"


def test_env_elements_path_points_at_the_projects_elements(plan: BuildPlan) -> None:
    assert Path(plan.env["ELEMENTS_PATH"]) == PROJECT / "builder" / "elements" == ELEMENTS_DIR
    assert (ELEMENTS_DIR / "homelab-bake").is_dir()
    assert (ELEMENTS_DIR / "homelab-base").is_dir()


def test_env_sets_tmp_dir_and_never_tmpdir(settings: Settings, plan: BuildPlan) -> None:
    assert Path(plan.env["TMP_DIR"]).is_relative_to(settings.build_dir / ROLE)
    assert "TMPDIR" not in plan.env


def test_env_uses_the_configured_mirrors_and_cache(settings: Settings, plan: BuildPlan) -> None:
    assert plan.env["DIB_DISTRIBUTION_MIRROR"] == "http://mirror.test/debian"
    assert plan.env["DIB_DEBIAN_SECURITY_MIRROR"] == "http://mirror.test/debian-security"
    assert Path(plan.env["DIB_IMAGE_CACHE"]).is_relative_to(settings.cache_dir)


def test_env_carries_the_definitions_kernel_units_and_version(plan: BuildPlan) -> None:
    assert plan.env["HOMELAB_KERNEL_PACKAGE"] == "linux-image-cloud-amd64"
    assert plan.env["HOMELAB_ENABLE_UNITS"] == "homelab-stack.service nginx.service"
    assert plan.env["HOMELAB_IMAGE_VERSION"] == plan.version


# --- outputs and version -------------------------------------------------------------------------


def test_outputs_are_named_by_role_and_version(settings: Settings, plan: BuildPlan) -> None:
    assert plan.qcow2 == settings.build_dir / ROLE / f"{ROLE}-{plan.version}.qcow2"
    assert plan.manifest == settings.build_dir / ROLE / f"{ROLE}-{plan.version}.manifest.json"
    assert len(plan.version) == 12
    assert plan.inputs_hash.startswith(plan.version)


def test_planning_writes_nothing(settings: Settings, plan: BuildPlan) -> None:
    assert not settings.build_dir.exists()
    assert not settings.cache_dir.exists()


def test_plan_lists_every_baked_file_with_its_sha256(settings: Settings, plan: BuildPlan) -> None:
    motd = settings.project / "images" / "files" / "motd"
    assert plan.baked == {
        "/etc/motd": hashlib.sha256(motd.read_bytes()).hexdigest(),
        "/usr/local/bin/healthcheck": plan.baked["/usr/local/bin/healthcheck"],
        f"{COMPOSE_DEST}/compose.yaml": plan.baked[f"{COMPOSE_DEST}/compose.yaml"],
        f"{COMPOSE_DEST}/config/app.env": plan.baked[f"{COMPOSE_DEST}/config/app.env"],
        # The lock is baked with its stack: the image records which digests it runs.
        f"{COMPOSE_DEST}/images.lock.json": plan.baked[f"{COMPOSE_DEST}/images.lock.json"],
        # Generated from the definition's port matrix, hashed like any baked file.
        RULESET_DEST: hashlib.sha256(ruleset(plan.definition).encode()).hexdigest(),
        # The data volumes homelab-volumes.service mounts, generated from the definition's `volumes`.
        VOLUMES_DEST: hashlib.sha256(volumes_json(plan.definition).encode()).hexdigest(),
    }


def test_version_is_stable_for_unchanged_inputs(settings: Settings, plan: BuildPlan) -> None:
    again = plan_build(settings, ROLE)
    assert again.version == plan.version
    assert again.argv == plan.argv
    assert again.env == plan.env


def test_version_changes_when_a_baked_file_changes(settings: Settings, plan: BuildPlan) -> None:
    (settings.project / "images" / "files" / "motd").write_text("Another welcome.\n")
    assert plan_build(settings, ROLE).version != plan.version


def test_version_changes_when_a_compose_file_changes(settings: Settings, plan: BuildPlan) -> None:
    (settings.project / "compose" / "web" / "config" / "app.env").write_text("GREETING=bye\n")
    assert plan_build(settings, ROLE).version != plan.version


def test_version_changes_when_a_file_is_added_to_the_compose_stack(settings: Settings, plan: BuildPlan) -> None:
    (settings.project / "compose" / "web" / "config" / "extra.env").write_text("X=1\n")
    assert plan_build(settings, ROLE).version != plan.version


def test_version_changes_when_the_definition_changes(settings: Settings, plan: BuildPlan) -> None:
    definition = settings.project / "images" / f"{ROLE}.yaml"
    definition.write_text(definition.read_text().replace("cores: 2", "cores: 3"))
    assert plan_build(settings, ROLE).version != plan.version


def test_version_ignores_comments_in_the_definition(settings: Settings, plan: BuildPlan) -> None:
    definition = settings.project / "images" / f"{ROLE}.yaml"
    definition.write_text("# A comment changes nothing in the image.\n" + definition.read_text())
    assert plan_build(settings, ROLE).version == plan.version


def test_version_changes_when_the_mirror_changes(settings: Settings, plan: BuildPlan) -> None:
    other = dataclasses.replace(settings, mirror="http://other.test/debian")
    assert plan_build(other, ROLE).version != plan.version


def test_version_changes_when_the_security_mirror_changes(settings: Settings, plan: BuildPlan) -> None:
    other = dataclasses.replace(settings, security_mirror="http://other.test/debian-security")
    assert plan_build(other, ROLE).version != plan.version


def test_version_does_not_change_when_an_unrelated_file_changes(settings: Settings, plan: BuildPlan) -> None:
    (settings.project / "images" / "files" / "unrelated.txt").write_text("Changed, but baked nowhere.\n")
    (settings.project / "compose" / "no-compose" / "README.md").write_text("Changed too.\n")
    (settings.project / "images" / "minimal.yaml").write_text("description: Another role\nbase: debian-13\n")
    assert plan_build(settings, ROLE).version == plan.version


def test_version_does_not_depend_on_where_outputs_go(settings: Settings, plan: BuildPlan, tmp_path: Path) -> None:
    moved = dataclasses.replace(settings, build_dir=tmp_path / "elsewhere", cache_dir=tmp_path / "cache2")
    assert plan_build(moved, ROLE).version == plan.version


def test_describe_shows_the_exact_command_and_environment(plan: BuildPlan) -> None:
    text = plan.describe()
    assert f"  {describe(plan.argv)}\n" in text
    assert f"version:  {plan.version}" in text
    assert f"output:   {plan.qcow2}" in text
    assert "  DIB_RELEASE=trixie" in text.splitlines()
    assert f"  /etc/motd  sha256:{plan.baked['/etc/motd'][:16]}" in text.splitlines()


# --- staging -------------------------------------------------------------------------------------


@pytest.fixture
def ctx(settings: Settings, plan: BuildPlan) -> BuildContext:
    workdir = settings.build_dir / ROLE / ".build-test"
    workdir.mkdir(parents=True)
    (workdir / "out").mkdir()
    return BuildContext(settings=settings, plan=plan, reporter=Silent(), workdir=workdir)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_stage_puts_files_at_their_destinations_with_their_modes(settings: Settings, ctx: BuildContext) -> None:
    stage_baked_files(ctx)
    assert ctx.stage == ctx.workdir / "stage"
    motd = ctx.stage / "etc" / "motd"
    healthcheck = ctx.stage / "usr" / "local" / "bin" / "healthcheck"
    assert motd.read_bytes() == (settings.project / "images" / "files" / "motd").read_bytes()
    assert healthcheck.read_bytes() == (settings.project / "images" / "files" / "healthcheck").read_bytes()
    assert _mode(motd) == 0o644
    assert _mode(healthcheck) == 0o755


def test_stage_puts_the_compose_stack_under_opt_homelab_compose(settings: Settings, ctx: BuildContext) -> None:
    stage_baked_files(ctx)
    compose = ctx.stage / COMPOSE_DEST.lstrip("/")
    source = settings.project / "compose" / "web"
    assert (compose / "compose.yaml").read_bytes() == (source / "compose.yaml").read_bytes()
    assert (compose / "config" / "app.env").read_bytes() == (source / "config" / "app.env").read_bytes()
    assert _mode(compose / "config" / "app.env") == 0o644


def test_stage_writes_image_info_with_role_and_version(ctx: BuildContext) -> None:
    stage_baked_files(ctx)
    info_file = ctx.stage / "etc" / "homelab" / "image.json"
    info = json.loads(info_file.read_text())
    assert info["role"] == ROLE
    assert info["version"] == ctx.plan.version
    assert info["inputs_hash"] == ctx.plan.inputs_hash
    assert _mode(info_file) == 0o644


def test_stage_holds_exactly_the_planned_files_and_image_info(ctx: BuildContext) -> None:
    stage_baked_files(ctx)
    staged = {"/" + str(p.relative_to(ctx.stage)) for p in ctx.stage.rglob("*") if p.is_file()}
    assert staged == {*ctx.plan.baked, "/etc/homelab/image.json", "/etc/homelab/baked.list"}
    baked_list = (ctx.stage / "etc" / "homelab" / "baked.list").read_text().splitlines()
    assert baked_list == sorted(ctx.plan.baked)


def test_a_file_changed_after_planning_is_not_baked(settings: Settings, ctx: BuildContext) -> None:
    """The plan's version and manifest name the files as they were: a later edit (or `homelab lock`) would bake
    content that neither records."""
    (settings.project / "compose" / "web" / "compose.yaml").write_text("services: {}\n")
    with pytest.raises(BuildError, match=r"^.*/compose/web/compose\.yaml changed after the build was planned \(an "
                                         r"edit or `homelab lock` meanwhile\): run the build again$"):
        stage_baked_files(ctx)


@pytest.fixture
def strict_umask() -> Iterator[None]:
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def test_stage_directories_are_0755_whatever_the_umask(ctx: BuildContext, strict_umask: None) -> None:
    # The stage is copied over the image's root with its modes (cp -a .../. /): its root is the image's /.
    stage_baked_files(ctx)
    directories = [ctx.stage, *(p for p in ctx.stage.rglob("*") if p.is_dir())]
    assert {str(d.relative_to(ctx.stage)): _mode(d) for d in directories} == {
        str(d.relative_to(ctx.stage)): 0o755 for d in directories
    }


def test_baked_sources_map_destinations_to_project_files_and_modes(settings: Settings, plan: BuildPlan) -> None:
    sources = baked_sources(plan.definition, settings.project)
    assert sources["/etc/motd"] == (settings.project / "images" / "files" / "motd", "0644")
    assert sources["/usr/local/bin/healthcheck"] == (settings.project / "images" / "files" / "healthcheck", "0755")
    assert sources[f"{COMPOSE_DEST}/config/app.env"] == (
        settings.project / "compose" / "web" / "config" / "app.env",
        "0644",
    )


# --- publishing ----------------------------------------------------------------------------------

IMAGE_BYTES = b"QFI\xfb not really a qcow2, but bytes to publish\n"


def _produce_image(ctx: BuildContext) -> Path:
    produced = ctx.workdir / "out" / f"{ROLE}.qcow2"
    produced.write_bytes(IMAGE_BYTES)
    ctx.packages = {"nginx": "1.26.3-3", "curl": "8.14.1-2"}
    return produced


def test_publish_moves_the_image_and_writes_its_manifest(ctx: BuildContext) -> None:
    produced = _produce_image(ctx)
    publish(ctx)
    plan = ctx.plan
    assert plan.qcow2.read_bytes() == IMAGE_BYTES
    assert not produced.exists()
    manifest = json.loads(plan.manifest.read_text())
    assert manifest["sha256"] == hashlib.sha256(IMAGE_BYTES).hexdigest()
    assert manifest["size"] == len(IMAGE_BYTES)
    assert manifest["version"] == plan.version
    assert manifest["role"] == ROLE
    assert manifest["image"] == plan.qcow2.name
    assert manifest["packages"] == {"curl": "8.14.1-2", "nginx": "1.26.3-3"}
    assert list(manifest["packages"]) == ["curl", "nginx"]
    assert manifest["baked_files"] == plan.baked
    assert manifest["vm"] == {"cores": 2, "memory_mb": 2048, "disk_gb": 5}


def test_publish_leaves_only_the_final_files_in_the_role_dir(ctx: BuildContext) -> None:
    _produce_image(ctx)
    publish(ctx)
    remove_workdir(ctx.workdir)
    assert sorted(p.name for p in ctx.plan.qcow2.parent.iterdir()) == sorted(
        [ctx.plan.qcow2.name, ctx.plan.manifest.name]
    )


def test_publish_without_a_produced_image_fails_and_writes_no_final_file(ctx: BuildContext) -> None:
    with pytest.raises(BuildError, match="wrote no image"):
        publish(ctx)
    assert not ctx.plan.qcow2.exists()
    assert not ctx.plan.manifest.exists()


def test_is_built_only_after_publish(ctx: BuildContext) -> None:
    assert not is_built(ctx.plan)
    _produce_image(ctx)
    publish(ctx)
    assert is_built(ctx.plan)


def test_is_built_is_false_when_the_image_is_gone(ctx: BuildContext) -> None:
    _produce_image(ctx)
    publish(ctx)
    ctx.plan.qcow2.unlink()
    assert not is_built(ctx.plan)


def test_is_built_is_false_when_the_manifest_names_another_version(ctx: BuildContext) -> None:
    _produce_image(ctx)
    publish(ctx)
    manifest = json.loads(ctx.plan.manifest.read_text())
    ctx.plan.manifest.write_text(json.dumps({**manifest, "version": "000000000000"}))
    assert not is_built(ctx.plan)


def test_is_built_is_false_when_the_manifest_is_not_json(ctx: BuildContext) -> None:
    _produce_image(ctx)
    publish(ctx)
    ctx.plan.manifest.write_text('{"version": "trunc')
    assert not is_built(ctx.plan)


# --- latest build --------------------------------------------------------------------------------


def _fake_build(settings: Settings, version: str, mtime: float, image: bool = True) -> Path:
    role_dir = settings.role_dir(ROLE)
    role_dir.mkdir(parents=True, exist_ok=True)
    qcow2 = role_dir / f"{ROLE}-{version}.qcow2"
    manifest = role_dir / f"{ROLE}-{version}.manifest.json"
    if image:
        qcow2.write_bytes(IMAGE_BYTES)
    manifest.write_text(json.dumps({"role": ROLE, "version": version, "image": qcow2.name}))
    os.utime(manifest, (mtime, mtime))
    return manifest


def test_latest_build_is_none_without_builds(settings: Settings) -> None:
    assert latest_build(settings, ROLE) is None
    settings.role_dir(ROLE).mkdir(parents=True)
    assert latest_build(settings, ROLE) is None


def test_latest_build_is_the_newest_manifest_with_its_image(settings: Settings) -> None:
    _fake_build(settings, "aaaaaaaaaaaa", mtime=1_000)
    newest = _fake_build(settings, "bbbbbbbbbbbb", mtime=3_000)
    _fake_build(settings, "cccccccccccc", mtime=2_000)
    latest = latest_build(settings, ROLE)
    assert latest is not None
    assert latest["version"] == "bbbbbbbbbbbb"
    assert latest["path"] == str(settings.role_dir(ROLE) / f"{ROLE}-bbbbbbbbbbbb.qcow2")
    assert latest["manifest_path"] == str(newest)


def test_latest_build_skips_a_manifest_whose_image_is_missing(settings: Settings) -> None:
    _fake_build(settings, "aaaaaaaaaaaa", mtime=1_000)
    _fake_build(settings, "bbbbbbbbbbbb", mtime=3_000, image=False)
    latest = latest_build(settings, ROLE)
    assert latest is not None
    assert latest["version"] == "aaaaaaaaaaaa"


def test_latest_build_skips_an_unreadable_manifest(settings: Settings) -> None:
    _fake_build(settings, "aaaaaaaaaaaa", mtime=1_000)
    broken = _fake_build(settings, "bbbbbbbbbbbb", mtime=3_000)
    broken.write_text("{not json")
    os.utime(broken, (3_000, 3_000))
    latest = latest_build(settings, ROLE)
    assert latest is not None
    assert latest["version"] == "aaaaaaaaaaaa"


def test_latest_build_skips_a_manifest_without_an_image_name(settings: Settings) -> None:
    _fake_build(settings, "aaaaaaaaaaaa", mtime=1_000)
    odd = _fake_build(settings, "bbbbbbbbbbbb", mtime=3_000)
    odd.write_text(json.dumps({"role": ROLE, "version": "bbbbbbbbbbbb"}))
    os.utime(odd, (3_000, 3_000))
    latest = latest_build(settings, ROLE)
    assert latest is not None and latest["version"] == "aaaaaaaaaaaa"


@pytest.mark.parametrize("text, why", [("{not json", "Expecting property name"), ("[1, 2]", "not a JSON object")])
def test_read_manifest_names_the_file_and_what_is_wrong(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "web-x.manifest.json"
    path.write_text(text)
    with pytest.raises(VerifyError, match=rf"^cannot read the image manifest {path}: .*{why}"):
        read_manifest(path, VerifyError)


def test_built_image_is_the_newest_build_without_an_image(settings: Settings) -> None:
    _fake_build(settings, "aaaaaaaaaaaa", mtime=1_000)
    image, manifest = built_image(settings, ROLE, None)
    assert image == settings.role_dir(ROLE) / f"{ROLE}-aaaaaaaaaaaa.qcow2"
    assert manifest["version"] == "aaaaaaaaaaaa"


def test_built_image_without_any_build_says_how_to_build(settings: Settings) -> None:
    with pytest.raises(DeployError, match=rf"^no image of {ROLE} is built in .*: run `homelab build image {ROLE}`$"):
        built_image(settings, ROLE, None, DeployError)


def test_built_image_takes_a_given_image_with_its_manifest(settings: Settings) -> None:
    _fake_build(settings, "aaaaaaaaaaaa", mtime=1_000)
    _fake_build(settings, "bbbbbbbbbbbb", mtime=3_000)
    older = settings.role_dir(ROLE) / f"{ROLE}-aaaaaaaaaaaa.qcow2"
    assert built_image(settings, ROLE, older)[1]["version"] == "aaaaaaaaaaaa"


@pytest.mark.parametrize("missing", ["qcow2", "manifest.json"])
def test_built_image_refuses_a_given_image_without_its_pair(settings: Settings, missing: str) -> None:
    _fake_build(settings, "aaaaaaaaaaaa", mtime=1_000)
    image = settings.role_dir(ROLE) / f"{ROLE}-aaaaaaaaaaaa.qcow2"
    (settings.role_dir(ROLE) / f"{ROLE}-aaaaaaaaaaaa.{missing}").unlink()
    with pytest.raises(BootError, match=rf"^{image}: not a built image \(needs the qcow2 and its "
                                        rf"{ROLE}-aaaaaaaaaaaa\.manifest\.json\)"):
        built_image(settings, ROLE, image, BootError)


def test_latest_build_finds_what_publish_wrote(settings: Settings, ctx: BuildContext) -> None:
    _produce_image(ctx)
    publish(ctx)
    latest = latest_build(settings, ROLE)
    assert latest is not None
    assert latest["version"] == ctx.plan.version
    assert latest["path"] == str(ctx.plan.qcow2)


# --- removing the work directory -----------------------------------------------------------------


def test_remove_workdir_deletes_the_tree(tmp_path: Path) -> None:
    workdir = tmp_path / ".build-x"
    (workdir / "out" / "web.d").mkdir(parents=True)
    (workdir / "out" / "web.d" / "file").write_text("x")
    remove_workdir(workdir)
    assert not workdir.exists()


def test_remove_workdir_unmounts_leftover_mounts_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = tmp_path / ".build-x"
    (workdir / "tmp" / "mnt" / "proc").mkdir(parents=True)
    mounted = [str(workdir / "tmp" / "mnt" / "proc"), str(workdir / "tmp" / "mnt")]
    unmounted: list[list[str]] = []

    def fake_run(argv: list[str], check: bool = True) -> None:
        unmounted.append(argv)
        mounted.remove(argv[-1])

    monkeypatch.setattr(build, "_mounts_under", lambda path: list(mounted))
    monkeypatch.setattr(build, "run", fake_run)
    remove_workdir(workdir)
    assert unmounted == [
        ["umount", "-l", str(workdir / "tmp" / "mnt" / "proc")],
        ["umount", "-l", str(workdir / "tmp" / "mnt")],
    ]
    assert not workdir.exists()


def test_remove_workdir_refuses_to_delete_through_a_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = tmp_path / ".build-x"
    (workdir / "tmp" / "mnt" / "dev").mkdir(parents=True)
    (workdir / "tmp" / "mnt" / "dev" / "keep").write_text("host device stand-in")
    stuck = str(workdir / "tmp" / "mnt" / "dev")
    monkeypatch.setattr(build, "_mounts_under", lambda path: [stuck])
    monkeypatch.setattr(build, "run", lambda argv, check=True: None)
    with pytest.raises(BuildError, match="still has mounts"):
        remove_workdir(workdir)
    assert (workdir / "tmp" / "mnt" / "dev" / "keep").exists()


def test_mounts_under_ignores_mounts_outside_the_path(tmp_path: Path) -> None:
    assert build._mounts_under(tmp_path) == []


def test_mounts_under_lists_nested_mounts_deepest_first() -> None:
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        points = [line.split()[1] for line in mounts]
    nested = [p for p in points if p.count("/") >= 2 and "\\" not in p]
    if not nested:
        pytest.skip("no mount point below a subdirectory on this host")
    parent = Path(nested[0]).parent
    found = build._mounts_under(parent)
    assert nested[0] in found
    assert found == sorted(found, reverse=True)
