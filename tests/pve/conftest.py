"""Fixtures: a running emulator (`pve`) and a proxmoxer client logged in with its API token (`api`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from proxmoxer import ProxmoxAPI

from .emulator import PveEmulator


@pytest.fixture
def pve() -> Iterator[PveEmulator]:
    with PveEmulator() as emulator:
        yield emulator


@pytest.fixture
def api(pve: PveEmulator) -> ProxmoxAPI:
    return ProxmoxAPI(**pve.proxmoxer_kwargs(verify_ssl=str(pve.ca_file)))


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI's `main` calls logging.basicConfig with the runner's stderr: leave the root logger as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level
