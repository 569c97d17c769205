"""localvm's boot: a guest kernel that panics is seen at once in its serial log, and booted once more."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from builder import localvm
from builder.errors import BootError, GuestPanic
from tests.conftest import FIXTURES

SERIAL = FIXTURES / "serial"


def state_with_serial(tmp_path: Path, fixture: str | None) -> localvm.VMState:
    """A VM whose QEMU has this test's pid and whose serial log is a fixture (None: not yet written)."""
    tmp_path.mkdir(exist_ok=True)
    if fixture is not None:
        shutil.copy(SERIAL / fixture, tmp_path / "serial.log")
    return localvm.VMState(role="intranet", pid=os.getpid(), accel="tcg", image="", version="", ssh_port=1,
                           user="admin", hostname="intranet", address="", run_dir=str(tmp_path))


@pytest.mark.parametrize(("fixture", "expected"), [
    ("panic-under-tcg.log", "Kernel panic - not syncing: Fatal exception in interrupt"),
    ("booting.log", None),
    (None, None),
])
def test_panic_line_is_the_kernels_first_panic_line(tmp_path: Path, fixture: str | None,
                                                   expected: str | None) -> None:
    assert localvm.panic_line(state_with_serial(tmp_path, fixture).serial_log) == expected


@pytest.mark.parametrize("qemu_runs", [True, False])  # a kernel booted with panic=N makes QEMU exit after it
def test_waiting_for_ssh_stops_at_a_panic_without_trying_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             qemu_runs: bool) -> None:
    # ssh would be a process: the unit tests' guard refuses it, so reaching it fails this test.
    monkeypatch.setattr(localvm, "_alive", lambda pid: qemu_runs)
    state = state_with_serial(tmp_path, "panic-under-tcg.log")
    with pytest.raises(GuestPanic, match=r"^the intranet VM's kernel panicked 0 s into its boot \(tcg\): "
                                         r"Kernel panic - not syncing: Fatal exception in interrupt$"):
        localvm._wait_for_ssh(state, timeout=600, reporter=localvm.Silent())


def test_kernel_initialised_waits_for_init_or_a_panic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localvm, "_alive", lambda pid: True)
    assert localvm.kernel_initialised(state_with_serial(tmp_path / "a", "booting.log"), timeout=5) is None
    panicked = state_with_serial(tmp_path / "b", "panic-under-tcg.log")
    assert localvm.kernel_initialised(panicked, timeout=5) == "Kernel panic - not syncing: Fatal exception in interrupt"


def test_kernel_initialised_gives_up_on_a_qemu_that_is_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localvm, "_alive", lambda pid: False)
    assert localvm.kernel_initialised(state_with_serial(tmp_path, None), timeout=600) is None


class Attempts:
    """Boot attempts that fail with the given errors in turn, then succeed; counts overlay resets."""

    def __init__(self, tmp_path: Path, *errors: BootError) -> None:
        self.errors = list(errors)
        self.state = state_with_serial(tmp_path, "booting.log")
        self.tries = 0
        self.resets = 0

    def boot(self) -> localvm.VMState:
        self.tries += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.state

    def reset(self, panic: GuestPanic) -> None:
        assert isinstance(panic, GuestPanic)
        self.resets += 1


def test_a_panic_boots_again_from_a_fresh_overlay(tmp_path: Path) -> None:
    attempts = Attempts(tmp_path, GuestPanic("first"), GuestPanic("second"))
    assert localvm.boot_again_after_panic(attempts.boot, attempts.reset) is attempts.state
    assert (attempts.tries, attempts.resets) == (3, 2)


def test_the_last_panic_is_the_error(tmp_path: Path) -> None:
    attempts = Attempts(tmp_path, GuestPanic("first"), GuestPanic("second"), GuestPanic("third"))
    with pytest.raises(GuestPanic, match=r"^third$"):
        localvm.boot_again_after_panic(attempts.boot, attempts.reset)
    assert (attempts.tries, attempts.resets) == (3, 2)


def test_other_boot_failures_are_not_retried(tmp_path: Path) -> None:
    attempts = Attempts(tmp_path, BootError("no ssh after 600 s"))
    with pytest.raises(BootError, match="no ssh"):
        localvm.boot_again_after_panic(attempts.boot, attempts.reset)
    assert (attempts.tries, attempts.resets) == (1, 0)
