"""One exception tree for the whole tool; the CLI catches HomelabError and prints one line."""

from __future__ import annotations


class HomelabError(Exception):
    """Base of every error a user can cause or meet; str() is the one line shown to them."""


class DefinitionError(HomelabError):
    """An image definition, site file or secrets file is invalid (names file, key and line)."""


class UnknownRoleError(HomelabError):
    """A role with no images/<role>.yaml."""


class RenderError(HomelabError):
    """cloud-init could not be rendered or does not pass cloud-init's schema."""


class ToolMissingError(HomelabError):
    """An external program is not installed; names the Debian package that provides it."""


class NotRootError(HomelabError):
    """A step needs root (loop devices, chroot) and we are not root."""


class CommandFailedError(HomelabError):
    """An external command exited non-zero; names the command, its exit code and its stderr tail."""

    def __init__(self, argv: list[str], returncode: int, stderr_tail: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        tail = f": {stderr_tail}" if stderr_tail else ""
        super().__init__(f"{argv[0]} failed with exit code {returncode}{tail}")


class BuildError(HomelabError):
    """A build step failed for a reason other than a failed command (disk full, missing output)."""


class BootError(HomelabError):
    """The local VM did not start or did not come up in time (includes the serial log tail)."""


class GuestPanic(BootError):
    """The guest kernel panicked while booting (its serial log says so): there is no point waiting for ssh."""


class VerifyError(HomelabError):
    """The testinfra suite found failures."""


class LockError(HomelabError):
    """An image tag could not be resolved to digests (the registry refused, or answered without them)."""


class ProxmoxError(HomelabError):
    """The Proxmox VE API refused or failed a call, or cannot be reached (names the call or the URL)."""


class ProxmoxTaskError(ProxmoxError):
    """A Proxmox VE task (an upload, a VM creation) ended in error or did not end in time; carries the log tail."""


class DeployError(HomelabError):
    """A deploy cannot start (bad input: nothing was changed) or failed (names the step; the journal says more)."""
