"""Daily operations on a role's running VM over ssh: its stack's logs and its backups (`make logs-ROLE`,
`make backup-ROLE`). The target is the local VM (`homelab boot`) or a host given as ssh://user@host[:port]."""

from __future__ import annotations

from urllib.parse import urlsplit

from . import localvm
from .definition import load_role
from .errors import HomelabError
from .runner import run
from .settings import Settings

STACK = "--project-name homelab --env-file /run/homelab/stack.env"
# The backup script runs through its units, so a run by hand has the timers' settings (backup.env) and journal.
BACKUP_COMMANDS = {
    "run": "sudo systemctl start homelab-backup.service && sudo journalctl --no-pager -n 30 -u homelab-backup.service",
    "verify": "sudo systemctl start homelab-backup-verify.service && "
              "sudo journalctl --no-pager -n 30 -u homelab-backup-verify.service",
    "snapshots": "sudo sh -c 'set -a; . /etc/homelab/backup.env; exec restic snapshots'",
}
BACKUP_SCRIPT = "/usr/local/libexec/homelab/backup"


def ssh_prefix(settings: Settings, role: str, host: str | None) -> list[str]:
    """The ssh command line (without the remote command) that reaches ROLE's VM."""
    if host is None:
        state = localvm.running_vm(settings, role)
        if state is None:
            raise HomelabError(f"no local {role} VM is running: `homelab boot {role}` first, or give --host")
        return localvm.ssh_argv(state, "")[:-1]
    parts = urlsplit(host)
    if parts.scheme != "ssh" or not parts.hostname or not parts.username or parts.path not in ("", "/"):
        raise HomelabError(f"--host {host!r}: expected ssh://user@host[:port]")
    return ["ssh", "-p", str(parts.port or 22), "-o", "BatchMode=yes", f"{parts.username}@{parts.hostname}"]


def stack_logs_command(lines: int) -> str:
    if lines < 1:
        raise HomelabError(f"--lines {lines}: must be at least 1")
    return (f"sudo journalctl --no-pager -n {lines} -u homelab-images.service -u homelab-stack.service; "
            f"cd /opt/homelab/compose && sudo docker compose {STACK} logs --no-color --tail {lines}")


def stack_logs(settings: Settings, role: str, lines: int = 100, host: str | None = None) -> str:
    """The stack's units' journal and every container's last `lines` lines."""
    argv = [*ssh_prefix(settings, role, host), stack_logs_command(lines)]
    return run(argv, timeout=120).stdout


def backup_command(settings: Settings, role: str, action: str) -> str:
    if action not in BACKUP_COMMANDS:
        raise HomelabError(f"backup {action!r}: expected one of {', '.join(BACKUP_COMMANDS)}")
    baked = {entry["dest"] for entry in load_role(settings.project, role)["files"]}
    if BACKUP_SCRIPT not in baked:
        raise HomelabError(f"{role} has no backups (images/{role}.yaml does not bake {BACKUP_SCRIPT})")
    return BACKUP_COMMANDS[action]


def backup(settings: Settings, role: str, action: str, host: str | None = None) -> str:
    """Run a backup now, the restore test now, or list the snapshots, on ROLE's VM."""
    command = backup_command(settings, role, action)
    return run([*ssh_prefix(settings, role, host), command], timeout=6 * 3600).stdout
