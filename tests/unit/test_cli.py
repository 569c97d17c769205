"""The `homelab` command through click's test runner: errors are one line, --debug shows the traceback.

No process is started (tests/conftest.py refuses them): build steps that would run one are never reached.
Build outputs and caches go to a temporary directory, never to the checkout's build/.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner, Result

from builder import build
from builder.cli import main
from builder.errors import UnknownRoleError
from builder.settings import load_settings
from tests.conftest import FIXTURES, PROJECT

SITE = FIXTURES / "site" / "test-site.yaml"
SECRETS = FIXTURES / "site" / "test-secrets.yaml"


@pytest.fixture(autouse=True)
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Outputs and caches in tmp_path; no site, secrets, project or mirror from the caller's environment."""
    for name in ("HOMELAB_PROJECT", "HOMELAB_SITE", "HOMELAB_SECRETS", "HOMELAB_MIRROR", "HOMELAB_SECURITY_MIRROR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOMELAB_BUILD_DIR", str(tmp_path / "build"))
    monkeypatch.setenv("HOMELAB_CACHE_DIR", str(tmp_path / "cache"))
    # `main` calls logging.basicConfig with the runner's stderr: leave the root logger as it was.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.fixture
def fixture_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of tests/fixtures/project (roles `minimal` and `web`) as HOMELAB_PROJECT."""
    project = tmp_path / "project"
    shutil.copytree(FIXTURES / "project", project)
    monkeypatch.setenv("HOMELAB_PROJECT", str(project))
    return project.resolve()


@pytest.fixture
def build_dir(tmp_path: Path) -> Path:
    return (tmp_path / "build").resolve()


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_error_line(result: Result, exit_code: int = 1) -> str:
    """The run failed with exactly one line on stderr, nothing on stdout and no traceback; that line."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), "the error was handled, not raised"
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def last_error_line(result: Result, exit_code: int = 1) -> str:
    """For a real build, whose step lines precede the error on stderr: the last line, which is the error."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), "the error was handled, not raised"
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert lines, "an error was printed"
    assert lines[-1].startswith("error: ")
    assert sum(line.startswith("error: ") for line in lines) == 1
    return lines[-1]


# --- errors are one line -------------------------------------------------------------------------


def test_unknown_role_names_the_known_roles() -> None:
    # The project's own roles (images/*.yaml of this checkout).
    result = invoke("build", "image", "x", "--dry-run")
    assert one_error_line(result) == "error: unknown role 'x' (known roles: extranet, intranet)"


def test_unknown_role_in_another_project(fixture_project: Path) -> None:
    result = invoke("build", "image", "x", "--dry-run")
    assert one_error_line(result) == "error: unknown role 'x' (known roles: minimal, web)"


def test_invalid_yaml_names_file_and_line(fixture_project: Path) -> None:
    definition = fixture_project / "images" / "web.yaml"
    definition.write_text("description: broken\nbase: debian-13\nkernel: cloud: generic\n")
    line = one_error_line(invoke("build", "image", "web", "--dry-run"))
    assert line.startswith(f"error: {definition}:3: invalid YAML: ")


def test_unknown_key_is_named_with_file_and_line(fixture_project: Path) -> None:
    definition = fixture_project / "images" / "web.yaml"
    lines = definition.read_text().splitlines()
    definition.write_text("\n".join([*lines, "colour: blue", ""]))
    line = one_error_line(invoke("build", "image", "web", "--dry-run"))
    assert line.startswith(f"error: {definition}:{len(lines) + 1}: unknown key 'colour' (known: ")


def test_an_unexpected_exception_is_one_line_too(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(build, "plan_build", broken)
    line = one_error_line(invoke("build", "image", "intranet", "--dry-run"), exit_code=2)
    assert line == "error: unexpected RuntimeError: a bug of ours (rerun with --debug for details)"


# --- --debug -------------------------------------------------------------------------------------


def test_debug_lets_the_error_propagate_with_its_traceback() -> None:
    result = invoke("--debug", "build", "image", "x", "--dry-run")
    assert result.exit_code != 0
    assert isinstance(result.exception, UnknownRoleError)
    assert result.exc_info is not None and result.exc_info[2] is not None, "the traceback is kept"
    assert "error: unknown role" not in result.output, "not turned into the one-line message"


def test_debug_lets_an_unexpected_exception_propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(build, "plan_build", broken)
    result = invoke("--debug", "build", "image", "intranet", "--dry-run")
    assert isinstance(result.exception, RuntimeError)


def test_without_debug_the_same_error_is_one_line() -> None:
    result = invoke("build", "image", "x", "--dry-run")
    one_error_line(result)
    assert not isinstance(result.exception, UnknownRoleError)


# --- build image ---------------------------------------------------------------------------------


def test_dry_run_prints_the_command_and_writes_nothing(fixture_project: Path, build_dir: Path, tmp_path: Path) -> None:
    result = invoke("build", "image", "web", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "disk-image-create" in result.stdout
    assert "  DIB_RELEASE=trixie" in result.stdout.splitlines()
    assert not build_dir.exists()
    assert not (tmp_path / "cache").exists()


def test_dry_run_of_a_locked_role_writes_nothing(fixture_project: Path, build_dir: Path) -> None:
    result = invoke("build", "image", "web", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "disk-image-create" in result.stdout
    assert f"output:   {build_dir / 'web'}/web-" in result.stdout
    assert not build_dir.exists()


def test_a_role_whose_stack_is_not_locked_is_refused_before_anything_is_built(build_dir: Path) -> None:
    # The checkout's roles have no lock until the owner runs `homelab lock` against the real registries.
    if (PROJECT / "compose" / "intranet" / "images.lock.json").exists():
        pytest.skip("this checkout has a lock for intranet")
    result = invoke("build", "image", "intranet", "--dry-run")
    assert result.exit_code == 1
    assert result.output.strip() == "error: compose/intranet: no lock file: run `homelab lock intranet`"
    assert not build_dir.exists()


@pytest.fixture
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)


@pytest.fixture
def all_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: f"/usr/bin/{name}")


def _final_outputs(role: str) -> tuple[Path, Path]:
    plan = build.plan_build(load_settings(), role)
    return plan.qcow2, plan.manifest


def test_building_needs_root(fixture_project: Path, monkeypatch: pytest.MonkeyPatch, all_tools: None) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    line = last_error_line(invoke("build", "image", "web"))
    assert "needs root" in line
    assert not any(p.exists() for p in _final_outputs("web"))


def test_a_missing_tool_names_its_debian_package(
    fixture_project: Path, monkeypatch: pytest.MonkeyPatch, as_root: None
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None if name == "qemu-img" else f"/bin/{name}")
    line = last_error_line(invoke("build", "image", "web"))
    assert line == "error: qemu-img not found: install the Debian package qemu-utils"
    assert not any(p.exists() for p in _final_outputs("web"))


def test_a_full_disk_stops_the_build_before_anything_is_written(
    fixture_project: Path, build_dir: Path, monkeypatch: pytest.MonkeyPatch, as_root: None, all_tools: None
) -> None:
    gib = 1024**3
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=100 * gib, used=99 * gib, free=gib))
    line = last_error_line(invoke("build", "image", "web"))
    assert line.startswith(f"error: not enough free space in {build_dir / 'web'}: 1.0 GiB free")
    qcow2, manifest = _final_outputs("web")
    assert not qcow2.exists()
    assert not manifest.exists()
    assert list((build_dir / "web").iterdir()) == [], "no work directory or partial file is left"


# --- render --------------------------------------------------------------------------------------


def test_render_prints_the_three_documents() -> None:
    result = invoke("render", "intranet", "--site", str(SITE), "--secrets", str(SECRETS))
    assert result.exit_code == 0, result.output
    headers = [line for line in result.stdout.splitlines() if line.startswith("# --- ")]
    assert headers == ["# --- user-data", "# --- meta-data", "# --- network-config"]
    user_data = result.stdout.split("# --- user-data\n", 1)[1]
    assert user_data.startswith("#cloud-config\n")
    assert "intranet" in result.stdout
    assert "10.99.0.101" in result.stdout.split("# --- network-config\n", 1)[1]


def test_render_with_a_site_lacking_the_role_names_the_site_file(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    text = SITE.read_text()
    host = "  intranet: {hostname: intranet, address: 10.99.0.101/24}\n"
    assert host in text
    site.write_text(text.replace(host, ""))
    line = one_error_line(invoke("render", "intranet", "--site", str(site), "--secrets", str(SECRETS)))
    assert line == f"error: site file {site} has no hosts.intranet (hosts: extranet)"


def test_render_of_an_unknown_role_is_one_line() -> None:
    line = one_error_line(invoke("render", "x", "--site", str(SITE), "--secrets", str(SECRETS)))
    assert line == "error: unknown role 'x' (known roles: extranet, intranet)"


# --- fields --------------------------------------------------------------------------------------


def test_fields_lists_every_key_with_nested_ones_dotted() -> None:
    result = invoke("fields")
    assert result.exit_code == 0, result.output
    keys = [line.split()[0] for line in result.stdout.splitlines()]
    assert "vm.cores" in keys
    assert {"description", "base", "packages", "files[].src", "volumes[].kind"} <= set(keys)


def test_the_project_is_the_checkout_by_default() -> None:
    assert load_settings().project == PROJECT


# --- Proxmox VE ----------------------------------------------------------------------------------------

PVE_SITE = FIXTURES / "site" / "site-proxmox-defaults.yaml"


def test_preflight_without_a_token_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PVE_TOKEN", raising=False)
    result = invoke("preflight", "--site", str(PVE_SITE))
    assert result.exit_code == 1
    assert result.output == ("error: PVE_TOKEN is not set: export PVE_TOKEN=user@realm!tokenid=secret (see "
                             "`homelab token-role` for creating one)\n")


def test_preflight_without_a_proxmox_section_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PVE_TOKEN", "homelab@pve!deploy=secret")
    result = invoke("preflight", "intranet", "--site", str(SITE))
    assert result.exit_code == 1
    assert result.output.startswith("error: site file ") and "has no proxmox section" in result.output
    assert result.output.count("\n") == 1


def test_preflight_of_an_unknown_role_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PVE_TOKEN", "homelab@pve!deploy=secret")
    result = invoke("preflight", "backup", "--site", str(PVE_SITE))
    assert result.exit_code == 1 and "has no hosts.backup" in result.output


def test_token_role_prints_the_role_and_commands() -> None:
    result = invoke("token-role", "--site", str(PVE_SITE), "--token", "deploy@pve!swap")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "pveum user token add deploy@pve swap --privsep 1" in "\n".join(lines)
    assert "pveum acl modify /storage/local-zfs --roles Homelab-storage-local-zfs --tokens 'deploy@pve!swap'" in lines
