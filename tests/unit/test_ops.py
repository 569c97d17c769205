"""`homelab logs` and `homelab backup`: what they run where, and their bad input (no process is started here)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from builder import ops
from builder.errors import HomelabError
from builder.settings import Settings

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture
def real(settings: Settings) -> Settings:
    """The real project's definitions (the intranet bakes the backup script, the extranet does not)."""
    return dataclasses.replace(settings, project=PROJECT)


def test_a_host_is_reached_with_its_user_and_port(real: Settings) -> None:
    assert ops.ssh_prefix(real, "intranet", "ssh://homelab@192.0.2.10:2222") == [
        "ssh", "-p", "2222", "-o", "BatchMode=yes", "homelab@192.0.2.10"]
    assert ops.ssh_prefix(real, "intranet", "ssh://homelab@192.0.2.10")[2] == "22"


@pytest.mark.parametrize("host", ["homelab@192.0.2.10", "ssh://192.0.2.10", "http://homelab@192.0.2.10",
                                  "ssh://homelab@192.0.2.10/srv"])
def test_a_malformed_host_is_one_line(real: Settings, host: str) -> None:
    with pytest.raises(HomelabError, match=r"expected ssh://user@host\[:port\]"):
        ops.ssh_prefix(real, "intranet", host)


def test_without_a_host_the_local_vm_must_be_running(real: Settings) -> None:
    with pytest.raises(HomelabError, match="no local intranet VM is running: `homelab boot intranet` first"):
        ops.ssh_prefix(real, "intranet", None)


def test_backup_actions_run_through_the_units(real: Settings) -> None:
    assert ops.backup_command(real, "intranet", "run").startswith("sudo systemctl start homelab-backup.service")
    assert "homelab-backup-verify.service" in ops.backup_command(real, "intranet", "verify")
    assert "restic snapshots" in ops.backup_command(real, "intranet", "snapshots")


def test_a_role_without_backups_or_an_unknown_action_is_refused(real: Settings) -> None:
    with pytest.raises(HomelabError, match="extranet has no backups"):
        ops.backup_command(real, "extranet", "run")
    with pytest.raises(HomelabError, match="backup 'restore': expected one of run, verify, snapshots"):
        ops.backup_command(real, "intranet", "restore")


def test_logs_cover_the_units_and_every_container() -> None:
    command = ops.stack_logs_command(50)
    assert "-u homelab-images.service -u homelab-stack.service" in command
    assert ("docker compose --project-name homelab --env-file /run/homelab/stack.env logs --no-color --tail 50"
            in command)
    with pytest.raises(HomelabError, match="--lines 0: must be at least 1"):
        ops.stack_logs_command(0)
