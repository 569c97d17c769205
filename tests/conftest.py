"""Shared fixtures. Unit tests cannot start processes: only tests marked `vm` or `host` may."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

PROJECT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


# Tests that may start programs: `vm` (image builds, QEMU) and `host` (local programs such as a loopback
# registry or skopeo, no VM).
PROCESS_MARKS = ("vm", "host")


class ProcessStartedInUnitTest(AssertionError):
    pass


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise ProcessStartedInUnitTest(f"a unit test tried to start a process: {args[:1]!r}; mark it `vm` if it must")


@pytest.fixture(autouse=True)
def no_processes_outside_vm_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way Python starts a program is refused unless the test is marked `vm` or `host`."""
    if any(request.node.get_closest_marker(mark) is not None for mark in PROCESS_MARKS):
        return
    monkeypatch.setattr(subprocess, "Popen", _refuse)
    monkeypatch.setattr(os, "system", _refuse)
    monkeypatch.setattr(os, "fork", _refuse)
    monkeypatch.setattr(os, "execv", _refuse)
    monkeypatch.setattr(os, "execve", _refuse)
    monkeypatch.setattr(os, "posix_spawn", _refuse)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", _refuse)
    monkeypatch.setattr(asyncio, "create_subprocess_shell", _refuse)


@pytest.fixture
def project() -> Path:
    return PROJECT


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES
