import subprocess

import pytest

from builder import runner
from tests.conftest import ProcessStartedInUnitTest


def test_unit_tests_cannot_start_processes() -> None:
    with pytest.raises(ProcessStartedInUnitTest):
        subprocess.run(["true"], check=False)


def test_the_runner_is_guarded_too() -> None:
    with pytest.raises(ProcessStartedInUnitTest):
        runner.run(["true"])
