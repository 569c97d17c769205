"""The swap engine on the local provider, for real: QEMU VMs, virtiofs shares, a qcow2 disk, the guest agent.

One class, its tests in order (each builds on the previous): a first deploy of the intranet; data written in it; a
swap to a new build (a changed motd) whose green VM reads that data; a swap to a deliberately broken build (a
healthcheck that always fails) that rolls back by itself, the data and the previous VM serving again. About 12-17
minutes under TCG on 2 cores (five boots and two incremental builds).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import pytest

from builder import localvm
from builder import localvolumes as lv
from builder.build import latest_build
from builder.deploy import DeployPlan, Journal, execute
from builder.errors import DeployError
from builder.localprovider import LocalProvider, journal_path, plan_local
from builder.settings import Settings
from tests.netlab import ZoneNetwork

from .conftest import TEST_SECRETS, TEST_SITE, homelab

pytestmark = [pytest.mark.vm, pytest.mark.rehearsal]

ROLE = "intranet"
MEMORY_MB = 3072  # two intranet VMs run at once while green is verified
MOTD_LINE = "Local rehearsal: the second build."
PHOTO = "/srv/photos/rehearsal/photo-1.txt"
ROWS = "/srv/postgres/rehearsal-rows.txt"
# The broken build: Jellyfin's healthcheck can never pass (the stand-ins have busybox's `false`), and it says so
# within seconds, so `docker compose up --wait` fails fast.
JELLYFIN_CHECK = '''    healthcheck:
      test: ["CMD", "curl", "--noproxy", "localhost", "-fsS", "http://localhost:8096/health"]
      interval: 30s
      timeout: 10s
      retries: 3
      start_period: 60s
'''
BROKEN_CHECK = '''    healthcheck:
      test: ["CMD", "false"]
      interval: 3s
      timeout: 3s
      retries: 1
      start_period: 0s
'''
# The broken swap fails at start-stack, as soon as `up --wait` sees Jellyfin unhealthy; its deadlines (the health
# gate's too) are shortened from 600 s all the same, so that a regression costs minutes, not ten.
BROKEN_DEADLINE = 240.0


@dataclass
class Rehearsal:
    settings: Settings
    bridge: str
    project: Path
    vmids: list[int] = field(default_factory=list)  # first, second, broken
    saved: dict[Path, str] = field(default_factory=dict)
    first_manifest: Path | None = None  # the unchanged project's build, made the newest again at the end

    def provider(self) -> LocalProvider:
        return LocalProvider(self.settings, ROLE, bridge=self.bridge, memory_mb=MEMORY_MB)

    def plan(self, swap: bool) -> tuple[DeployPlan, LocalProvider, Journal]:
        plan, resumed, provider, journal = plan_local(self.settings, ROLE, TEST_SITE, TEST_SECRETS, swap=swap,
                                                      bridge=self.bridge, memory_mb=MEMORY_MB)
        assert not resumed, "a previous local deploy was left unfinished"
        return plan, provider, journal

    def ssh(self, vmid: int, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        state = self.provider().state(vmid)
        assert state is not None, f"local VM {vmid} is not running"
        proc = subprocess.run(localvm.ssh_argv(state, command), capture_output=True, text=True, timeout=120,
                              check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"`{command}` on VM {vmid} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def edit(self, relative: str, old: str, new: str) -> None:
        path = self.project / relative
        text = path.read_text()
        self.saved.setdefault(path, text)
        assert old in text, f"{relative} no longer holds the text this test changes"
        path.write_text(text.replace(old, new, 1))

    def build(self) -> str:
        homelab("build", "image", ROLE)
        manifest = latest_build(self.settings, ROLE)
        assert manifest is not None
        return str(manifest["version"])


def _clean(settings: Settings) -> None:
    """No local VM, volume or journal of an earlier run (HOMELAB_VM_TEST_DIR reuses the build directory)."""
    provider = LocalProvider(settings, ROLE)
    for vm in provider.vms():
        provider.stop(vm.vmid)
    role_dir = settings.role_dir(ROLE)
    for path in [*role_dir.glob("vm-*"), role_dir / "volumes", role_dir / "local"]:
        shutil.rmtree(path, ignore_errors=True)


def _echo(line: str) -> None:
    print(f"  deploy: {line}", flush=True)


def _with_deadline(plan: DeployPlan, seconds: float) -> DeployPlan:
    steps = tuple(dataclasses.replace(s, args={**s.args, "deadline": seconds})
                  if s.name in ("start-stack", "health-gate") else s for s in plan.steps)
    return dataclasses.replace(plan, steps=steps)


@pytest.fixture(scope="class")
def rehearsal(request: pytest.FixtureRequest, settings: Settings, network: ZoneNetwork,
              stack_project: Path) -> Iterator[Rehearsal]:
    request.cls.failed = False
    localvm.stop(settings, ROLE)  # a `homelab boot` VM of the role would only take memory
    _clean(settings)
    run = Rehearsal(settings, network.bridge, stack_project)
    try:
        yield run
    finally:
        for path, text in run.saved.items():  # the session's project copy back as it was
            path.write_text(text)
        if run.first_manifest is not None and run.first_manifest.exists():
            # Later tests boot the role's newest build: the unchanged project's again, not the broken one.
            os.utime(run.first_manifest)
        keep = os.environ.get("HOMELAB_KEEP_VM", "")
        if keep == "always" or (keep == "on_error" and request.cls.failed):
            print(f"\nkeeping the local VMs of {ROLE}: {settings.role_dir(ROLE)}/vm-*/ssh_config")
        else:
            _clean(settings)


def _suite_passed(rehearsal: Rehearsal) -> None:
    """The last deploy's gate ran the role's whole testinfra suite against the new VM, every test passing."""
    done = Journal(journal_path(rehearsal.settings, ROLE)).deploys[-1]["done"]
    assert done["testinfra"]["suite"] == "passed"
    report = ElementTree.parse(done["testinfra"]["report"]).getroot().find("testsuite")
    assert report is not None and int(report.get("tests", "0")) > 20, report
    assert report.get("failures") == "0" and report.get("errors") == "0"


class TestLocalSwap:
    role = ROLE  # the `network` fixture reads it
    failed = False

    def test_first_deploy_mounts_the_volumes_and_serves(self, rehearsal: Rehearsal) -> None:
        rehearsal.build()
        first = latest_build(rehearsal.settings, ROLE)
        assert first is not None
        rehearsal.first_manifest = Path(first["manifest_path"])
        plan, provider, journal = rehearsal.plan(swap=False)
        assert plan.kind == "first"
        outcome = execute(plan, provider, journal, on_step=_echo)
        assert outcome.outcome == "live"
        rehearsal.vmids.append(outcome.vmid)
        _suite_passed(rehearsal)
        mounts = rehearsal.ssh(outcome.vmid, "findmnt -rn -o TARGET,FSTYPE,OPTIONS").stdout
        table = {line.split()[0]: line.split()[1:] for line in mounts.splitlines()}
        assert table["/srv/postgres"][0] == "ext4"
        for share in ("/srv/appdata", "/srv/photos", "/srv/media", "/srv/backups", "/srv/logs"):
            assert table[share][0] == "virtiofs", share
        assert "ro" in table["/srv/media"][1].split(",")
        assert "rw" in table["/srv/photos"][1].split(",")
        # The guest sees the disk by its serial, as on Proxmox VE.
        rehearsal.ssh(outcome.vmid, "test -e /dev/disk/by-id/virtio-postgres")
        # Each share is held by this VM.
        holder = lv.share_holders(lv.lock_path(rehearsal.settings, ROLE, "photos"))["holder"]
        assert holder["vm"] == f"{ROLE}-{outcome.vmid}"

    def test_data_written_in_blue_lands_on_the_host(self, rehearsal: Rehearsal) -> None:
        blue = rehearsal.vmids[0]
        rehearsal.ssh(blue, f"sudo mkdir -p {Path(PHOTO).parent} && echo photo-1 | sudo tee {PHOTO} >/dev/null && "
                            f"printf '1|alice\\n2|bob\\n' | sudo tee {ROWS} >/dev/null && sync")
        on_host = lv.share_path(rehearsal.settings, ROLE, "photos") / "rehearsal" / "photo-1.txt"
        assert on_host.read_text() == "photo-1\n"

    def test_a_second_vm_cannot_take_a_share_blue_holds(self, rehearsal: Rehearsal) -> None:
        with pytest.raises(lv.ShareBusyError, match=f"held by the running VM {ROLE}-{rehearsal.vmids[0]}"):
            lv.acquire_share(lv.lock_path(rehearsal.settings, ROLE, "photos"), "intruder", os.getpid())

    def test_swap_to_a_new_build_hands_the_data_to_green(self, rehearsal: Rehearsal) -> None:
        blue = rehearsal.vmids[0]
        first = latest_build(rehearsal.settings, ROLE)
        rehearsal.edit("images/files/common/homelab-motd", "Data lives under /srv.",
                       f"Data lives under /srv.\n{MOTD_LINE}")
        version = rehearsal.build()
        assert first is not None and version != first["version"]
        plan, provider, journal = rehearsal.plan(swap=True)
        assert plan.kind == "swap" and plan.blue == blue
        seen: dict[str, str] = {}

        def look_at_green_before_the_cutover(line: str) -> None:
            """Green runs isolated with blue's shares attached: it mounts none of them, blue keeps their locks."""
            _echo(line)
            if line.startswith("stop-blue-stack:"):
                seen["mounts"] = rehearsal.ssh(plan.vmid, "findmnt -rn -o TARGET -t virtiofs,ext4 | grep ^/srv || true"
                                               ).stdout
                seen["volumes"] = rehearsal.ssh(plan.vmid, "systemctl is-active homelab-volumes.service",
                                                check=False).stdout.strip()
                seen["shares"] = rehearsal.ssh(plan.vmid, "grep -l 0x001a /sys/bus/virtio/devices/*/device | wc -l"
                                               ).stdout  # virtio-fs devices (virtio device ID 26)
                seen["holder"] = lv.share_holders(lv.lock_path(rehearsal.settings, ROLE, "photos"))["holder"]["vm"]

        outcome = execute(plan, provider, journal, on_step=look_at_green_before_the_cutover)
        assert seen["mounts"] == "" and seen["volumes"] == "inactive", seen
        assert seen["shares"].strip() == "5", seen  # the five shares are attached, unmounted
        assert seen["holder"] == f"{ROLE}-{blue}"
        assert outcome.outcome == "live" and outcome.downtime_s is not None
        green = outcome.vmid
        done = Journal(journal_path(rehearsal.settings, ROLE)).deploys[-1]["done"]
        assert done["hand-postgres"]["hotplugged"] is True and done["snapshot-data"]["live"] is True
        _suite_passed(rehearsal)
        rehearsal.vmids.append(green)
        assert green != blue
        assert MOTD_LINE in rehearsal.ssh(green, "cat /etc/motd").stdout
        assert rehearsal.ssh(green, f"cat {PHOTO}").stdout == "photo-1\n"
        assert rehearsal.ssh(green, f"sudo cat {ROWS}").stdout == "1|alice\n2|bob\n"
        old, new = provider.vm(blue), provider.vm(green)
        assert old is not None and old.status == "stopped" and {"blue", "rollback"} <= old.tags
        assert new is not None and new.status == "running" and "live" in new.tags
        assert not [k for k in old.config if k.startswith("virtiofs") or k == "scsi1"]

    def test_a_broken_build_rolls_back_by_itself_with_the_data(self, rehearsal: Rehearsal) -> None:
        serving = rehearsal.vmids[1]
        rehearsal.edit("compose/intranet/compose.yaml", JELLYFIN_CHECK, BROKEN_CHECK)
        rehearsal.build()
        plan, provider, journal = rehearsal.plan(swap=True)
        assert plan.blue == serving
        with pytest.raises(DeployError, match=f"rolled back to VM {serving}"):
            execute(_with_deadline(plan, BROKEN_DEADLINE), provider, journal, on_step=_echo)
        rehearsal.vmids.append(plan.vmid)
        entry = Journal(journal_path(rehearsal.settings, ROLE)).deploys[-1]
        assert entry["outcome"] == "rolled-back"
        assert entry["error"].startswith("start-stack: ") and "jellyfin: running/unhealthy" in entry["error"]
        # `up --wait` failing is not waited out until the deadline: the rollback starts within seconds of it.
        assert entry["rolled"]["stop-green"]["at"] - entry["marks"]["green_started"] < BROKEN_DEADLINE / 2
        back, broken = provider.vm(serving), provider.vm(plan.vmid)
        assert back is not None and back.status == "running" and "live" in back.tags
        assert broken is not None and broken.status == "stopped" and "failed" in broken.tags
        provider.health_gate(serving, 120)
        assert MOTD_LINE in rehearsal.ssh(serving, "cat /etc/motd").stdout
        assert rehearsal.ssh(serving, f"cat {PHOTO}").stdout == "photo-1\n"
        assert rehearsal.ssh(serving, f"sudo cat {ROWS}").stdout == "1|alice\n2|bob\n"
        holder = lv.share_holders(lv.lock_path(rehearsal.settings, ROLE, "photos"))["holder"]
        assert holder["vm"] == f"{ROLE}-{serving}"
