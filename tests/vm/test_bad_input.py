"""Failures of real external programs: one clear line, non-zero exit, nothing half-written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TEST_SECRETS, TEST_SITE, homelab

pytestmark = pytest.mark.vm


def _project_copy(source: Path, tmp_path: Path) -> Path:
    root = tmp_path / "project"
    for name in ("images", "compose", "cloudinit"):
        shutil.copytree(source / name, root / name)
    return root


def test_a_failing_diskimage_builder_run_leaves_nothing_at_the_final_paths(stack_project: Path, tmp_path: Path) -> None:
    root = _project_copy(stack_project, tmp_path)  # locked against the stand-ins
    definition = root / "images" / "extranet.yaml"
    definition.write_text(definition.read_text() + "elements: [no-such-element]\n")
    build_dir = tmp_path / "build"
    env = {**os.environ, "HOMELAB_PROJECT": str(root), "HOMELAB_BUILD_DIR": str(build_dir)}
    proc = subprocess.run([sys.executable, "-m", "builder", "build", "image", "extranet"], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "disk-image-create failed with exit code" in last
    assert "no-such-element" in last
    assert "Traceback" not in proc.stderr
    leftovers = sorted(p.name for p in (build_dir / "extranet").iterdir())
    assert not [name for name in leftovers if name.endswith((".qcow2", ".manifest.json")) or name.startswith(".build")]


def test_qemu_failing_to_start_is_one_line_with_its_reason() -> None:
    homelab("build", "image", "extranet")
    proc = homelab("boot", "extranet", "--site", str(TEST_SITE), "--secrets", str(TEST_SECRETS), "--memory",
                   "100000000", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: QEMU did not start: ")
    assert "Traceback" not in proc.stderr
