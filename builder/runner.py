"""The one way this tool starts external processes: argv lists, logged, failures as CommandFailedError."""

from __future__ import annotations

import collections
import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import CommandFailedError, ToolMissingError

log = logging.getLogger("homelab.run")

# Which Debian package provides each program we run, for the "missing tool" message.
TOOL_PACKAGES = {
    "disk-image-create": "diskimage-builder (pip, installed by `make setup`)",
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "sudo": "sudo",
    "debootstrap": "debootstrap",
    "kpartx": "kpartx",
    "sgdisk": "gdisk",
    "mkfs.ext4": "e2fsprogs",
    "partx": "util-linux",
    "skopeo": "skopeo",
    "docker-registry": "docker-registry",
    "busybox": "busybox-static",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "virtiofsd": "qemu-system-common",
}
STDERR_TAIL_LINES = 12


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def describe(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def require_tool(name: str) -> str:
    """Absolute path of a program, or ToolMissingError naming the package to install."""
    path = shutil.which(name)
    if path is None:
        package = TOOL_PACKAGES.get(name, "?")
        raise ToolMissingError(f"{name} not found: install the Debian package {package}")
    return path


def _tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    input_text: str | None = None,
    check: bool = True,
) -> Result:
    """Run to completion, capturing output. Raises CommandFailedError when check and the exit is non-zero."""
    args = [os.fspath(a) for a in argv]
    log.info("run: %s", describe(args))
    try:
        proc = subprocess.run(
            args,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            timeout=timeout,
            input=input_text,
            # Never the caller's stdin (ssh would read it): input_text or nothing.
            stdin=None if input_text is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
        )
    except FileNotFoundError:
        require_tool(args[0])
        raise
    except subprocess.TimeoutExpired as exc:
        raise CommandFailedError(args, -1, f"timed out after {exc.timeout:.0f} s") from None
    result = Result(args, proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise CommandFailedError(args, proc.returncode, _tail(proc.stderr or proc.stdout))
    return result


def run_streaming(
    argv: Sequence[str | os.PathLike[str]],
    *,
    log_file: Path,
    on_line: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Result:
    """Run a long command with stdout+stderr merged into log_file, each line passed to on_line.

    Used for disk-image-create, whose progress is its output. The error carries the log's tail.
    """
    args = [os.fspath(a) for a in argv]
    log.info("run: %s (log: %s)", describe(args), log_file)
    tail: collections.deque[str] = collections.deque(maxlen=200)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.Popen(
            args,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except FileNotFoundError:
        require_tool(args[0])
        raise
    assert proc.stdout is not None
    try:
        with log_file.open("w", encoding="utf-8") as out:
            for line in proc.stdout:
                out.write(line)
                tail.append(line.rstrip("\n"))
                if on_line is not None:
                    on_line(line.rstrip("\n"))
        returncode = proc.wait()
    except BaseException:
        _terminate_group(proc)
        raise
    if returncode != 0:
        raise CommandFailedError(args, returncode, _tail("\n".join(tail), 6) + f" (full log: {log_file})")
    return Result(args, returncode, "", "")


def start(
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdout: IO[str] | int | None = subprocess.DEVNULL,
    stderr: IO[str] | int | None = subprocess.STDOUT,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[str]:
    """Start a long-running process (qemu, virtiofsd, a registry); the caller owns its lifetime."""
    args = [os.fspath(a) for a in argv]
    log.info("start: %s", describe(args))
    try:
        return subprocess.Popen(
            args,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            text=True,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
        )
    except FileNotFoundError:
        require_tool(args[0])
        raise


def _terminate_group(proc: subprocess.Popen[str]) -> None:
    """Stop a child and everything it started (DIB runs sudo, chroot, apt...)."""
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, PermissionError):
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
