"""Live progress for long steps: rich on a terminal, plain timestamped lines otherwise (CI, logs)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

PLAIN_HEARTBEAT_SECONDS = 30


class Reporter:
    """Shows which named step runs, for how long, and the latest detail (e.g. the DIB phase)."""

    def __init__(self, console: Console | None = None, live: bool | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal if live is None else live
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._step = ""
        self._detail = ""
        self._started = 0.0
        self._plain_phase = ""
        self._plain_at = 0.0

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self._step, self._detail, self._started = name, "", time.monotonic()
        if self.live:
            with Progress(
                SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                console=self.console, transient=True,
            ) as progress:
                self._progress, self._task = progress, progress.add_task(name)
                try:
                    yield
                finally:
                    self._progress = self._task = None
        else:
            self._plain(f"{name} ...")
            yield
        self._plain(f"{name}: done in {time.monotonic() - self._started:.1f} s", force=True)

    def update(self, detail: str) -> None:
        if detail == self._detail:
            return
        self._detail = detail
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=f"{self._step}: {detail}")
            return
        # Plain lines go to logs: one per phase (first word of the detail), or a heartbeat every 30 s.
        phase = detail.split(" ", 1)[0]
        now = time.monotonic()
        if phase != self._plain_phase or now - self._plain_at >= PLAIN_HEARTBEAT_SECONDS:
            self._plain_phase, self._plain_at = phase, now
            self._plain(f"{self._step}: {detail}")

    def info(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)

    def _plain(self, message: str, force: bool = False) -> None:
        if self.live and not force:
            return
        elapsed = time.monotonic() - self._started if self._started else 0.0
        self.console.print(f"[{elapsed:6.1f}s] {message}", highlight=False, soft_wrap=True)


class Silent(Reporter):
    """For library use and tests: records steps, prints nothing."""

    def __init__(self) -> None:
        # quiet: the console writes nothing (and, unlike an open("/dev/null"), leaves no file handle behind).
        super().__init__(Console(quiet=True), live=False)
        self.steps: list[str] = []

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.steps.append(name)
        yield

