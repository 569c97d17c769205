"""The intranet's backups as baked: the script, its units and timers, the settings file they share (no processes).

The script itself runs for real in tests/integration/test_backup.py (host); here its pure parts are loaded as a
module, and the units are read as INI files and checked against images/intranet.yaml and builder.compose.ENV_FILES.
"""

from __future__ import annotations

import configparser
import importlib.util
import os
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

import pytest

from builder.compose import env_files
from builder.definition import load_role
from tests.conftest import PROJECT

FILES = PROJECT / "images" / "files" / "intranet"
SCRIPT_DEST = "/usr/local/libexec/homelab/backup"
ENV_FILE = "/etc/homelab/backup.env"
# subcommand -> does it need the stack (its database or its image)?
SERVICES = {"homelab-backup": ("backup", True), "homelab-backup-forget": ("forget", False),
            "homelab-backup-check": ("check", False), "homelab-backup-verify": ("verify", True)}


def _script() -> ModuleType:
    loader = SourceFileLoader("homelab_backup", str(FILES / "homelab-backup"))
    spec = importlib.util.spec_from_loader("homelab_backup", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string((FILES / name).read_text())
    return parser


def test_the_intranet_bakes_the_script_and_every_unit() -> None:
    baked = {entry["dest"]: entry for entry in load_role(PROJECT, "intranet")["files"]}
    assert baked[SCRIPT_DEST]["src"] == "images/files/intranet/homelab-backup"
    assert baked[SCRIPT_DEST]["mode"] == "0755"
    for service in SERVICES:
        for kind in ("service", "timer"):
            entry = baked[f"/etc/systemd/system/{service}.{kind}"]
            assert entry["src"] == f"images/files/intranet/{service}.{kind}"


def test_only_the_timers_are_enabled() -> None:
    units = load_role(PROJECT, "intranet")["units"]
    assert {f"{s}.timer" for s in SERVICES} <= set(units)
    assert not {f"{s}.service" for s in SERVICES} & set(units), "a timer starts its service"
    assert not any(u.startswith("homelab-backup") for u in load_role(PROJECT, "extranet")["units"])


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_runs_one_subcommand_with_the_settings_file(service: str) -> None:
    command, needs_stack = SERVICES[service]
    unit = _unit(f"{service}.service")
    assert unit["Service"]["Type"] == "oneshot"
    assert unit["Service"]["ExecStart"] == f"{SCRIPT_DEST} {command}"
    assert unit["Service"]["EnvironmentFile"] == ENV_FILE
    # Without the settings (an image booted without cloud-init's files) the unit is skipped, not failed.
    assert unit["Unit"]["ConditionPathExists"] == ENV_FILE
    assert ("homelab-stack.service" in unit["Unit"].get("After", "").split()) == needs_stack
    assert "Install" not in unit, "started by its timer only"
    assert command in _script().COMMANDS


@pytest.mark.parametrize("service", SERVICES)
def test_each_timer_is_persistent_spread_and_enabled_under_timers_target(service: str) -> None:
    timer = _unit(f"{service}.timer")["Timer"]
    assert timer["OnCalendar"] and timer["RandomizedDelaySec"]
    assert timer["Persistent"] == "true", "a run missed while the VM was off happens at the next boot"
    assert "Unit" not in timer, "it starts the service of its own name"
    assert _unit(f"{service}.timer")["Install"]["WantedBy"] == "timers.target"


def test_the_settings_file_is_the_one_cloud_init_writes_and_the_script_reads() -> None:
    backup = env_files("intranet")[ENV_FILE]
    assert not backup.stack
    script = _script()
    assert str(script.ENV_FILE) == ENV_FILE
    text = (FILES / "homelab-backup").read_text()
    for name in backup.constants:
        if name.startswith("HOMELAB_BACKUP_KEEP_"):
            assert f'keep("{name.removeprefix("HOMELAB_BACKUP_KEEP_")}")' in text, name


def test_the_env_file_reader_takes_cloud_inits_quoting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / "backup.env"
    env.write_text("RESTIC_REPOSITORY='/srv/backups/restic'\nRESTIC_PASSWORD='p@ss: w0rd # not a comment'\n")
    monkeypatch.delenv("RESTIC_REPOSITORY", raising=False)
    monkeypatch.setenv("RESTIC_PASSWORD", "from the environment")
    _script().load_env_file(env)
    assert os.environ["RESTIC_REPOSITORY"] == "/srv/backups/restic"
    assert os.environ["RESTIC_PASSWORD"] == "from the environment", "the environment wins"


DUMP = """--
-- PostgreSQL database cluster dump
--

\\restrict {key}

DROP ROLE IF EXISTS immich;
{scratch_drop}CREATE ROLE immich;
{scratch_create}\\unrestrict {key}
-- Dumped from database version 14.{minor}
COPY public.assets (id, file) FROM stdin;
1\tIMG_0001.jpg
{row}\\.
"""


def _dump(path: Path, key: str, row: str, scratch: bool = False, minor: int = 19) -> Path:
    path.write_text(DUMP.format(
        key=key, row=row, minor=minor,
        scratch_drop="DROP ROLE IF EXISTS homelab_verify;\n" if scratch else "",
        scratch_create=("CREATE ROLE homelab_verify;\nALTER ROLE homelab_verify WITH SUPERUSER LOGIN;\n"
                        if scratch else ""),
    ))
    return path


def test_dumps_of_the_same_data_compare_equal(tmp_path: Path) -> None:
    backed_up = _dump(tmp_path / "a.sql", "KeyOfTheLiveRun", "2\tIMG_0002.heic\n")
    restored = _dump(tmp_path / "b.sql", "KeyOfTheScratchRun", "2\tIMG_0002.heic\n", scratch=True, minor=20)
    assert _script().dump_difference(backed_up, restored) is None


def test_a_differing_row_is_named_with_its_line(tmp_path: Path) -> None:
    backed_up = _dump(tmp_path / "a.sql", "k1", "2\tIMG_0002.heic\n")
    restored = _dump(tmp_path / "b.sql", "k2", "2\tIMG_0002.jpg\n", scratch=True)
    problem = _script().dump_difference(backed_up, restored)
    assert problem is not None
    assert "at line 13 of immich.sql" in problem and "IMG_0002.heic" in problem and "IMG_0002.jpg" in problem


def test_a_restored_dump_missing_its_end_differs(tmp_path: Path) -> None:
    backed_up = _dump(tmp_path / "a.sql", "k1", "2\tIMG_0002.heic\n")
    restored = tmp_path / "b.sql"
    restored.write_text("".join(backed_up.read_text().splitlines(keepends=True)[:-3]))
    problem = _script().dump_difference(backed_up, restored)
    assert problem is not None and "restored nothing" in problem
