"""The `homelab` command: parses options, calls one library function, maps errors to one line."""

from __future__ import annotations

import functools
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

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


def _debugging() -> bool:
    ctx = click.get_current_context(silent=True)
    state = ctx.find_object(State) if ctx is not None else None
    return bool(state and state.debug)


def handle_errors(func: F) -> F:
    """Turn a HomelabError into one line on stderr and exit 1 (a traceback only with --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except HomelabError as exc:
            if _debugging():
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except Exception as exc:  # a bug of ours: still one line, the traceback with --debug
            if _debugging():
                raise
            click.echo(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for details)", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return cast(F, wrapper)  # functools.wraps types its result as _Wrapped, not F


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
    # A killed build must still clean up (DIB's mounts, its work directory): SIGTERM/SIGHUP act like Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@main.group()
def build() -> None:
    """Build artefacts."""


@build.command("image")
@click.argument("role")
@click.option("--dry-run", is_flag=True, help="Print the disk-image-create command and environment, build nothing.")
@click.option("--force", is_flag=True, help="Rebuild even when an image of this version exists.")
@click.option("--refresh", is_flag=True, help="Full build: new package layer (latest packages), then rebuild.")
@click.pass_obj
@handle_errors
def build_image(state: State, role: str, dry_run: bool, force: bool, refresh: bool) -> None:
    """Build build/<ROLE>/<ROLE>-<version>.qcow2 and its manifest.

    A full build (debootstrap + packages) leaves a package layer in the cache; later builds of the
    same package set start from it for a day (only baked files, bootloader and image are redone).
    """
    if dry_run:
        click.echo(build_lib.plan_build(state.settings, role, refresh=refresh).describe())
        return
    result = build_lib.build_image(state.settings, role, state.reporter, force=force, refresh=refresh)
    click.echo(f"{result.qcow2}\n{result.manifest}")


@main.command("fields")
def fields() -> None:
    """List every key an image definition (images/<role>.yaml) may hold."""
    from .definition import fields_help

    for key, kind, text in fields_help():
        click.echo(f"{key:<22} {kind:<48} {text}")


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


# --- local VMs ---------------------------------------------------------------------------------------

site_option = click.option("--site", "site", type=click.Path(dir_okay=False), default=None,
                           help="Site file (default: $HOMELAB_SITE or site.yaml).")
secrets_option = click.option("--secrets", "secrets", type=click.Path(dir_okay=False), default=None,
                              help="Secrets file, kept out of git (default: $HOMELAB_SECRETS or secrets.yaml).")
accel_option = click.option("--accel", type=click.Choice(["kvm", "tcg"]), default=None,
                            help="Force an accelerator (default: KVM when guests really run under it).")


@main.command("render")
@click.argument("role")
@site_option
@secrets_option
@click.option("--iso", type=click.Path(dir_okay=False), default=None, help="Also write the NoCloud seed ISO here.")
@click.pass_obj
@handle_errors
def render(state: State, role: str, site: str | None, secrets: str | None, iso: str | None) -> None:
    """Print the cloud-init user-data, meta-data and network-config of ROLE (validated)."""
    from .cloudinit import render_role

    seed = render_role(state.settings.project, role, state.settings.site_path(_path(site)),
                       state.settings.secrets_path(_path(secrets)), iso=_path(iso))
    for name, text in (("user-data", seed.user_data), ("meta-data", seed.meta_data),
                       ("network-config", seed.network_config)):
        click.echo(f"# --- {name}\n{text.rstrip()}")


@main.command("boot")
@click.argument("role")
@site_option
@secrets_option
@accel_option
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="A qcow2 (default: the latest build).")
@click.option("--memory", "memory_mb", type=int, default=None, help="MiB (default: the definition's, at most 4096).")
@click.option("--bridge", default=None, metavar="BRIDGE",
              help="Also put the VM on this host bridge with its site address (ssh stays on QEMU's user network).")
@click.pass_obj
@handle_errors
def boot_cmd(state: State, role: str, site: str | None, secrets: str | None, accel: str | None,
             image: str | None, memory_mb: int | None, bridge: str | None) -> None:
    """Boot ROLE's image locally under QEMU and print how to ssh in."""
    from . import localvm

    vm = localvm.boot(state.settings, role, localvm.BootOptions(
        site_path=state.settings.site_path(_path(site)),
        secrets_path=state.settings.secrets_path(_path(secrets)),
        image=_path(image), accel=accel, memory_mb=memory_mb, bridge=bridge), state.reporter)
    click.echo(f"{role} {vm.version} is up under {vm.accel.upper()}: ssh after {vm.ssh_seconds:.0f} s, cloud-init "
               f"done after {vm.cloud_init_seconds:.0f} s (serial log: {vm.serial_log})")
    click.echo(f"ssh in:    ssh -F {vm.ssh_config} {vm.ssh_alias}")
    click.echo(f"power off: homelab down {role}")


