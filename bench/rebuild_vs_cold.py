"""Rebuild after changing only a baked file vs a cold build of the same role (goal <= 0.5x).

Cold: `--refresh` (debootstrap + every package, leaving the package layer). Then a compose file changes
and the role is built again: the package layer is reused, only baked files, bootloader and image redone.

    .venv/bin/python -m bench.rebuild_vs_cold [role]
"""

from __future__ import annotations

import sys

from bench._common import project_copy, report, timed
from builder.build import execute_build, plan_build


def main(role: str = "extranet") -> None:
    with project_copy() as settings:
        cold_plan = plan_build(settings, role, refresh=True)
        cold, _ = timed(lambda: execute_build(settings, cold_plan, force=True))
        compose = settings.project / "compose" / role / "compose.yaml"
        compose.write_text(compose.read_text() + "# bench: a baked-file-only change\n")
        warm_plan = plan_build(settings, role)
        assert warm_plan.mode == "incremental", warm_plan.mode
        assert warm_plan.version != cold_plan.version
        warm, _ = timed(lambda: execute_build(settings, warm_plan))
    report([(f"cold build of {role} (full, --refresh)", cold), ("rebuild, one compose file changed", warm)],
           "rebuild / cold", warm, cold, "<= 0.5x")


if __name__ == "__main__":
    main(*sys.argv[1:])
