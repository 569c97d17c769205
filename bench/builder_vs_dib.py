"""The builder vs bare disk-image-create with the same elements, packages and environment (goal <= 1.05x).

Both run the full build the plan prints with --dry-run (the same argv and DIB variables, into the same
kind of work directory); the builder adds staging, hashing, the manifest and the atomic publish.

    .venv/bin/python -m bench.builder_vs_dib [role]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench._common import project_copy, report, timed
from builder import build
from builder.progress import Silent
from builder.runner import run_streaming
from builder.settings import Settings


def bare_dib(settings: Settings, role: str) -> None:
    plan = build.plan_build(settings, role, refresh=True)
    work = Path(tempfile.mkdtemp(prefix="bare-dib-", dir="/var/tmp"))
    try:
        stage = work / "stage"
        # The same baked tree the builder would stage (DIB's homelab-bake element copies it).
        ctx = build.BuildContext(settings=settings, plan=plan, reporter=Silent(), workdir=work)
        build.stage_baked_files(ctx)
        env = {k: v for k, v in os.environ.items() if k != "TMPDIR"}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(plan.env)
        env.update({"TMP_DIR": str(work / "tmp"), "HOMELAB_BAKE_DIR": str(stage)})
        (work / "tmp").mkdir()
        argv = list(plan.argv)
        argv[0] = str(Path(sys.executable).parent / "disk-image-create")
        argv[argv.index("-o") + 1] = str(work / "out" / role)
        run_streaming(argv, log_file=work / "dib.log", env=env)
    finally:
        build.remove_workdir(work)


def main(role: str = "extranet") -> None:
    with project_copy() as settings:
        bare, _ = timed(lambda: bare_dib(settings, role))
        plan = build.plan_build(settings, role, refresh=True)
        ours, _ = timed(lambda: build.execute_build(settings, plan, force=True))
        shutil.rmtree(settings.build_dir, ignore_errors=True)
    report([("bare disk-image-create", bare), ("homelab build image", ours)], "builder / bare DIB", ours, bare,
           "<= 1.05x")


if __name__ == "__main__":
    main(*sys.argv[1:])