@main.command("logs")
@click.argument("role")
@click.option("--lines", type=int, default=100, show_default=True, help="Lines per unit and per container.")
@click.option("--host", default=None, metavar="ssh://user@host[:port]", help="A VM elsewhere (default: the local VM).")
@click.pass_obj
@handle_errors
def logs_cmd(state: State, role: str, lines: int, host: str | None) -> None:
    """The stack's units' journal and its containers' logs on ROLE's VM."""
    from . import ops

    click.echo(ops.stack_logs(state.settings, role, lines, host), nl=False)


@main.command("backup")
@click.argument("role")
@click.argument("action", type=click.Choice(["run", "verify", "snapshots"]), default="run")
@click.option("--host", default=None, metavar="ssh://user@host[:port]", help="A VM elsewhere (default: the local VM).")
@click.pass_obj
@handle_errors
def backup_cmd(state: State, role: str, action: str, host: str | None) -> None:
    """Back ROLE up now (run), run the restore test now (verify), or list the snapshots."""
    from . import ops

    click.echo(ops.backup(state.settings, role, action, host), nl=False)


@main.command("down")
@click.argument("role")
@click.option("--timeout", type=float, default=60, show_default=True, help="Seconds to wait for ACPI shutdown.")
@click.pass_obj
@handle_errors
def down_cmd(state: State, role: str, timeout: float) -> None:
    """Power down ROLE's local VM (ACPI, then quit after the timeout)."""
    from . import localvm

    click.echo(f"{role}: powered down" if localvm.stop(state.settings, role, timeout) else f"{role}: not running")


abandon_option = click.option("--abandon", is_flag=True,
                              help="Undo the unfinished deploy instead of resuming it: its cleanup before the cutover, "
                              "its rollback from the cutover on (not a first deploy, not a green that already serves).")


def _refuse_with_abandon(**options: object) -> None:
    given = [f"--{name}" for name, value in options.items() if value]
    if given:
        raise click.UsageError(f"--abandon undoes the unfinished deploy as planned: drop {', '.join(given)}")


def _echo_abandon_steps(steps: list[str]) -> None:
    click.echo("abandoning; to do: " + (", ".join(steps) if steps else "nothing (the recovery is done)"))


@main.command("rehearse")
@click.argument("role")
@click.option("--swap", is_flag=True, help="Blue-green: replace the local live VM, handing its data volumes over.")
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="A qcow2 (default: the latest build).")
@click.option("--bridge", default=None, metavar="BRIDGE",
              help="Put the VMs' NIC on this host bridge with the site's address (isolated green: link down).")
@accel_option
@click.option("--memory", "memory_mb", type=int, default=None, help="MiB per VM (default: the definition's, at most "
              "4096).")
@click.option("--keep", type=click.IntRange(1, 20), default=2, show_default=True,
              help="Previous local VMs kept stopped for a rollback.")
@click.option("--dry-run", is_flag=True, help="Print the plan; start nothing.")
@abandon_option
@site_option
@secrets_option
@click.pass_obj
@handle_errors
def rehearse_cmd(state: State, role: str, swap: bool, image: str | None, bridge: str | None, accel: str | None,
                 memory_mb: int | None, keep: int, dry_run: bool, abandon: bool, site: str | None,
                 secrets: str | None) -> None:
    """Run ROLE's deploy (or --swap) on this machine with QEMU: the same plan as on Proxmox VE, local volumes in
    build/ROLE/volumes/, its own journal. A rerun resumes an unfinished one; --abandon undoes it."""
    from .deploy import execute, pending_steps
    from .localprovider import abandon_local, abandon_local_steps, plan_local

    if abandon:
        _refuse_with_abandon(swap=swap, image=image, bridge=bridge)
        if dry_run:
            _echo_abandon_steps(abandon_local_steps(state.settings, role))
            return
        outcome, what = abandon_local(state.settings, role, state.settings.site_path(_path(site)), accel=accel,
                                      memory_mb=memory_mb, on_step=lambda text: click.echo(text, err=True))
        click.echo(f"{role}: local deploy {outcome.deploy_id} abandoned: {what}")
        return
    plan, resumed, provider, journal = plan_local(
        state.settings, role, state.settings.site_path(_path(site)), state.settings.secrets_path(_path(secrets)),
        image=_path(image), swap=swap, bridge=bridge, accel=accel, memory_mb=memory_mb, keep=keep)
    if dry_run:
        click.echo(plan.describe())
        if resumed:
            click.echo("resuming; still to do: " + ", ".join(pending_steps(plan, journal)))
        return
    outcome = execute(plan, provider, journal, on_step=lambda text: click.echo(text, err=True))
    downtime = f", downtime {outcome.downtime_s:.1f} s" if outcome.downtime_s is not None else ""
    vm_state = provider.state(outcome.vmid)
    click.echo(f"{role}: local VM {outcome.vmid} live, version {plan.version}{downtime}")
    if vm_state is not None:
        click.echo(f"ssh in:    ssh -F {vm_state.ssh_config} {vm_state.ssh_alias}")


