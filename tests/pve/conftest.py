"""Fixtures: a running emulator (`pve`) and a proxmoxer client logged in with its API token (`api`)."""

from __future__ import annotations

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
