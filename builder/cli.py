"""The `homelab` command: parses options, calls one library function, maps errors to one line."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import build as build_lib
from .errors import HomelabError
from .progress import Reporter
from .settings import Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])


class State:
    def __init__(self, debug: bool) -> None:
        self.debug = debug
        self.settings: Settings = load_settings()
        self.reporter = Reporter()


def handle_errors(func: F) -> F:
    """Turn a HomelabError into one line on stderr and exit 1 (a traceback only with --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except HomelabError as exc:
            ctx = click.get_current_context(silent=True)
            if ctx is not None and ctx.find_object(State) is not None and ctx.find_object(State).debug:  # type: ignore[union-attr]
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


@click.group()
@click.option("--debug", is_flag=True, help="Show every external command and full tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Build, boot, verify and deploy the homelab's VM images."""
    logging.basicConfig(
        level=logging.INFO if debug else logging.WARNING,
        format="%(name)s: %(message)s",
        stream=sys.stderr,
    )
    ctx.obj = State(debug)


@main.group()
def build() -> None:
    """Build artefacts."""


@build.command("image")
@click.argument("role")
@click.option("--dry-run", is_flag=True, help="Print the disk-image-create command and environment, build nothing.")
@click.option("--force", is_flag=True, help="Rebuild even when an image of this version exists.")
@click.pass_obj
@handle_errors
def build_image(state: State, role: str, dry_run: bool, force: bool) -> None:
    """Build build/<ROLE>/<ROLE>-<version>.qcow2 and its manifest."""
    plan = build_lib.plan_build(state.settings, role)
    if dry_run:
        click.echo(plan.describe())
        return
    result = build_lib.execute_build(state.settings, plan, state.reporter, force=force)
    click.echo(f"{result.qcow2}\n{result.manifest}")


@main.command("fields")
def fields() -> None:
    """List every key an image definition (images/<role>.yaml) may hold."""
    from .definition import fields_help

    for key, kind, text in fields_help():
        click.echo(f"{key:<22} {kind:<48} {text}")


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None