@main.command("verify")
@click.argument("role")
@site_option
@secrets_option
@accel_option
@click.option("--host", default=None, help="Verify ssh://user@host instead of the local VM.")
@click.option("--keep", is_flag=True, help="Leave a VM booted for the check running afterwards.")
@click.pass_obj
@handle_errors
def verify_cmd(state: State, role: str, site: str | None, secrets: str | None, accel: str | None,
               host: str | None, keep: bool) -> None:
    """Run ROLE's testinfra suite against its local VM (booted if needed) or --host."""
    from .verify import VerifyOptions, verify

    junit = verify(state.settings, role, VerifyOptions(
        site_path=state.settings.site_path(_path(site)),
        secrets_path=state.settings.secrets_path(_path(secrets)),
        host=host, keep=keep, accel=accel), state.reporter)
    click.echo(f"{role}: verified (report: {junit})")


@main.command("lock")
@click.argument("role")
@click.option("--registries-conf", type=click.Path(dir_okay=False, exists=True), default=None,
              help="containers-registries.conf(5) to resolve through (e.g. a mirror).")
@click.option("--no-tls-verify", is_flag=True, help="Allow a plain-HTTP registry (a loopback mirror in tests).")
@click.pass_obj
@handle_errors
def lock_cmd(state: State, role: str, registries_conf: str | None, no_tls_verify: bool) -> None:
    """Resolve ROLE's container image tags to digests and write compose/ROLE/images.lock.json."""
    from .lock import lock_role, skopeo_inspect

    def inspect(image: str) -> dict[str, Any]:
        # TLS as the registries configuration says (a mirror marked insecure there is plain HTTP), unless refused.
        tls_verify = False if no_tls_verify else None
        return skopeo_inspect(image, registries_conf=_path(registries_conf), tls_verify=tls_verify)

    click.echo(lock_role(state.settings.project, role, inspect))


# --- Proxmox VE ----------------------------------------------------------------------------------------


@main.command("preflight")
@click.argument("role", required=False)
@site_option
@click.option("--insecure", is_flag=True, help="Do not check the API's TLS certificate at all.")
@click.pass_obj
@handle_errors
def preflight_cmd(state: State, role: str | None, site: str | None, insecure: bool) -> None:
    """Check the Proxmox VE host is ready to deploy ROLE (default: every role of the site). Read-only.

    The API token comes from $PVE_TOKEN (user@realm!tokenid=secret).
    """
    from .preflight import failed, run_preflight

    checks = run_preflight(state.settings.site_path(_path(site)), role, state.settings.project, insecure=insecure)
    for check in checks:
        click.echo(check.line())
    if failed(checks):
        sys.exit(1)


@main.command("token-role")
@site_option
@click.option("--token", "tokenid", default="homelab@pve!deploy", show_default=True,
              help="The token's ID, user@realm!tokenid.")
@click.pass_obj
@handle_errors
def token_role_cmd(state: State, site: str | None, tokenid: str) -> None:
    """Print the least-privilege roles the deploy needs and the pveum commands creating the token."""
    from .proxmox import token_role
    from .site import load_site

    section = load_site(state.settings.site_path(_path(site))).proxmox()
    click.echo(token_role(section, tokenid).describe())


# --- deploy --------------------------------------------------------------------------------------------------


def _provider(state: State, site_path: str | None, insecure: bool) -> tuple[Any, Any]:
    from .proxmox import Pve, Target, token_from_env
    from .pve_deploy import ProxmoxProvider
    from .site import load_site
    from .verify import SshSuite

    site = load_site(state.settings.site_path(_path(site_path)))
    target = Target.from_site(site.proxmox(), token_from_env(), insecure=insecure)
    return site, ProxmoxProvider(Pve(target), site, suite=SshSuite(state.settings))


