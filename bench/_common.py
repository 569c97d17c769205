"""Shared by the bench scripts: a throwaway copy of the project to change inputs in, and timing."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TypeVar

from builder.definition import known_roles
from builder.lock import LOCK_NAME
from builder.settings import Settings, load_settings
from tests.standins import serve_standins

PROJECT = Path(__file__).resolve().parent.parent
# The test site (private test addresses, a throwaway key) every bench boots its VMs with.
TEST_SITE = PROJECT / "tests" / "fixtures" / "site" / "test-site.yaml"
TEST_SECRETS = PROJECT / "tests" / "fixtures" / "site" / "test-secrets.yaml"
T = TypeVar("T")


@contextmanager
def project_copy(build_dir: Path | None = None) -> Iterator[Settings]:
    """A copy of images/, compose/, cloudinit/ so a bench can edit inputs without touching the checkout.

    The package-layer cache stays the user's (~/.cache/homelab): that is what a rebuild reuses. Where the
    checkout's stacks are not locked (no registry reachable, as on the CI machines), the copy is locked
    against stand-in images on a loopback registry (tests/standins), which serves the build's fetches too.
    """
    with tempfile.TemporaryDirectory(prefix="homelab-bench-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        for name in ("images", "compose", "cloudinit"):
            shutil.copytree(PROJECT / name, root / name)
        os.environ["HOMELAB_BUILD_DIR"] = str(build_dir or root / "build")
        try:
            with ExitStack() as stack:
                if not all((root / "compose" / role / LOCK_NAME).exists() for role in known_roles(root)):
                    served = stack.enter_context(serve_standins(root / "standins", project=root))
                    os.environ["HOMELAB_REGISTRIES_CONF"] = str(served.registry.registries_conf)
                    print("no lock in the checkout: stacks locked against stand-in images on loopback")
                yield load_settings(root)
        finally:
            os.environ.pop("HOMELAB_BUILD_DIR", None)
            os.environ.pop("HOMELAB_REGISTRIES_CONF", None)


def timed(func: Callable[[], T]) -> tuple[float, T]:
    started = time.monotonic()
    result = func()
    return time.monotonic() - started, result


def report(rows: list[tuple[str, float]], ratio_name: str, numerator: float, denominator: float, goal: str) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        unit = "" if "MiB" in name else " s"  # sizes are labelled "... MiB"; everything else is seconds
        print(f"{name:<{width}}  {value:7.1f}{unit}")
    print(f"{ratio_name}: {numerator / denominator:.2f}x (goal {goal})")
