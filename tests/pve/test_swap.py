"""`homelab deploy` (first deploy and blue-green swap), rollback and the journal, against the PVE emulator.

The role is the real images/intranet.yaml (one disk volume, five shares). The guests' answers come from the
emulator's agent table: `Guests` scripts every new VM healthy, or failing verification or the health gate.
Invariants checked after every run, whatever failed: no data volume was ever deleted (the emulator's Volume
objects of the data disks are all still on their storage, so no volume DELETE and no destroy of a VM holding
one happened), exactly one VM serves (running, tagged live, holding every data volume), and rerunning the
command converges to the new version live.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from builder import deploy, proxmox, verify
from builder.cli import main
from builder.cloudinit import Seed
from builder.definition import load_role
from builder.deploy import Journal, Outcome
from builder.errors import DeployError, ProxmoxError, VerifyError
from builder.proxmox import Pve, Target
from builder.pve_deploy import HOST_KEY, ProxmoxProvider
from builder.settings import Settings, load_settings
from builder.site import Site, load_site

from .emulator import PveEmulator
from .state import Agent, ExecResult, GiB, Vm, Volume

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "site"
ROLE = "intranet"
DISK = "local-zfs:vm-101-disk-1"
SHARES = {"appdata": "virtiofs0", "photos": "virtiofs1", "media": "virtiofs2", "backups": "virtiofs3",
          "logs": "virtiofs4"}
SEED = Seed("#cloud-config\n", "instance-id: intranet-test\n", "version: 2\nethernets: {}\n")
HEALTHY_PS = '{"Service":"jellyfin","State":"running","Health":"healthy"}\n{"Service":"db","State":"running"}\n'


def line(argv: tuple[str, ...]) -> str:
    return " ".join(argv)


@dataclass
class Guests:
    """How the next VMs' guests answer: verification and health commands pass unless told otherwise."""

    verify_ok: bool = True
    degraded: bool = False  # booted, but a unit failed
    healthy: bool = True
    mounts_isolated: bool = False  # an image without the link guard: mounts its shares while isolated
    endpoint_down: str | None = None  # the URL of a service's own health endpoint that does not answer
    host_key_readable: bool = True
    create_fails: bool = False  # `docker compose create` on isolated green fails
    start_fails: bool = False  # `systemctl start` of the stack fails (`up --wait`: a container unhealthy)

    def agent(self, vm: Vm) -> Agent:
        verify = [ExecResult(out="status: done\n"), ExecResult(out="running\n"), ExecResult()]
        if not self.verify_ok:
            verify[0] = ExecResult(exitcode=1, out="status: error\n")
        if self.degraded:
            verify[1] = ExecResult(exitcode=1, out="degraded\n")
        commands = {line(argv): result for argv, result in zip(deploy.VERIFY_COMMANDS, verify, strict=True)}
        commands[line(deploy.FAILED_UNITS)] = ExecResult(
            out="systemd-networkd-wait-online.service loaded failed failed Wait for Network to be Configured\n")
        commands[line(deploy.HEALTH_COMMANDS[0])] = ExecResult(out="active\n")
        commands[line(deploy.HEALTH_COMMANDS[1])] = ExecResult(
            out=HEALTHY_PS if self.healthy else '{"Service":"db","State":"running","Health":"unhealthy"}\n')
        for port in load_role(ROOT, ROLE)["ports"]:
            if port["health"]:
                endpoint = deploy.Endpoint(port["service"], port["port"], port["health"])
                commands[line(endpoint.command())] = (
                    ExecResult(exitcode=22, err="curl: (22) The requested URL returned error: 503\n")
                    if endpoint.url == self.endpoint_down else ExecResult())
        commands[line(deploy.CREATE_STACK)] = (
            ExecResult(exitcode=1, err="service jellyfin: image docker.io/jellyfin/jellyfin:10.11.11 not found\n")
            if self.create_fails else ExecResult())
        commands[f"systemctl stop {deploy.STACK_UNIT}"] = ExecResult()
        commands[f"systemctl start {deploy.STACK_UNIT}"] = (
            ExecResult(exitcode=1, err=f"Job for {deploy.STACK_UNIT} failed because the control process exited with "
                                      f"error code.\nSee \"systemctl status {deploy.STACK_UNIT}\" for details.\n")
            if self.start_fails else ExecResult())
        commands[f"systemctl is-active {deploy.VOLUMES_UNIT}"] = (
            ExecResult(out="active\n") if self.mounts_isolated else ExecResult(exitcode=3, out="inactive\n"))
        commands[f"cat {HOST_KEY}"] = (
            ExecResult(out=f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{vm.vmid} root@intranet\n")
            if self.host_key_readable else ExecResult(exitcode=1, err=f"cat: {HOST_KEY}: No such file or directory\n"))
        return Agent(commands=commands)


@dataclass
class Suites:
    """The role's testinfra suite as each deploy runs it (no VM runs here to ssh into): every run recorded with
    the pinned ssh_config and known_hosts it was given (read while they exist); failing when told."""

    failure: str | None = None
    unreachable: str | None = None  # why ssh to the live VM's address fails from this machine
    runs: list[dict[str, Any]] = field(default_factory=list)
    reached: list[dict[str, str]] = field(default_factory=list)

    def reach(self, address: str, ssh_config: Path) -> str | None:
        self.reached.append({"address": address, "ssh_config": ssh_config.read_text(),
                             "known_hosts": (ssh_config.parent / "known_hosts").read_text()})
        return self.unreachable

    def run(self, role: str, context: dict[str, Any], hosts: str, ssh_config: Path | None) -> Path:
        assert ssh_config is not None
        self.runs.append({"role": role, "context": context, "hosts": hosts, "ssh_config": ssh_config.read_text(),
                          "known_hosts": (ssh_config.parent / "known_hosts").read_text()})
        if self.failure:
            raise VerifyError(self.failure)
        return ssh_config.parent / "junit.xml"


class FakeClock:
    """Deadlines pass in no time: sleeping advances the clock."""

    def __init__(self) -> None:
        self.t = 1000.0

    def clock(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Env:
    pve: PveEmulator
    settings: Settings
    site: Site
    guests: Guests
    clock: FakeClock = field(default_factory=FakeClock)
    suites: Suites = field(default_factory=Suites)
    timeout: tuple[float, float] = (5.0, 10.0)
    versions: int = 0

    def provider(self) -> ProxmoxProvider:
        pve = Pve(Target.from_site(self.site.proxmox(), proxmox.token_from_env()), timeout=self.timeout,
                  clock=self.clock.clock, sleep=self.clock.sleep)
        return ProxmoxProvider(pve, self.site, task_timeout=60, suite=self.suites)

    def build(self) -> Path:
        """A new "built" image of the role: a qcow2 header and its manifest, as build.publish writes them."""
        self.versions += 1
        version = f"{self.versions:012x}"
        role_dir = self.settings.role_dir(ROLE)
        role_dir.mkdir(parents=True, exist_ok=True)
        image = role_dir / f"{ROLE}-{version}.qcow2"
        image.write_bytes(b"QFI\xfb" + b"\0" * 20 + (2 * GiB).to_bytes(8, "big") + version.encode() * 1000)
        (role_dir / f"{ROLE}-{version}.manifest.json").write_text(json.dumps(
            {"image": image.name, "version": version, "sha256": hashlib.sha256(image.read_bytes()).hexdigest()}))
        return image

    @property
    def journal(self) -> Journal:
        return Journal.for_role(self.settings, ROLE)

    def deploy(self, swap: bool, provider: Any = None) -> Outcome:
        provider = provider or self.provider()
        # Each build comes with its own seed (as a new image's instance-id would): both uploads happen.
        seed = Seed(SEED.user_data, f"instance-id: intranet-{self.versions}\n", SEED.network_config)
        plan, _ = deploy.resume_or_plan(self.settings, self.site, ROLE, None, swap, provider=provider,
                                        journal=self.journal, seed=seed)
        return deploy.execute(plan, provider, self.journal)

    def disk(self) -> Volume:
        volume = next(v for s in self.pve.state.storages.values() for v in s.volumes.values()
                      if v.content == "images" and v.size == 20 * GiB)
        return volume

    def live(self) -> list[Vm]:
        return [vm for vm in self.pve.state.vms.values() if "live" in vm.config.get("tags", "").split(";")]


def site_text(pve: PveEmulator, volumes: str = f'postgres: {{volid: "{DISK}"}}') -> str:
    text = (FIXTURES / "test-site.yaml").read_text()
    shares = ", ".join(f"{name}: {{mapping: {name}}}" for name in SHARES)
    text = text.replace("intranet: {hostname: intranet, address: 10.99.0.101/24}",
                        f"intranet: {{hostname: intranet, address: 10.99.0.101/24, vmid: 101, "
                        f"volumes: {{{volumes}, {shares}}}}}")
    text = text.replace("extranet: {hostname: extranet, address: 10.99.0.111/24}",
                        "extranet: {hostname: extranet, address: 10.99.0.111/24, vmid: 111}")
    return text + f"""
proxmox:
  url: https://{pve.host}:{pve.port}
  node: pve
  tls: {{fingerprint: "{pve.fingerprint}"}}
"""


@pytest.fixture
def env(pve: PveEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    path = tmp_path / "site.yaml"
    path.write_text(site_text(pve))
    tokenid, secret = pve.token
    monkeypatch.setenv("PVE_TOKEN", f"{tokenid}={secret}")
    monkeypatch.setenv("HOMELAB_BUILD_DIR", str(tmp_path / "build"))
    monkeypatch.setenv("HOMELAB_PROJECT", str(ROOT))
    guests = Guests()
    pve.state.agent_for = guests.agent
    pve.state.add_volume(Volume(DISK, "images", "raw", 20 * GiB, vmid=101))
    pve.state.dir_mappings.update({name: f"/tank/{name}" for name in SHARES})
    env = Env(pve, load_settings(), load_site(path), guests)
    # The CLI's provider too: its suite logs in to no VM here (none runs), it is scripted like the guests.
    monkeypatch.setattr(verify, "SshSuite", lambda settings, reporter=None: env.suites)
    return env


def reads_host_key(request: Any) -> bool:
    """The one agent command a swap runs on blue before the cutover: reading its ssh host key, to try the suite's
    login while planning. It changes nothing."""
    return bool(request.path.endswith("/agent/exec") and request.params.get("command") == ["cat", HOST_KEY])


def writes(pve: PveEmulator) -> list[str]:
    return [f"{r.method} {r.path}" for r in pve.requests if r.method in ("POST", "PUT", "DELETE")
            and not reads_host_key(r)]


def holds_all_data(vm: Vm, disk: Volume) -> bool:
    return (vm.config.get("scsi1", "").split(",")[0] == disk.volid
            and all(vm.config.get(key, "").split(",")[0] == name for name, key in SHARES.items()))


def assert_invariants(env: Env, disk: Volume, finished: bool = True) -> Vm:
    """No data volume lost; one VM serves (running, with every data volume; tagged live once a deploy finished);
    a share on one VM, or during a swap on two of which at most one may mount it (running with its link up)."""
    storage = env.pve.state.storages["local-zfs"]
    assert storage.volumes.get(disk.volid) is disk, "the data disk was deleted"
    assert not env.pve.calls("DELETE", r"/storage/.*/content/"), "a volume was deleted"
    live = env.live() if finished else [vm for vm in env.pve.state.vms.values() if vm.status == "running"]
    assert len(live) == 1, [vm.config.get("tags") for vm in env.pve.state.vms.values()]
    assert live[0].status == "running"
    assert holds_all_data(live[0], disk), live[0].config
    for name in SHARES:
        holders = [vm for vm in env.pve.state.vms.values()
                   if any(k.startswith("virtiofs") and v.split(",")[0] == name for k, v in vm.config.items())]
        mounters = [vm.vmid for vm in holders if vm.status == "running" and "link_down=1" not in vm.config["net0"]]
        assert len(holders) == 1 if finished else len(mounters) <= 1, (name, [vm.vmid for vm in holders])
    return live[0]


def first_deploy(env: Env) -> Vm:
    env.build()
    outcome = env.deploy(swap=False)
    assert outcome.outcome == "live"
    return env.pve.state.vms[101]


# --- first deploy and a passing swap -------------------------------------------------------------------------------


def test_first_deploy_creates_the_vm_with_its_data_and_tags_it_live(env: Env) -> None:
    vm = first_deploy(env)
    config = vm.config
    assert vm.status == "running"
    version = f"{env.versions:012x}"
    tags = config["tags"].split(";")
    assert tags[:3] == ["homelab", "live", "role-intranet"] or set(tags) >= {"homelab", "live", "role-intranet"}
    assert f"v-{version}" in tags and any(t.startswith("d-") for t in tags)
    create = env.pve.calls("POST", r"^/nodes/pve/qemu$")[0].params
    assert create["scsi0"] == f"local-zfs:0,import-from=local:import/intranet-{version}.qcow2"
    assert re.fullmatch(r"local:iso/seed-intranet-[0-9a-f]{12}\.iso,media=cdrom", create["ide2"])
    assert create["net0"] == "virtio,bridge=vmbr0" and create["agent"] == "1"
    assert "green" in create["tags"].split(";")
    assert holds_all_data(vm, env.disk())
    active = env.journal.data["active"]
    assert active["vmid"] == 101 and active["version"] == version


def test_swap_hands_the_data_to_green_and_keeps_blue_stopped_for_rollback(env: Env,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Run with exactly the ACLs `homelab token-role` prints: the swap's calls are all in DEPLOY_CALLS."""
    plan = proxmox.token_role(env.site.proxmox(), "least@pve!deploy")
    env.pve.state.add_token("least@pve!deploy", "s7", {path: set(privs) for path, privs in plan.roles.values()})
    monkeypatch.setenv("PVE_TOKEN", "least@pve!deploy=s7")
    blue = first_deploy(env)
    disk = env.disk()
    mac = blue.config["net0"].split(",")[0].split("=")[1]
    env.build()
    outcome = env.deploy(swap=True)
    assert outcome.outcome == "live" and outcome.vmid == 102
    green = assert_invariants(env, disk)
    assert green.vmid == 102 and disk.volid == "local-zfs:vm-102-disk-1" and disk.vmid == 102
    assert green.config["net0"] == f"virtio={mac},bridge=vmbr0"
    assert blue.status == "stopped" and blue.config["net0"] == f"virtio={mac},bridge=vmbr0,link_down=1"
    assert {"blue", "rollback"} <= set(blue.config["tags"].split(";"))
    assert not green.snapshots and not blue.snapshots
    # Green was booted once, before blue stopped, and kept running: the disk was hot-plugged into it.
    assert len(env.pve.calls("POST", r"/qemu/102/status/start$")) == 1
    assert not env.pve.calls("POST", r"/qemu/102/status/(shutdown|stop)$")
    assert env.pve.calls("POST", r"^/nodes/pve/qemu$")[-1].params["virtiofs1"] == "photos"
    assert env.pve.calls("POST", r"^/nodes/pve/qemu$")[-1].params["hotplug"] == "network,disk,usb"
    assert all(r.status == 200 for r in env.pve.requests if r.method != "GET"), \
        [(r.method, r.path, r.status) for r in env.pve.requests if r.status != 200]
    entry = env.journal.deploys[-1]
    assert entry["outcome"] == "live" and entry["downtime_s"] is not None and entry["downtime_s"] >= 0
    assert entry["done"]["hand-postgres"]["upid"].startswith("UPID:pve:")
    status = deploy.status_lines(env.journal, ROLE)
    assert status[0].startswith(f"intranet: live VM 102, version {f'{env.versions:012x}'}")
    assert "downtime" in status[-1]
    # The role's testinfra suite ran against each new VM once it served: over ssh to the production address,
    # trusting only the host key its guest agent read.
    assert [run["hosts"] for run in env.suites.runs] == ["ssh://10.99.0.101", "ssh://10.99.0.101"]
    run = env.suites.runs[-1]
    assert run["known_hosts"] == "10.99.0.101 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI102\n"
    assert run["ssh_config"].startswith("Host 10.99.0.101\n") and "StrictHostKeyChecking yes\n" in run["ssh_config"]
    # While planning, the same login was tried on blue (pinned to blue's key): before anything was created.
    assert [(r["address"], r["known_hosts"]) for r in env.suites.reached] == [
        ("10.99.0.101", "10.99.0.101 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI101\n")]
    assert run["context"]["address"] == "10.99.0.101/24" and run["context"]["hostname"] == "intranet"
    assert run["context"]["manifest"]["version"] == f"{env.versions:012x}" and run["context"]["qga_socket"] is None
    assert list(entry["done"]).index("testinfra") > list(entry["done"]).index("health-gate")


def test_keeps_the_newest_rollback_vms_and_never_deletes_one_with_data(env: Env) -> None:
    first_deploy(env)
    for _ in range(3):
        env.build()
        env.deploy(swap=True)
    disk = env.disk()
    live = assert_invariants(env, disk)
    rollbacks = sorted(vm.vmid for vm in env.pve.state.vms.values() if "rollback" in vm.config["tags"])
    assert live.vmid == 104 and rollbacks == [102, 103]
    deleted = [r.path for r in env.pve.calls("DELETE", r"^/nodes/pve/qemu/\d+$")]
    assert deleted == ["/nodes/pve/qemu/101"]


def test_preflight_after_a_swap_follows_the_disk_to_the_live_vm(env: Env) -> None:
    """move_disk names the disk after green: the site's volid is where the first deploy found it, and preflight
    checks the volumes where the next swap takes them from, the live VM."""
    first_deploy(env)
    env.build()
    env.deploy(swap=True)
    assert env.disk().volid == "local-zfs:vm-102-disk-1" and env.pve.state.volume(DISK) is None
    result = homelab("preflight", ROLE, "--site", str(env.site.path))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert ("ok   data volume intranet/postgres: local-zfs:vm-102-disk-1 on storage local-zfs, held by live VM 102 "
            "as scsi1") in lines
    assert "ok   data volume intranet/logs: directory mapping logs, held by live VM 102 as virtiofs4" in lines


def test_homelab_rollback_hands_back_to_the_previous_vm(env: Env) -> None:
    first_deploy(env)
    env.build()
    env.deploy(swap=True)
    provider = env.provider()
    plan = deploy.plan_rollback(env.settings, env.site, ROLE, provider=provider)
    assert plan.vmid == 101 and plan.blue == 102
    outcome = deploy.execute(plan, provider, env.journal)
    assert outcome.outcome == "live"
    live = assert_invariants(env, env.disk())
    assert live.vmid == 101 and env.disk().volid == "local-zfs:vm-101-disk-1"
    assert "rollback" in env.pve.state.vms[102].config["tags"]
    assert len(env.suites.runs) == 2  # the first deploy's and the swap's: VM 101's image may predate the suite


# --- failures --------------------------------------------------------------------------------------------------------


def test_green_failing_verification_is_deleted_and_blue_never_stopped(env: Env) -> None:
    blue = first_deploy(env)
    disk = env.disk()
    before = dict(blue.config)
    env.guests.verify_ok = False
    env.build()
    start = len(env.pve.requests)
    with pytest.raises(DeployError, match=r"failed at verify: VM 102 did not pass verification .*status: error"):
        env.deploy(swap=True)
    assert 102 not in env.pve.state.vms
    assert blue.status == "running" and blue.config == before
    moved = [r for r in env.pve.requests[start:] if re.search(r"move_disk|snapshot|/101/", r.path)
             and r.method != "GET" and not reads_host_key(r)]
    assert moved == []
    assert_invariants(env, disk)
    assert env.journal.deploys[-1]["outcome"] == "cleaned"


def test_a_green_that_mounts_while_isolated_is_deleted_and_blue_never_stopped(env: Env) -> None:
    """Green has blue's shares attached while blue serves: an image that mounts them without its link (built before
    the guard) is caught by the verification, its shares detached, the VM deleted."""
    blue = first_deploy(env)
    disk = env.disk()
    env.guests.mounts_isolated = True
    env.build()
    with pytest.raises(DeployError, match=r"failed at verify: VM 102 mounted its data volumes while isolated "
                                          r"\(homelab-volumes.service active\)"):
        env.deploy(swap=True)
    assert 102 not in env.pve.state.vms and blue.status == "running"
    assert len(env.pve.calls("PUT", r"/qemu/102/config$")) == len(SHARES)  # each share detached before the delete
    assert_invariants(env, disk)


def test_green_creates_its_stack_while_blue_serves_and_starts_it_at_the_cutover(env: Env) -> None:
    first_deploy(env)
    env.build()
    assert env.deploy(swap=True).outcome == "live"
    green = [line(r.params["command"]) for r in env.pve.calls("POST", r"/qemu/102/agent/exec$")]
    created, started = green.index(line(deploy.CREATE_STACK)), green.index(f"systemctl start {deploy.STACK_UNIT}")
    assert created < started
    entry = env.journal.deploys[-1]
    assert entry["done"]["create-stack"]["at"] <= entry["marks"]["blue_stopped"]  # before the downtime starts


def test_a_green_whose_stack_cannot_be_created_is_deleted_and_blue_never_stopped(env: Env) -> None:
    blue = first_deploy(env)
    disk = env.disk()
    env.guests.create_fails = True
    env.build()
    with pytest.raises(DeployError, match=r"failed at create-stack: VM 102: `docker compose --project-directory "
                                          r"/opt/homelab/compose --env-file /run/homelab/stack.env create` exited 1: "
                                          r"service jellyfin: image .* not found; VM 102 deleted, VM 101 untouched"):
        env.deploy(swap=True)
    assert 102 not in env.pve.state.vms and blue.status == "running"
    asked = [line(r.params["command"]) for r in env.pve.calls("POST", r"/qemu/101/agent/exec$")]
    assert f"systemctl stop {deploy.STACK_UNIT}" not in asked
    assert "blue_stopped" not in env.journal.deploys[-1]["marks"]
    assert_invariants(env, disk)


def test_a_degraded_green_names_its_failed_units(env: Env) -> None:
    first_deploy(env)
    env.guests.degraded = True
    env.build()
    with pytest.raises(DeployError, match=r"failed at verify: .*`systemctl is-system-running` exited 1: degraded "
                                          r"\(failed units: systemd-networkd-wait-online.service\)"):
        env.deploy(swap=True)
    assert 102 not in env.pve.state.vms


def test_health_gate_failing_after_cutover_rolls_back_to_blue(env: Env) -> None:
    blue = first_deploy(env)
    disk = env.disk()
    env.guests.healthy = False
    env.build()
    with pytest.raises(DeployError, match=r"failed at health-gate: VM 102 is not healthy .*db: running/unhealthy; "
                                          r"rolled back to VM 101"):
        env.deploy(swap=True)
    live = assert_invariants(env, disk)
    assert live is blue and disk.volid == "local-zfs:vm-101-disk-1"
    green = env.pve.state.vms[102]
    assert green.status == "stopped" and "failed" in green.config["tags"]
    assert env.pve.calls("POST", r"/qemu/102/snapshot/homelab-[^/]+/rollback$"), "the data was not restored"
    assert not green.snapshots
    entry = env.journal.deploys[-1]
    assert entry["outcome"] == "rolled-back" and entry["done"]["hand-postgres"]["to"] == 102
    assert entry["rolled"]["restore-snapshot"]["restored"] is True
    assert entry["downtime_s"] is not None
    # The next swap (a healthy image) passes, and the failed green is pruned.
    env.guests.healthy = True
    env.build()
    assert env.deploy(swap=True).outcome == "live"
    assert_invariants(env, disk)
    assert 102 not in env.pve.state.vms


def test_a_green_whose_stack_fails_to_start_is_rolled_back_at_once(env: Env) -> None:
    """`systemctl start` ran `docker compose up --wait`, which waited for the healthchecks: its failure is not
    retried until the deadline (the outage would last it), and the error names the unhealthy service."""
    blue = first_deploy(env)
    disk = env.disk()
    env.guests.start_fails = True
    env.guests.healthy = False
    env.build()
    with pytest.raises(DeployError, match=rf"failed at start-stack: VM 102: systemctl start {deploy.STACK_UNIT} "
                                          r"exited 1: not healthy: db: running/unhealthy; rolled back to VM 101"):
        env.deploy(swap=True)
    assert assert_invariants(env, disk) is blue
    green = [line(r.params["command"]) for r in env.pve.calls("POST", r"/qemu/102/agent/exec$")]
    assert green.count(f"systemctl start {deploy.STACK_UNIT}") == 1
    entry = env.journal.deploys[-1]
    assert entry["rolled"]["restore-snapshot"]["restored"] is True
    assert entry["rolled"]["stop-green"]["at"] - entry["marks"]["green_started"] < deploy.POLL


class FirstAnswer(dict[str, ExecResult]):
    """Agent answers where `line` gets `first` the first time it is asked."""

    def __init__(self, answers: dict[str, ExecResult], line: str, first: ExecResult) -> None:
        super().__init__(answers)
        self.line, self.first, self.asked = line, first, 0

    def get(self, key: str, default: Any = None) -> Any:
        if key == self.line:
            self.asked += 1
            if self.asked == 1:
                return self.first
        return super().get(key, default)


def test_the_rollbacks_blue_is_given_until_the_deadline_to_start_its_stack(env: Env) -> None:
    """Blue, the rollback's only way back, is not failed at its first stack start failure as a new VM is."""
    blue = first_deploy(env)
    disk = env.disk()
    start = f"systemctl start {deploy.STACK_UNIT}"
    blue.agent.commands = FirstAnswer(blue.agent.commands, start, ExecResult(exitcode=1, err="Job failed.\n"))
    env.guests.start_fails = True
    env.build()
    with pytest.raises(DeployError, match=r"failed at start-stack: .*; rolled back to VM 101$"):
        env.deploy(swap=True)
    assert assert_invariants(env, disk) is blue
    assert isinstance(blue.agent.commands, FirstAnswer) and blue.agent.commands.asked == 2


def test_a_stack_its_condition_skipped_is_started_again_not_left_to_the_gate(env: Env) -> None:
    """`volumes serving` found no carrier yet: the unit was skipped and `systemctl start` exited 0 all the same."""
    first_deploy(env)
    disk = env.disk()
    env.build()
    started = f"systemctl start {deploy.STACK_UNIT}"
    agent_for = env.pve.state.agent_for

    def skipped_once(vm: Any) -> Any:
        agent = agent_for(vm)
        agent.commands = FirstAnswer(agent.commands, line(deploy.HEALTH_COMMANDS[0]),
                                     ExecResult(exitcode=3, out="inactive\n"))
        return agent

    env.pve.state.agent_for = skipped_once
    assert env.deploy(swap=True).outcome == "live"
    assert_invariants(env, disk)
    green = [line(r.params["command"]) for r in env.pve.calls("POST", r"/qemu/102/agent/exec$")]
    assert green.count(started) == 2
    entry = env.journal.deploys[-1]
    assert entry["done"]["start-stack"]["at"] - entry["marks"]["green_started"] <= deploy.POLL + 1


# Each step of a swap, by the request that does it: (name, method, path regex, nth match within the swap).
SWAP_CALLS = [
    ("upload-image", "POST", r"/storage/local/upload$", 1, True),
    ("upload-seed", "POST", r"/storage/local/upload$", 2, True),
    ("create", "POST", r"^/nodes/pve/qemu$", 1, True),
    ("boot-isolated", "POST", r"/qemu/102/status/start$", 1, True),
    ("verify", "POST", r"/qemu/102/agent/exec$", 2, False),
    ("verify (isolated)", "POST", r"/qemu/102/agent/exec$", 4, False),
    ("create-stack", "POST", r"/qemu/102/agent/exec$", 5, False),
    ("plan: blue's host key", "POST", r"/qemu/101/agent/exec$", 1, False),
    ("stop-blue-stack", "POST", r"/qemu/101/agent/exec$", 2, False),
    ("shutdown-blue", "POST", r"/qemu/101/status/shutdown$", 1, True),
    ("hand-postgres", "POST", r"/qemu/101/move_disk$", 1, True),
    ("release-appdata", "PUT", r"/qemu/101/config$", 1, False),
    ("release-logs", "PUT", r"/qemu/101/config$", 5, False),
    ("snapshot-data", "POST", r"/qemu/102/snapshot$", 1, True),
    ("identity (blue)", "PUT", r"/qemu/101/config$", 6, False),
    ("identity (green)", "PUT", r"/qemu/102/config$", 1, False),
    ("start-stack", "POST", r"/qemu/102/agent/exec$", 6, False),
    ("start-stack (started?)", "GET", r"/qemu/102/agent/exec-status$", 7, False),
    ("health-gate", "GET", r"/qemu/102/agent/exec-status$", 8, False),
    ("testinfra (green's host key)", "POST", r"/qemu/102/agent/exec$", 15, False),
    ("drop-snapshot", "DELETE", r"/qemu/102/snapshot/", 1, True),
    ("tag-live", "PUT", r"/qemu/102/config$", 2, False),
    ("tag-blue", "PUT", r"/qemu/101/config$", 7, False),
]
FAULTS = [(name, method, path, nth, kind) for name, method, path, nth, task in SWAP_CALLS
          for kind in ("error", "task", "hang") if kind != "task" or task]


@pytest.mark.parametrize(("name", "method", "path", "nth", "kind"), FAULTS,
                         ids=[f"{f[0]}-{f[4]}" for f in FAULTS])
def test_a_fault_at_any_step_loses_nothing_and_a_rerun_converges(env: Env, name: str, method: str, path: str,
                                                                  nth: int, kind: str) -> None:
    first_deploy(env)
    disk = env.disk()
    env.build()
    env.timeout = (5.0, 0.5)
    if kind == "error":
        env.pve.fail(method, path, nth=nth)
    elif kind == "task":
        env.pve.fail_task(method, path, nth=nth)
    else:
        env.pve.hang(method, path, nth=nth, seconds=1.0)
    runs = 0
    while True:
        runs += 1
        try:
            outcome = env.deploy(swap=True)
        except (DeployError, ProxmoxError):  # a step's failure, or an API call's while planning
            assert_invariants(env, disk, finished=env.journal.unfinished() is None)
            assert runs < 3, "the rerun did not converge"
            continue
        break
    assert outcome.outcome == "live"
    live = assert_invariants(env, disk)
    assert f"v-{env.versions:012x}" in live.config["tags"].split(";")
    fired = [f for f in env.pve.faults.faults if f.fired]
    assert fired, f"the fault at {name} never fired"


def test_a_service_whose_own_endpoint_fails_keeps_green_from_serving(env: Env) -> None:
    """Compose says healthy (its checks run in the containers), but Immich's port does not answer on the VM."""
    blue = first_deploy(env)
    disk = env.disk()
    asked = {line(r.params["command"]) for r in env.pve.calls("POST", r"/qemu/101/agent/exec$")}
    assert "curl -fsS -o /dev/null --max-time 5 http://127.0.0.1:2283/api/server/ping" in asked
    assert "curl -fsS -o /dev/null --max-time 5 http://127.0.0.1:8096/health" in asked
    env.guests.endpoint_down = "http://127.0.0.1:2283/api/server/ping"
    env.build()
    with pytest.raises(DeployError, match=r"failed at health-gate: VM 102 is not healthy within 600 s: immich "
                                          r"http://127\.0\.0\.1:2283/api/server/ping: curl exited 22: curl: \(22\) "
                                          r"The requested URL returned error: 503; rolled back to VM 101"):
        env.deploy(swap=True)
    assert assert_invariants(env, disk) is blue  # blue's own gate asks no endpoint: its image may predate them


def test_a_green_failing_its_testinfra_suite_is_rolled_back(env: Env) -> None:
    blue = first_deploy(env)
    disk = env.disk()
    env.suites.failure = "verification of intranet failed (see build/intranet/verify/verify.log)"
    env.build()
    with pytest.raises(DeployError, match=r"failed at testinfra: verification of intranet failed \(see build/intranet/"
                                          r"verify/verify\.log\); rolled back to VM 101$"):
        env.deploy(swap=True)
    assert assert_invariants(env, disk) is blue
    assert len(env.suites.runs) == 2  # the first deploy's, then green's
    # Green had served with the data: it goes back from the snapshot taken at the hand-over.
    assert env.pve.calls("POST", r"/qemu/102/snapshot/homelab-[^/]+/rollback$")


def test_a_green_whose_host_key_cannot_be_read_is_rolled_back_untested(env: Env) -> None:
    blue = first_deploy(env)
    env.guests.host_key_readable = False
    env.build()
    with pytest.raises(DeployError, match=r"failed at testinfra: VM 102: cannot read /etc/ssh/ssh_host_ed25519_key"
                                          r"\.pub through the guest agent: cat: .*No such file or directory; "
                                          r"rolled back to VM 101$"):
        env.deploy(swap=True)
    assert assert_invariants(env, env.disk()) is blue
    assert len(env.suites.runs) == 1  # never ssh to a VM whose key is unknown


def test_a_swap_this_machine_could_not_check_over_ssh_is_refused_before_anything_changes(env: Env) -> None:
    first_deploy(env)
    env.suites.unreachable = "ssh to 10.99.0.101 failed (255): tester@10.99.0.101: Permission denied (publickey)."
    env.build()
    start = len(env.pve.requests)
    with pytest.raises(DeployError, match=r"^the health gate runs the testinfra suite over ssh as tester on "
                                          r"10\.99\.0\.101, and this machine cannot log in to VM 101 \(live\) there: "
                                          r"ssh to 10\.99\.0\.101 failed \(255\): .*Permission denied "
                                          r"\(publickey\)\.$"):
        env.deploy(swap=True)
    writes_now = [f"{r.method} {r.path}" for r in env.pve.requests[start:] if r.method != "GET"]
    assert all(w.endswith("/qemu/101/agent/exec") for w in writes_now), writes_now  # reading blue's host key only
    assert env.journal.unfinished() is None and len(env.pve.state.vms) == 1


def test_a_failure_during_the_rollback_is_resumed_by_the_rerun(env: Env) -> None:
    blue = first_deploy(env)
    disk = env.disk()
    env.guests.healthy = False
    env.build()
    env.pve.fail("POST", r"/qemu/102/move_disk$")  # the hand-back of the data disk
    with pytest.raises(DeployError, match=r"then rollback failed at hand-back-postgres: .*injected failure "
                                          r"\(rerun to resume the rollback\)"):
        env.deploy(swap=True)
    assert env.journal.unfinished() is not None and disk.vmid == 102
    with pytest.raises(DeployError, match=r"failed at health-gate: .*; rolled back to VM 101"):
        env.deploy(swap=True)
    assert assert_invariants(env, disk) is blue
    assert env.journal.unfinished() is None


class Interrupting:
    """The provider, except that one call raises KeyboardInterrupt (the process killed mid-swap)."""

    def __init__(self, inner: ProxmoxProvider, method: str, nth: int) -> None:
        self.inner, self.method, self.nth, self.seen = inner, method, nth, 0

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.inner, name)
        if name != self.method:
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            self.seen += 1
            if self.seen == self.nth:
                raise KeyboardInterrupt
            return target(*args, **kwargs)

        return call


@pytest.mark.parametrize(("method", "nth", "step"), [("detach", 2, "release-photos"),
                                                      ("move_disk", 1, "hand-postgres"),
                                                      ("health_gate", 1, "health-gate"),
                                                      ("run_suite", 1, "testinfra")])
def test_a_killed_swap_resumes_where_it_stopped(env: Env, method: str, nth: int, step: str) -> None:
    first_deploy(env)
    disk = env.disk()
    env.build()
    with pytest.raises(KeyboardInterrupt):
        env.deploy(swap=True, provider=Interrupting(env.provider(), method, nth))
    entry = env.journal.unfinished()
    assert entry is not None and entry["current_done"] == step and entry["phase"] == "forward"
    uploads, creates = len(env.pve.calls("POST", "/upload$")), len(env.pve.calls("POST", r"^/nodes/pve/qemu$"))
    outcome = env.deploy(swap=True)
    assert outcome.outcome == "live" and outcome.deploy_id == entry["id"]
    assert len(env.pve.calls("POST", "/upload$")) == uploads
    assert len(env.pve.calls("POST", r"^/nodes/pve/qemu$")) == creates
    assert_invariants(env, disk)


# --- abandoning an unfinished deploy --------------------------------------------------------------------------------


def killed_swap(env: Env, method: str, nth: int) -> dict[str, Any]:
    """A swap killed at the nth call of a provider method: its journal entry, unfinished."""
    first_deploy(env)
    env.build()
    with pytest.raises(KeyboardInterrupt):
        env.deploy(swap=True, provider=Interrupting(env.provider(), method, nth))
    entry = env.journal.unfinished()
    assert entry is not None
    return entry


def test_abandoning_a_swap_killed_before_the_cutover_deletes_green_and_never_touches_blue(env: Env) -> None:
    entry = killed_swap(env, "agent_exec", 1)  # verification's first command
    blue, disk = env.pve.state.vms[101], env.disk()
    before = dict(blue.config)
    start = len(env.pve.requests)
    dry = homelab("deploy", ROLE, "--abandon", "--dry-run", "--site", str(env.site.path))
    assert dry.exit_code == 0, dry.output
    assert dry.output.strip() == ("abandoning; to do: cleanup: stop-green, cleanup: detach-appdata, cleanup: "
                                  "detach-photos, cleanup: detach-media, cleanup: detach-backups, cleanup: "
                                  "detach-logs, cleanup: destroy-green")
    assert len(env.pve.requests) == start  # a dry run reads the journal only
    result = homelab("deploy", ROLE, "--abandon", "--site", str(env.site.path))
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == \
        f"intranet: deploy {entry['id']} abandoned: VM 102 deleted, VM 101 untouched"
    assert 102 not in env.pve.state.vms
    assert blue.status == "running" and blue.config == before
    assert not [r for r in env.pve.requests[start:] if "/101/" in r.path and r.method != "GET"
                and not reads_host_key(r)]
    assert_invariants(env, disk)
    last = env.journal.deploys[-1]
    assert (last["outcome"], last["error"]) == ("cleaned", "abandoned by the owner before verify")
    assert env.journal.unfinished() is None
    assert env.deploy(swap=True).outcome == "live"  # a new swap starts afresh


@pytest.mark.parametrize(("method", "nth", "step"), [("move_disk", 1, "hand-postgres"),
                                                      ("detach", 2, "release-photos"),
                                                      ("health_gate", 1, "health-gate"),
                                                      # healthy, not yet through its suite: green does not serve
                                                      ("run_suite", 1, "testinfra")])
def test_abandoning_a_swap_killed_in_the_cutover_hands_everything_back_to_blue(env: Env, method: str, nth: int,
                                                                                step: str) -> None:
    entry = killed_swap(env, method, nth)
    assert entry["current_done"] == step
    disk = env.disk()
    outcome, what = deploy.abandon(env.journal, ROLE, env.provider())
    assert (outcome.outcome, what) == ("rolled-back", "rolled back to VM 101")
    assert outcome.error == f"abandoned by the owner before {step}"
    assert assert_invariants(env, disk).vmid == 101
    green = env.pve.state.vms[102]
    assert green.status == "stopped" and "failed" in green.config["tags"].split(";")
    assert env.journal.unfinished() is None


def test_a_green_that_already_serves_is_finished_not_abandoned(env: Env) -> None:
    entry = killed_swap(env, "set_tags", 1)  # tag-live, after green passed its health gate
    assert entry["current_done"] == "tag-live"
    start = len(env.pve.requests)
    text = one_line(homelab("deploy", ROLE, "--abandon", "--site", str(env.site.path)))
    assert text == (f"error: deploy {entry['id']} cannot be abandoned: VM 102 passed its health gate and serves "
                    "(`homelab rollback` goes back once it is finished)")
    assert not [r for r in env.pve.requests[start:] if r.method != "GET"]
    assert env.deploy(swap=True).outcome == "live"
    assert_invariants(env, env.disk())


def test_a_first_deploy_cannot_be_abandoned_and_nothing_unfinished_is_one_line(env: Env) -> None:
    env.build()
    with pytest.raises(KeyboardInterrupt):
        env.deploy(swap=False, provider=Interrupting(env.provider(), "health_gate", 1))
    text = one_line(homelab("deploy", ROLE, "--abandon", "--dry-run", "--site", str(env.site.path)))
    assert "cannot be abandoned: a first deploy has no previous VM to go back to, and VM 101 holds the data " \
           "volumes" in text
    assert env.deploy(swap=False).outcome == "live"
    text = one_line(homelab("deploy", ROLE, "--abandon", "--site", str(env.site.path)))
    assert text.startswith("error: no deploy of intranet is unfinished (") and text.endswith("nothing to abandon")
    usage = homelab("deploy", ROLE, "--abandon", "--swap", "--site", str(env.site.path))
    assert usage.exit_code == 2 and "--abandon undoes the unfinished deploy as planned: drop --swap" in usage.output


def test_a_homelab_rollback_abandoned_before_its_first_step_changed_nothing(env: Env) -> None:
    first_deploy(env)
    env.build()
    env.deploy(swap=True)
    plan = deploy.plan_rollback(env.settings, env.site, ROLE, provider=env.provider())
    env.journal.record(plan)  # the process killed right after planning
    start = len(writes(env.pve))
    outcome, what = deploy.abandon(env.journal, ROLE, env.provider())
    assert (outcome.outcome, what) == ("cleaned", "nothing changed")
    assert writes(env.pve)[start:] == []
    assert assert_invariants(env, env.disk()).vmid == 102


def test_two_deploys_of_a_role_never_run_at_once(env: Env) -> None:
    first_deploy(env)
    env.build()
    start = len(env.pve.requests)
    with env.journal.exclusive(), pytest.raises(DeployError, match=r"^pid \d+ is deploying with .*"
                                                                     r"deploy-journal\.json now: wait"):
        env.deploy(swap=True)
    assert not [r for r in env.pve.requests[start:] if r.method != "GET" and not reads_host_key(r)]
    assert env.deploy(swap=True).outcome == "live"


def plan_only(env: Env) -> deploy.DeployPlan:
    seed = Seed(SEED.user_data, f"instance-id: intranet-{env.versions}\n", SEED.network_config)
    plan, resumed = deploy.resume_or_plan(env.settings, env.site, ROLE, None, True, provider=env.provider(),
                                          journal=env.journal, seed=seed)
    assert not resumed
    return plan


def test_a_plan_overtaken_by_a_swap_while_it_waited_is_refused(env: Env) -> None:
    first_deploy(env)
    env.build()
    stale = plan_only(env)  # planned against VM 101; another run swaps first
    assert env.deploy(swap=True).outcome == "live"
    start, deploys = len(env.pve.requests), len(env.journal.deploys)
    with pytest.raises(DeployError, match=r"^the live VM of intranet changed while this deploy was planned \(planned "
                                          r"against VM 101, now VM 102\): run it again$"):
        deploy.execute(stale, env.provider(), env.journal)
    assert not [r for r in env.pve.requests[start:] if r.method != "GET"]
    assert len(env.journal.deploys) == deploys  # not even journaled


def test_a_plan_overtaken_by_an_unfinished_deploy_is_refused(env: Env) -> None:
    first_deploy(env)
    env.build()
    stale = plan_only(env)
    with pytest.raises(KeyboardInterrupt):
        env.deploy(swap=True, provider=Interrupting(env.provider(), "move_disk", 1))
    pending = env.journal.unfinished()
    assert pending is not None
    start = len(env.pve.requests)
    with pytest.raises(DeployError, match=rf"^deploy {pending['id']} of intranet was left unfinished while this one "
                                          r"was planned: rerun to resume it, or add --abandon to undo it$"):
        deploy.execute(stale, env.provider(), env.journal)
    assert not [r for r in env.pve.requests[start:] if r.method != "GET"]
    assert env.deploy(swap=True).outcome == "live"  # the rerun resumes the unfinished one
    assert env.journal.deploys[-1]["id"] == pending["id"]


# --- bad input: one line, nothing created ------------------------------------------------------------------------


def homelab(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_line(result: Result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_an_image_not_built_is_one_line(env: Env) -> None:
    text = one_line(homelab("deploy", ROLE, "--site", str(env.site.path)))
    assert text.startswith("error: no image of intranet is built in ") and "homelab build image intranet" in text
    assert writes(env.pve) == []


def test_a_vmid_taken_by_a_vm_without_our_tags_is_one_line(env: Env) -> None:
    env.build()
    env.pve.state.vms[101] = Vm(101, "pve", {"name": "someone", "tags": "theirs"})
    text = one_line(homelab("deploy", ROLE, "--site", str(env.site.path)))
    assert text == ("error: preflight failed: vm intranet: VMID 101 is taken by 'someone' (not tagged homelab) -> "
                    "choose a free hosts.intranet.vmid")
    assert writes(env.pve) == []


def test_a_missing_data_volume_is_one_line(env: Env) -> None:
    env.build()
    del env.pve.state.storages["local-zfs"].volumes[DISK]
    text = one_line(homelab("deploy", ROLE, "--site", str(env.site.path)))
    assert text == (f"error: data volume postgres: {DISK} does not exist (hosts.intranet.volumes.postgres.volid): "
                    "create it (zfs create -V) or fix the site file")
    assert writes(env.pve) == []


def test_a_missing_directory_mapping_is_one_line(env: Env) -> None:
    env.build()
    del env.pve.state.dir_mappings["photos"]
    text = one_line(homelab("deploy", ROLE, "--site", str(env.site.path)))
    assert text == ("error: data volume photos: directory mapping photos does not exist (or the token may not use "
                    "it): add it under Datacenter > Directory Mappings, or fix hosts.intranet.volumes.photos.mapping")
    assert writes(env.pve) == []


def test_a_data_volume_missing_from_the_site_is_one_line(env: Env, tmp_path: Path) -> None:
    env.build()
    path = tmp_path / "site-no-volume.yaml"
    path.write_text(site_text(env.pve, volumes="postgres: {mapping: postgres}"))
    text = one_line(homelab("deploy", ROLE, "--site", str(path)))
    assert text == f"error: site file {path}: hosts.intranet.volumes.postgres: postgres is a disk: give volid"
    assert writes(env.pve) == []


def test_a_storage_without_import_is_one_line(env: Env) -> None:
    env.build()
    env.pve.state.storages["local"].content.discard("import")
    text = one_line(homelab("deploy", ROLE, "--site", str(env.site.path)))
    assert text.startswith("error: preflight failed: storage import: local does not hold content import")
    assert writes(env.pve) == []


def test_a_swap_without_a_live_vm_is_one_line(env: Env) -> None:
    env.build()
    text = one_line(homelab("deploy", ROLE, "--swap", "--site", str(env.site.path)))
    assert text == "error: no VM of intranet is tagged live: deploy without --swap first"
    assert writes(env.pve) == []


# --- the CLI -------------------------------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_changes_nothing(env: Env) -> None:
    first_deploy(env)
    env.build()
    before = len(writes(env.pve))
    result = homelab("deploy", ROLE, "--swap", "--dry-run", "--site", str(env.site.path),
                     "--secrets", str(FIXTURES / "test-secrets.yaml"))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "blue-green swap" in out and "VM 102 replacing VM 101" in out
    assert f"volume postgres: disk scsi1 = {DISK} -> /srv/postgres" in out
    assert "move_disk scsi1 of VM 101 to VM 102" in out and "-- cutover" in out
    assert "on a failure from the cutover on (automatic rollback):" in out
    assert len(writes(env.pve)) == before


def test_status_and_history_read_the_journal(env: Env) -> None:
    first_deploy(env)
    env.build()
    env.deploy(swap=True)
    result = homelab("status", ROLE)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("intranet: live VM 102, version ")
    assert re.search(r"swap v[0-9a-f]+ VM 102 \(from VM 101\): live, downtime \d+\.\d s", result.output)
    history = homelab("history", ROLE)
    assert history.exit_code == 0 and len(history.output.strip().splitlines()) == 2
    back = homelab("rollback", ROLE, "--site", str(env.site.path))
    assert back.exit_code == 0, back.output
    assert back.output.strip().splitlines()[-1].startswith(f"intranet: VM 101 live again, version {1:012x}")
    assert assert_invariants(env, env.disk()).vmid == 101


class Meddling:
    """The provider, with the emulator at hand for a subclass that changes the host's state behind its back."""

    def __init__(self, inner: ProxmoxProvider, pve: PveEmulator) -> None:
        self.inner, self.pve = inner, pve

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class HotplugOff(Meddling):
    """Green's `hotplug` loses `disk` once it runs (an owner's change on the host)."""

    def start(self, vmid: int) -> dict[str, Any]:
        result = self.inner.start(vmid)
        self.pve.state.vms[vmid].config["hotplug"] = "network,usb"
        return result


def test_a_green_that_cannot_hot_plug_the_disk_never_gets_it_and_the_swap_rolls_back(env: Env) -> None:
    blue = first_deploy(env)
    disk = env.disk()
    env.build()
    with pytest.raises(DeployError, match=r"failed at hand-postgres: data volume postgres: VM 102 cannot hot-plug "
                                          r"scsi1 \(its hotplug option 'network,usb' lacks disk\).*rolled back to "
                                          r"VM 101"):
        env.deploy(swap=True, provider=HotplugOff(env.provider(), env.pve))
    assert assert_invariants(env, disk) is blue
    assert not env.pve.calls("POST", r"/move_disk$")[1:], "the disk left blue"  # only the first deploy's none


class VmidTaken(Meddling):
    """Another VM (not ours) takes green's VMID just before the create."""

    def create_vm(self, spec: Any) -> dict[str, Any]:
        self.pve.state.vms[spec.vmid] = Vm(spec.vmid, "pve", {"name": "someone-else", "memory": "512",
                                                              "virtiofs0": "appdata"}, status="running")
        return self.inner.create_vm(spec)


def test_the_cleanup_leaves_a_vm_that_took_greens_vmid_alone(env: Env) -> None:
    blue = first_deploy(env)
    env.build()
    with pytest.raises(DeployError, match=r"failed at create: .*VM 102 left alone \(not this deploy's\), "
                                                        r"VM 101 untouched"):
        env.deploy(swap=True, provider=VmidTaken(env.provider(), env.pve))
    other = env.pve.state.vms[102]
    assert other.status == "running" and other.config["virtiofs0"] == "appdata" and other.name == "someone-else"
    assert not [r for r in env.pve.requests if "/qemu/102" in r.path and r.method != "GET"]
    assert blue.status == "running"
    cleaned = env.journal.deploys[-1]["cleaned"]
    assert cleaned["stop-green"]["left"] == cleaned["destroy-green"]["left"] == "not this deploy's VM"