@main.command("deploy")
@click.argument("role")
@click.option("--image", type=click.Path(dir_okay=False), default=None,
              help="The qcow2 to deploy (default: the newest build of ROLE).")
@click.option("--swap", is_flag=True, help="Blue-green: replace the live VM, handing its data volumes over.")
@click.option("--dry-run", is_flag=True, help="Print the plan (or what a resumed deploy still does); change nothing.")
@click.option("--keep", type=click.IntRange(1, 20), default=2, show_default=True,
              help="Previous VMs kept stopped for `homelab rollback`.")
@site_option
@secrets_option
@click.option("--insecure", is_flag=True, help="Do not check the API's TLS certificate at all.")
@abandon_option
@click.pass_obj
@handle_errors
def deploy_cmd(state: State, role: str, image: str | None, swap: bool, dry_run: bool, keep: int, site: str | None,
               secrets: str | None, insecure: bool, abandon: bool) -> None:
    """Deploy ROLE to Proxmox VE; --swap replaces the live VM blue-green. A rerun resumes an unfinished deploy;
    --abandon undoes it instead."""
    from .deploy import Journal, abandon_steps, execute, pending_steps, resume_or_plan
    from .deploy import abandon as abandon_deploy

    journal = Journal.for_role(state.settings, role)
    if abandon:
        _refuse_with_abandon(swap=swap, image=image)
        if dry_run:
            _echo_abandon_steps(abandon_steps(journal, role))
            return
        outcome, what = abandon_deploy(journal, role, _provider(state, site, insecure)[1],
                                       on_step=lambda text: click.echo(text, err=True))
        click.echo(f"{role}: deploy {outcome.deploy_id} abandoned: {what}")
        return
    site_obj, provider = _provider(state, site, insecure)
    plan, resumed = resume_or_plan(state.settings, site_obj, role, _path(image), swap, provider=provider,
                                   journal=journal, secrets_path=state.settings.secrets_path(_path(secrets)),
                                   keep=keep)
    if dry_run:
        click.echo(plan.describe())
        if resumed:
            click.echo("resuming; still to do: " + ", ".join(pending_steps(plan, journal)))
        return
    if resumed:
        click.echo(f"resuming deploy {plan.deploy_id}: " + ", ".join(pending_steps(plan, journal)), err=True)
    outcome = execute(plan, provider, journal, on_step=lambda text: click.echo(text, err=True))
    downtime = f", downtime {outcome.downtime_s:.1f} s" if outcome.downtime_s is not None else ""
    click.echo(f"{role}: VM {outcome.vmid} live, version {plan.version}{downtime}")


@main.command("rollback")
@click.argument("role")
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@site_option
@click.option("--insecure", is_flag=True, help="Do not check the API's TLS certificate at all.")
@click.pass_obj
@handle_errors
def rollback_cmd(state: State, role: str, dry_run: bool, site: str | None, insecure: bool) -> None:
    """Hand ROLE back to the previous VM (the newest kept `blue;rollback` one), data volumes included."""
    from .deploy import Journal, execute, plan_rollback
    from .errors import DeployError

    journal = Journal.for_role(state.settings, role)
    pending = journal.unfinished()
    if pending is not None:
        raise DeployError(f"deploy {pending['id']} of {role} is unfinished: rerun `homelab deploy {role}` to "
                          "finish it (or with --abandon to undo it) first")
    site_obj, provider = _provider(state, site, insecure)
    plan = plan_rollback(state.settings, site_obj, role, provider=provider)
    if dry_run:
        click.echo(plan.describe())
        return
    outcome = execute(plan, provider, journal, on_step=lambda text: click.echo(text, err=True))
    downtime = f", downtime {outcome.downtime_s:.1f} s" if outcome.downtime_s is not None else ""
    click.echo(f"{role}: VM {outcome.vmid} live again, version {plan.version}{downtime}")


@main.command("status")
@click.argument("role")
@click.pass_obj
@handle_errors
def status_cmd(state: State, role: str) -> None:
    """ROLE's live VM and version, an unfinished deploy, the last swaps with their downtime (from the journal)."""
    from .deploy import Journal, status_lines

    for text in status_lines(Journal.for_role(state.settings, role), role):
        click.echo(text)


@main.command("history")
@click.argument("role")
@click.pass_obj
@handle_errors
def history_cmd(state: State, role: str) -> None:
    """Every deploy of ROLE from the journal: kind, version, VM, outcome, downtime, error."""
    from .deploy import Journal, history_lines

    for text in history_lines(Journal.for_role(state.settings, role)):
        click.echo(text)
