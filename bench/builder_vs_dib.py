"""The builder vs bare disk-image-create with the same elements, packages and environment (goal <= 1.05x).

Both run the full build the plan prints with --dry-run: bare disk-image-create is timed alone, after the builder's
own steps before it (untimed) prepared the same work directory, baked tree and container images; the builder is
timed whole: its checks, staging, image fetch (cached), hashing, the manifest and the atomic publish.

    .venv/bin/python -m bench.builder_vs_dib [role] [rounds]

Each round runs both arms; the order alternates (bare first in odd rounds, the builder first in even ones), so
the warmer caches of whichever runs second favour each arm equally often; the medians are compared.
"""

from __future__ import annotations

import shutil
import statistics
import sys
from pathlib import Path

from bench._common import project_copy, report, timed
from builder import build
from builder.progress import Silent
from builder.runner import run_streaming
from builder.settings import Settings


def bare_dib(settings: Settings, role: str) -> float:
    """Seconds of disk-image-create alone, given what the builder's own steps before it prepared (untimed): the
    same work directory layout, baked tree, container images, argv and environment."""
    plan = build.plan_build(settings, role, refresh=True)
    ctx = build.BuildContext(settings=settings, plan=plan, reporter=Silent())
    steps = [step for _name, step in build.BUILD_STEPS]
    try:
        for step in steps[:steps.index(build.run_diskimage_builder)]:
            step(ctx)
        argv, env = build.dib_command(ctx)
        seconds, _ = timed(lambda: run_streaming(argv, log_file=ctx.workdir / "dib.log", env=env))
    finally:
        if ctx.workdir != Path():
            build.remove_workdir(ctx.workdir)
    return seconds


def builder(settings: Settings, role: str) -> float:
    """Seconds of `homelab build image` whole (forced: the same inputs would otherwise be an up-to-date build)."""
    plan = build.plan_build(settings, role, refresh=True)
    seconds, _ = timed(lambda: build.execute_build(settings, plan, force=True))
    return seconds


def main(role: str = "extranet", rounds: str = "2") -> None:
    bares: list[float] = []
    ours: list[float] = []
    with project_copy() as settings:
        for number in range(int(rounds)):
            arms = [("bare", bare_dib), ("builder", builder)]
            for name, arm in arms if number % 2 == 0 else reversed(arms):
                seconds = arm(settings, role)
                (bares if name == "bare" else ours).append(seconds)
                print(f"round {number + 1}: {name} {seconds:.1f} s", flush=True)
            shutil.rmtree(settings.build_dir, ignore_errors=True)
    bare, mine = statistics.median(bares), statistics.median(ours)
    report([(f"bare disk-image-create (median of {len(bares)})", bare),
            (f"homelab build image (median of {len(ours)})", mine)], "builder / bare DIB", mine, bare, "<= 1.05x")


if __name__ == "__main__":
    main(*sys.argv[1:])
