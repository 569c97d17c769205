"""builder.qmp against a QMP server on a unix socket that behaves like QEMU on `quit`: it answers, then closes."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder import qmp
from builder.errors import BootError

GREETING = {"QMP": {"version": {"qemu": {"major": 9, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}


class FakeMonitor:
    """One connection at a time: the greeting, qmp_capabilities, then each command answered from `answers`
    (a command QEMU exits on closes the socket right after its answer, as QEMU's `quit` does)."""

    def __init__(self, path: Path, answers: dict[str, dict[str, object]], closes_after: set[str]) -> None:
        self.path, self.answers, self.closes_after = path, answers, closes_after
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                self._talk(conn)

    def _talk(self, conn: socket.socket) -> None:
        conn.sendall(json.dumps(GREETING).encode() + b"\n")
        for request in _requests(conn):  # a JSON stream, as QEMU parses it: no newline needed
            command = request["execute"]
            self.seen.append(command)
            reply = {"return": {}} if command == "qmp_capabilities" else self.answers[command]
            ident = {"id": request["id"]} if "id" in request else {}
            conn.sendall(json.dumps({**reply, **ident}).encode() + b"\n")
            if command in self.closes_after:
                return

    def close(self) -> None:
        self.server.close()


def _requests(conn: socket.socket) -> Iterator[dict[str, object]]:
    decoder, buffer = json.JSONDecoder(), ""
    while chunk := conn.recv(4096):
        buffer += chunk.decode()
        while buffer.strip():
            try:
                request, end = decoder.raw_decode(buffer.lstrip())
            except ValueError:
                break
            buffer = buffer.lstrip()[end:]
            yield request


@pytest.fixture
def monitor(tmp_path: Path) -> Iterator[FakeMonitor]:
    server = FakeMonitor(tmp_path / "qmp.sock", {"quit": {"return": {}}, "query-status": {"return": {
        "status": "running", "running": True}}, "cont": {"error": {"class": "GenericError", "desc": "not paused"}}},
        closes_after={"quit"})
    yield server
    server.close()


def test_a_command_qemu_exits_on_is_done_though_the_monitor_closes_at_once(monitor: FakeMonitor) -> None:
    for _ in range(20):  # the close races the client's disconnect: repeat to meet it
        assert qmp.execute(monitor.path, "quit", timeout=5) == {}
    assert monitor.seen.count("quit") == 20


def test_results_and_errors_of_a_command(monitor: FakeMonitor) -> None:
    assert qmp.execute(monitor.path, "query-status")["status"] == "running"
    with pytest.raises(BootError, match=r"QMP cont on .*qmp\.sock failed: not paused"):
        qmp.execute(monitor.path, "cont")


def test_no_monitor_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(BootError, match=r"QMP quit on .*absent\.sock failed"):
        qmp.execute(tmp_path / "absent.sock", "quit", timeout=2)
