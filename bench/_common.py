"""Shared by the bench scripts: a throwaway copy of the project to change inputs in, and timing."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from builder.settings import Settings, load_settings

PROJECT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


@contextmanager
def project_copy(build_dir: Path | None = None) -> Iterator[Settings]:
    """A copy of images/, compose/, cloudinit/ so a bench can edit inputs without touching the checkout.

    The package-layer cache stays the user's (~/.cache/homelab): that is what a rebuild reuses.
    """
    with tempfile.TemporaryDirectory(prefix="homelab-bench-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        for name in ("images", "compose", "cloudinit"):
            shutil.copytree(PROJECT / name, root / name)
        os.environ["HOMELAB_BUILD_DIR"] = str(build_dir or root / "build")
        try:
            yield load_settings(root)
        finally:
            os.environ.pop("HOMELAB_BUILD_DIR", None)


def timed(func: Callable[[], T]) -> tuple[float, T]:
    started = time.monotonic()
    result = func()
    return time.monotonic() - started, result


def report(rows: list[tuple[str, float]], ratio_name: str, numerator: float, denominator: float, goal: str) -> None:
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:7.1f} s")
    print(f"{ratio_name}: {numerator / denominator:.2f}x (goal {goal})")
