"""Fixtures shared by the unit tests of the build."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from builder.settings import Settings
from tests.conftest import FIXTURES


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings over a copy of the fixture project, with build and cache dirs of the test's own."""
    project = tmp_path / "project"
    shutil.copytree(FIXTURES / "project", project)
    return Settings(
        project=project,
        build_dir=tmp_path / "build",
        cache_dir=tmp_path / "cache",
        mirror="http://mirror.test/debian",
        security_mirror="http://mirror.test/debian-security",
    )
