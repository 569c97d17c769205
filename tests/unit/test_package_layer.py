"""The package-layer cache: a full build leaves its root as a tarball keyed by the package set; later builds
of the same package set start from it (incremental) until it is a day old.

On a copy of tests/fixtures/project (role `web`). Nothing here starts a process; the element scripts are
read, never run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from builder import build, definition
from builder.build import (
    BAKED_LIST_DEST,
    BUILD_STEPS,
    ELEMENTS_DIR,
    INCREMENTAL_ELEMENTS,
    LAYER_MAX_AGE_SECONDS,
    BuildContext,
    BuildPlan,
    dib_argv,
    keep_package_layer,
    layer_is_fresh,
    layer_key,
    layer_path,
    plan_build,
    publish,
)
from builder.definition import load_role
from builder.errors import BuildError
from builder.progress import Silent
from builder.settings import Settings

ROLE = "web"
TAR_BYTES = b"a root tarball stand-in\n"


def _key(settings: Settings, role: str = ROLE) -> str:
    return layer_key(load_role(settings.project, role), settings)


def _edit_definition(settings: Settings, old: str, new: str) -> None:
    definition = settings.project / "images" / f"{ROLE}.yaml"
    text = definition.read_text()
    assert old in text, f"the fixture definition no longer holds {old!r}"
    definition.write_text(text.replace(old, new))


def _append_to_definition(settings: Settings, text: str) -> None:
    definition = settings.project / "images" / f"{ROLE}.yaml"
    definition.write_text(definition.read_text() + text)


def _make_layer(settings: Settings, age_seconds: float = 0) -> Path:
    layer = layer_path(settings, ROLE, _key(settings))
    layer.parent.mkdir(parents=True, exist_ok=True)
    layer.touch()
    if age_seconds:
        then = time.time() - age_seconds
        os.utime(layer, (then, then))
    return layer


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _elements(argv: list[str]) -> list[str]:
    # The positional arguments after the last option's value (-p in a full build, -o in an incremental one).
    last = "-p" if "-p" in argv else "-o"
    return argv[argv.index(last) + 2 :]


# --- the layer key -------------------------------------------------------------------------------


def test_layer_key_is_stable_for_an_unchanged_package_set(settings: Settings) -> None:
    key = _key(settings)
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    assert _key(settings) == key


def test_layer_key_changes_with_the_packages(settings: Settings) -> None:
    key = _key(settings)
    _edit_definition(settings, "packages: [nginx, curl]", "packages: [nginx, curl, jq]")
    assert _key(settings) != key


def test_layer_key_changes_with_the_kernel(settings: Settings) -> None:
    key = _key(settings)
    _edit_definition(settings, "kernel: cloud", "kernel: generic")
    assert _key(settings) != key


def test_layer_key_changes_with_the_units(settings: Settings) -> None:
    key = _key(settings)
    _edit_definition(settings, "units: [homelab-stack.service, nginx.service]", "units: [homelab-stack.service]")
    assert _key(settings) != key


def test_layer_key_changes_with_the_mirror(settings: Settings) -> None:
    key = _key(settings)
    assert _key(dataclasses.replace(settings, mirror="http://other.test/debian")) != key


def test_layer_key_changes_with_the_security_mirror(settings: Settings) -> None:
    key = _key(settings)
    assert _key(dataclasses.replace(settings, security_mirror="http://other.test/debian-security")) != key


def test_layer_key_changes_with_extra_elements(settings: Settings) -> None:
    key = _key(settings)
    _append_to_definition(settings, "elements: [growroot]\n")
    assert _key(settings) != key


def test_layer_key_changes_with_the_archive_components(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # A layer bootstrapped from main alone has no non-free-firmware in its apt sources: it must not be reused.
    key = _key(settings)
    monkeypatch.setattr(definition, "DEBIAN_COMPONENTS", ["main"])
    assert _key(settings) != key


def test_layer_key_changes_with_the_dib_version(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    key = _key(settings)
    monkeypatch.setattr(build, "_dib_version", lambda: "0.0.0-other")
    assert _key(settings) != key


@pytest.fixture
def elements_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    copy = tmp_path / "elements"
    shutil.copytree(ELEMENTS_DIR, copy)
    monkeypatch.setattr(build, "ELEMENTS_DIR", copy)
    return copy


def test_layer_key_changes_with_homelab_base(settings: Settings, elements_copy: Path) -> None:
    key = _key(settings)
    script = elements_copy / "homelab-base" / "post-install.d" / "60-homelab-services"
    script.write_text(script.read_text() + "# changed\n")
    assert _key(settings) != key


def test_layer_key_ignores_homelab_bake(settings: Settings, elements_copy: Path) -> None:
    # homelab-bake runs in incremental builds too: a change to it needs no new layer.
    key = _key(settings)
    script = elements_copy / "homelab-bake" / "post-install.d" / "60-homelab-bake"
    script.write_text(script.read_text() + "# changed\n")
    assert _key(settings) == key


def test_layer_key_ignores_a_baked_file(settings: Settings) -> None:
    key = _key(settings)
    (settings.project / "images" / "files" / "motd").write_text("Another welcome.\n")
    assert _key(settings) == key


def test_layer_key_ignores_the_compose_stack(settings: Settings) -> None:
    key = _key(settings)
    (settings.project / "compose" / "web" / "config" / "app.env").write_text("GREETING=bye\n")
    (settings.project / "compose" / "web" / "config" / "extra.env").write_text("X=1\n")
    assert _key(settings) == key


def test_layer_key_ignores_the_list_of_baked_files(settings: Settings) -> None:
    key = _key(settings)
    _edit_definition(
        settings,
        "  - {src: images/files/motd, dest: /etc/motd}\n",
        "  - {src: images/files/motd, dest: /etc/motd.d/welcome}\n"
        "  - {src: images/files/unrelated.txt, dest: /etc/unrelated.txt}\n",
    )
    assert _key(settings) == key


def test_layer_key_ignores_what_is_not_in_the_package_layer(settings: Settings) -> None:
    # The VM's size, ports and volumes are applied after the layer (block device, manifest, deploy).
    key = _key(settings)
    _edit_definition(settings, "cores: 2", "cores: 3")
    _edit_definition(settings, "disk_gb: 5", "disk_gb: 6")
    _edit_definition(settings, "{port: 80, service: nginx, from: [lan]}", "{port: 8080, service: nginx, from: [lan]}")
    assert _key(settings) == key


def test_layer_key_ignores_where_outputs_go(settings: Settings, tmp_path: Path) -> None:
    moved = dataclasses.replace(settings, build_dir=tmp_path / "elsewhere", cache_dir=tmp_path / "cache2")
    assert _key(moved) == _key(settings)


def test_layer_path_is_in_the_cache_named_by_role_and_key(settings: Settings) -> None:
    expected = settings.cache_dir / "layers" / f"{ROLE}-0123456789abcdef.tar"
    assert layer_path(settings, ROLE, "0123456789abcdef") == expected


def test_layer_path_differs_per_role(settings: Settings) -> None:
    key = _key(settings)
    assert layer_path(settings, "minimal", key) != layer_path(settings, ROLE, key)


# --- freshness -----------------------------------------------------------------------------------


def test_layers_live_for_one_day() -> None:
    assert LAYER_MAX_AGE_SECONDS == 24 * 3600


def test_a_missing_layer_is_not_fresh(tmp_path: Path) -> None:
    assert not layer_is_fresh(tmp_path / "web-0123456789abcdef.tar")


def test_a_new_layer_is_fresh(tmp_path: Path) -> None:
    layer = tmp_path / "web-0123456789abcdef.tar"
    layer.touch()
    assert layer_is_fresh(layer)


def test_a_layer_is_fresh_until_it_is_a_day_old(tmp_path: Path) -> None:
    layer = tmp_path / "web-0123456789abcdef.tar"
    layer.touch()
    os.utime(layer, (1_000_000, 1_000_000))
    assert layer_is_fresh(layer, now=1_000_000 + LAYER_MAX_AGE_SECONDS - 1)
    assert not layer_is_fresh(layer, now=1_000_000 + LAYER_MAX_AGE_SECONDS)
    assert not layer_is_fresh(layer, now=1_000_000 + LAYER_MAX_AGE_SECONDS + 3600)


# --- the plan's mode -----------------------------------------------------------------------------


def test_plan_is_full_without_a_layer(settings: Settings) -> None:
    plan = plan_build(settings, ROLE)
    assert plan.mode == "full"
    assert plan.layer == layer_path(settings, ROLE, _key(settings))
    assert not settings.cache_dir.exists(), "planning writes nothing"


def test_plan_is_incremental_with_a_fresh_layer(settings: Settings) -> None:
    layer = _make_layer(settings)
    plan = plan_build(settings, ROLE)
    assert plan.mode == "incremental"
    assert plan.layer == layer


def test_plan_is_full_when_the_layer_is_older_than_a_day(settings: Settings) -> None:
    _make_layer(settings, age_seconds=LAYER_MAX_AGE_SECONDS + 60)
    assert plan_build(settings, ROLE).mode == "full"


def test_plan_is_incremental_when_the_layer_is_almost_a_day_old(settings: Settings) -> None:
    _make_layer(settings, age_seconds=LAYER_MAX_AGE_SECONDS - 600)
    assert plan_build(settings, ROLE).mode == "incremental"


def test_plan_is_full_with_refresh(settings: Settings) -> None:
    layer = _make_layer(settings)
    plan = plan_build(settings, ROLE, refresh=True)
    assert plan.mode == "full"
    assert plan.layer == layer, "a refresh replaces the same layer"


def test_plan_is_full_when_only_another_package_sets_layer_exists(settings: Settings) -> None:
    _make_layer(settings)
    _edit_definition(settings, "packages: [nginx, curl]", "packages: [nginx, curl, jq]")
    assert plan_build(settings, ROLE).mode == "full"


def test_plan_is_full_when_only_another_roles_layer_exists(settings: Settings) -> None:
    other = layer_path(settings, "minimal", _key(settings))
    other.parent.mkdir(parents=True)
    other.touch()
    assert plan_build(settings, ROLE).mode == "full"


def test_a_baked_file_change_stays_incremental_with_a_new_version(settings: Settings) -> None:
    # The point of the layer: changing what is baked rebuilds from the layer, yet is a new image.
    _make_layer(settings)
    before = plan_build(settings, ROLE)
    (settings.project / "images" / "files" / "motd").write_text("Another welcome.\n")
    (settings.project / "compose" / "web" / "config" / "app.env").write_text("GREETING=bye\n")
    after = plan_build(settings, ROLE)
    assert before.mode == after.mode == "incremental"
    assert after.layer == before.layer
    assert after.version != before.version


def test_describe_shows_the_mode_and_the_layer(settings: Settings) -> None:
    layer = _make_layer(settings)
    incremental = plan_build(settings, ROLE).describe().splitlines()
    refreshed = plan_build(settings, ROLE, refresh=True).describe().splitlines()
    assert f"mode:     incremental (package layer: {layer})" in incremental
    assert f"mode:     full (package layer: {layer})" in refreshed


# --- argv and environment by mode ----------------------------------------------------------------


@pytest.fixture
def full(settings: Settings) -> BuildPlan:
    plan = plan_build(settings, ROLE)
    assert plan.mode == "full"
    return plan


@pytest.fixture
def incremental(settings: Settings) -> BuildPlan:
    _make_layer(settings)
    plan = plan_build(settings, ROLE)
    assert plan.mode == "incremental"
    return plan


def test_full_argv_writes_a_qcow2_and_a_root_tarball(full: BuildPlan) -> None:
    assert _option(full.argv, "-t") == "qcow2,tar"


def test_full_argv_installs_the_packages(full: BuildPlan) -> None:
    assert _option(full.argv, "-p").split(",") == full.definition.dib_args().packages
    assert "nginx" in _option(full.argv, "-p").split(",")


def test_full_argv_starts_from_debian_minimal(full: BuildPlan) -> None:
    elements = _elements(full.argv)
    assert elements[0] == "debian-minimal"
    assert "homelab-layer" not in elements


def test_full_env_has_no_layer(full: BuildPlan) -> None:
    assert "HOMELAB_LAYER_TAR" not in full.env


def test_incremental_argv_writes_only_a_qcow2(incremental: BuildPlan) -> None:
    assert _option(incremental.argv, "-t") == "qcow2"


def test_incremental_argv_installs_no_packages(incremental: BuildPlan) -> None:
    assert "-p" not in incremental.argv


def test_incremental_argv_uses_the_layer_elements_instead_of_debian_minimal(incremental: BuildPlan) -> None:
    assert _elements(incremental.argv) == INCREMENTAL_ELEMENTS
    assert INCREMENTAL_ELEMENTS[0] == "homelab-layer"
    assert "homelab-bake" in INCREMENTAL_ELEMENTS
    assert "debian-minimal" not in incremental.argv


def test_incremental_argv_keeps_the_definitions_extra_elements(settings: Settings) -> None:
    _append_to_definition(settings, "elements: [growroot]\n")
    _make_layer(settings)
    plan = plan_build(settings, ROLE)
    assert plan.mode == "incremental"
    assert _elements(plan.argv) == [*INCREMENTAL_ELEMENTS, "growroot"]


def test_incremental_argv_keeps_size_and_output(full: BuildPlan, incremental: BuildPlan) -> None:
    assert _option(incremental.argv, "--image-size") == _option(full.argv, "--image-size") == "5"
    assert _option(incremental.argv, "-o") == _option(full.argv, "-o")
    assert _option(incremental.argv, "-a") == "amd64"


def test_incremental_env_names_the_layer(incremental: BuildPlan) -> None:
    assert incremental.env["HOMELAB_LAYER_TAR"] == str(incremental.layer)


def test_incremental_env_is_the_full_env_plus_the_layer(full: BuildPlan, incremental: BuildPlan) -> None:
    # Release, kernel and units still reach homelab-layer, homelab-base and homelab-bake.
    extra = {k: v for k, v in incremental.env.items() if k not in full.env}
    assert extra == {"HOMELAB_LAYER_TAR": str(incremental.layer)}
    assert {k: v for k, v in incremental.env.items() if k in full.env} == full.env
    assert incremental.env["DIB_RELEASE"] == "trixie"


def test_the_version_is_the_same_in_both_modes(full: BuildPlan, incremental: BuildPlan) -> None:
    assert incremental.version == full.version
    assert incremental.inputs_hash == full.inputs_hash
    assert incremental.qcow2 == full.qcow2
    assert incremental.manifest == full.manifest


def test_dib_argv_by_mode(full: BuildPlan, tmp_path: Path) -> None:
    output = tmp_path / "out" / ROLE
    full_argv = dib_argv(full.definition, output, "full")
    incremental_argv = dib_argv(full.definition, output, "incremental")
    assert dib_argv(full.definition, output) == full_argv, "full is the default"
    assert _option(full_argv, "-t") == "qcow2,tar"
    assert _option(incremental_argv, "-t") == "qcow2"
    assert "-p" in full_argv
    assert "-p" not in incremental_argv


def test_incremental_elements_are_ours_or_dibs() -> None:
    ours = {"homelab-layer", "homelab-base", "homelab-bake"}
    assert ours <= set(INCREMENTAL_ELEMENTS)
    for element in ours:
        assert (ELEMENTS_DIR / element).is_dir()


# --- keeping the layer ---------------------------------------------------------------------------


def _ctx(settings: Settings, plan: BuildPlan) -> BuildContext:
    workdir = settings.build_dir / ROLE / ".build-test"
    (workdir / "out").mkdir(parents=True)
    return BuildContext(settings=settings, plan=plan, reporter=Silent(), workdir=workdir)


def _produce_tar(ctx: BuildContext) -> Path:
    produced = ctx.workdir / "out" / f"{ROLE}.tar"
    produced.write_bytes(TAR_BYTES)
    return produced


def _layers(settings: Settings) -> list[str]:
    return sorted(p.name for p in (settings.cache_dir / "layers").iterdir())


def test_keeping_moves_the_root_tarball_to_the_layer_path(settings: Settings, full: BuildPlan) -> None:
    ctx = _ctx(settings, full)
    produced = _produce_tar(ctx)
    keep_package_layer(ctx)
    assert full.layer.read_bytes() == TAR_BYTES
    assert not produced.exists()
    assert _layers(settings) == [full.layer.name], "no temporary file is left"


def test_a_kept_layer_makes_the_next_plan_incremental(settings: Settings, full: BuildPlan) -> None:
    ctx = _ctx(settings, full)
    _produce_tar(ctx)
    keep_package_layer(ctx)
    again = plan_build(settings, ROLE)
    assert again.mode == "incremental"
    assert again.env["HOMELAB_LAYER_TAR"] == str(full.layer)


def test_keeping_replaces_older_layers_of_the_role(settings: Settings, full: BuildPlan) -> None:
    layers = settings.cache_dir / "layers"
    layers.mkdir(parents=True)
    for name in (f"{ROLE}-0000000000000000.tar", f"{ROLE}-1111111111111111.tar", full.layer.name):
        (layers / name).write_bytes(b"old\n")
    ctx = _ctx(settings, full)
    _produce_tar(ctx)
    keep_package_layer(ctx)
    assert _layers(settings) == [full.layer.name]
    assert full.layer.read_bytes() == TAR_BYTES


def test_keeping_leaves_other_roles_layers(settings: Settings, full: BuildPlan) -> None:
    layers = settings.cache_dir / "layers"
    layers.mkdir(parents=True)
    others = ["minimal-0000000000000000.tar", "intranet-1111111111111111.tar"]
    for name in others:
        (layers / name).write_bytes(b"another role's layer\n")
    ctx = _ctx(settings, full)
    _produce_tar(ctx)
    keep_package_layer(ctx)
    assert _layers(settings) == sorted([*others, full.layer.name])
    assert all((layers / name).read_bytes() == b"another role's layer\n" for name in others)


def test_keeping_leaves_the_layers_of_a_role_whose_name_starts_with_this_one(
    settings: Settings, full: BuildPlan
) -> None:
    layers = settings.cache_dir / "layers"
    layers.mkdir(parents=True)
    other = layers / f"{ROLE}-proxy-0000000000000000.tar"
    other.write_bytes(b"another role's layer\n")
    ctx = _ctx(settings, full)
    _produce_tar(ctx)
    keep_package_layer(ctx)
    assert other.exists()


def test_keeping_does_nothing_after_an_incremental_build(settings: Settings, incremental: BuildPlan) -> None:
    incremental.layer.write_bytes(b"the layer this build started from\n")
    older = incremental.layer.with_name(f"{ROLE}-0000000000000000.tar")
    older.write_bytes(b"old\n")
    ctx = _ctx(settings, incremental)
    produced = _produce_tar(ctx)
    keep_package_layer(ctx)
    assert incremental.layer.read_bytes() == b"the layer this build started from\n"
    assert older.exists()
    assert produced.read_bytes() == TAR_BYTES


def test_keeping_without_a_tarball_fails_and_leaves_the_cache_alone(settings: Settings, full: BuildPlan) -> None:
    older = full.layer.with_name(f"{ROLE}-0000000000000000.tar")
    older.parent.mkdir(parents=True)
    older.write_bytes(b"old\n")
    ctx = _ctx(settings, full)
    with pytest.raises(BuildError, match=r"no root tarball at .*web\.tar"):
        keep_package_layer(ctx)
    assert _layers(settings) == [older.name]


def test_the_layer_is_kept_just_before_the_image_is_published() -> None:
    # A published image always left its layer: otherwise "up to date" would block the next layer.
    steps = [step for _name, step in BUILD_STEPS]
    assert steps.index(keep_package_layer) == steps.index(publish) - 1


# --- the elements --------------------------------------------------------------------------------


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def test_homelab_layer_replaces_the_operating_system_element() -> None:
    element = ELEMENTS_DIR / "homelab-layer"
    assert "operating-system" in (element / "element-provides").read_text().split()


def test_homelab_layer_unpacks_the_layer_tar_into_the_root() -> None:
    script = ELEMENTS_DIR / "homelab-layer" / "root.d" / "08-homelab-layer"
    assert _executable(script)
    text = script.read_text()
    assert "set -eu" in text
    assert re.search(r"\$\{HOMELAB_LAYER_TAR:\?", text), "fails when no layer is named"
    assert re.search(r'tar -C "\$TARGET_ROOT"[^\n]*-x[a-z]*f "\$layer"', text)


BAKE_SCRIPT = ELEMENTS_DIR / "homelab-bake" / "post-install.d" / "60-homelab-bake"


def test_bake_script_is_executable_and_strict() -> None:
    assert _executable(BAKE_SCRIPT)
    assert "set -eu" in BAKE_SCRIPT.read_text()


def test_bake_script_uses_the_list_the_builder_stages() -> None:
    text = BAKE_SCRIPT.read_text()
    assert BAKED_LIST_DEST == "/etc/homelab/baked.list"
    assert "stage=/tmp/in_target.d/homelab-bake-tree" in text
    extra_data = (ELEMENTS_DIR / "homelab-bake" / "extra-data.d" / "60-homelab-bake").read_text()
    assert '"$TMP_HOOKS_PATH/homelab-bake-tree"' in extra_data, "the stage is where extra-data.d puts it"


def test_bake_script_removes_what_the_old_list_has_and_the_new_one_lacks() -> None:
    text = BAKE_SCRIPT.read_text()
    # Only when the root has an old list (a full build's root has none, and set -e must not stop it).
    assert re.search(r"if \[ -f /etc/homelab/baked\.list \]", text)
    # Each line of the old list (the root's)...
    assert re.search(r"done\s*<\s*/etc/homelab/baked\.list", text)
    assert re.search(r"while IFS= read -r path", text)
    # ...is removed unless it is a whole line (-x) taken literally (-F) of the new list (the stage's).
    compare = re.search(
        r'grep -(?P<flags>[a-zA-Z]+) (?:-e )?"\$path" "\$stage/etc/homelab/baked\.list" \|\| rm -f -- "\$path"', text
    )
    assert compare, "the old list's entries are checked against the stage's list, then removed"
    assert {"q", "x", "F"} <= set(compare["flags"])


def test_bake_script_compares_before_the_new_list_replaces_the_old() -> None:
    # cp copies the stage's baked.list over /etc/homelab/baked.list: comparing after it would remove nothing.
    lines = BAKE_SCRIPT.read_text().splitlines()
    loop = next(i for i, line in enumerate(lines) if "done < /etc/homelab/baked.list" in line)
    copy = next(i for i, line in enumerate(lines) if line.startswith("cp -a"))
    assert loop < copy
    assert lines[copy] == 'cp -a --no-preserve=ownership "$stage"/. /'
