"""Small synchronous wrappers over qemu.qmp (QMP) and the guest agent's socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from .errors import BootError


async def _execute(sock: Path, command: str, arguments: dict[str, Any] | None) -> Any:
    client = QMPClient("homelab")
    await client.connect(str(sock))
    try:
        return await client.execute(command, arguments)
    finally:
        # After `quit` QEMU closes the monitor as soon as it answered: the disconnect then meets EOF, which says
        # nothing about the command (its answer, or its error, is already in).
        with contextlib.suppress(EOFError, OSError, QMPError):
            await client.disconnect()


def execute(sock: Path, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10) -> Any:
    """Run one QMP command against a QEMU's monitor socket and return its result."""
    try:
        return asyncio.run(asyncio.wait_for(_execute(sock, command, arguments), timeout))
    except (TimeoutError, OSError, EOFError, QMPError) as exc:
        why = str(exc) or ("timed out" if isinstance(exc, TimeoutError) else "the monitor closed")
        raise BootError(f"QMP {command} on {sock} failed: {why}") from None


def wait_for_monitor(sock: Path, timeout: float, alive: Any) -> None:
    """Wait until QEMU answers on its monitor socket (alive() false means it already died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise BootError("QEMU exited during start-up")
        if sock.exists():
            try:
                execute(sock, "query-status", timeout=5)
                return
            except BootError:
                pass
        time.sleep(0.2)
    raise BootError(f"QEMU's monitor {sock} did not answer within {timeout:.0f} s")


async def _powerdown(sock: Path, timeout: float) -> bool:
    """ACPI power button, then wait for the guest's SHUTDOWN event; False when it never came."""
    client = QMPClient("homelab-powerdown")
    await client.connect(str(sock))
    try:
        with client.listener(("SHUTDOWN",)) as listener:
            await client.execute("system_powerdown")
            try:
                async def first_event() -> None:
                    async for _event in listener:
                        return

                await asyncio.wait_for(first_event(), timeout)
                return True
            except TimeoutError:
                return False
    finally:
        await client.disconnect()


def powerdown(sock: Path, timeout: float) -> bool:
    try:
        return asyncio.run(_powerdown(sock, timeout))
    except (OSError, QMPError):
        return False


def guest_agent_ping(sock: Path, timeout: float = 5) -> bool:
    """True when qemu-guest-agent in the guest answers guest-sync + guest-ping on its virtio port."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(sock))
            token = int(time.time()) % 1000000
            conn.sendall(json.dumps({"execute": "guest-sync", "arguments": {"id": token}}).encode() + b"\n")
            if _read_json(conn).get("return") != token:
                return False
            conn.sendall(b'{"execute": "guest-ping"}\n')
            return "return" in _read_json(conn)
    except (OSError, ValueError):
        return False


def _read_json(conn: socket.socket) -> dict[str, Any]:
    buffer = b""
    while not buffer.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            raise ValueError("guest agent closed the connection")
        buffer += chunk
    result: dict[str, Any] = json.loads(buffer.decode().strip().splitlines()[-1])
    return result
