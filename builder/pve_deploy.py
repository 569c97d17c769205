"""ProxmoxProvider: the deploy's Provider on the Proxmox VE API (builder/proxmox.Pve). Every call it makes is a
row of proxmox.DEPLOY_CALLS, so `homelab token-role` grants exactly what it needs."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import proxmox
from .deploy import (
    ROOT_DISK,
    SEED_DRIVE,
    Endpoint,
    GuestResult,
    VmInfo,
    VmSpec,
    health_gate,
    parse_net,
    render_net,
)
from .errors import DeployError, ProxmoxError
from .proxmox import Pve
from .site import Site
from .verify import SuiteRunner, deploy_context, pinned_ssh_config

AGENT_POLL = 1.0
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key.pub"


class ProxmoxProvider:
    def __init__(self, pve: Pve, site: Site, *, task_timeout: float = 600.0, suite: SuiteRunner | None = None
                 ) -> None:
        self.pve = pve
        self.suite = suite  # the role's testinfra suite, over ssh (None: a provider that never deploys)
        self.site = site
        self.node = pve.target.node
        self.storages = pve.target.storages
        self.task_timeout = task_timeout

    # --- time

    def now(self) -> float:
        return self.pve.clock()

    def sleep(self, seconds: float) -> None:
        self.pve.sleep(seconds)

    # --- reading

    def preflight(self, role: str) -> list[str]:
        from .preflight import preflight

        return [f"{c.name}: {c.detail}" + (f" -> {c.fix}" if c.fix else "")
                for c in preflight(self.pve, self.site, [role]) if c.failed]

    def _qemu(self, vmid: int) -> str:
        return f"/nodes/{self.node}/qemu/{vmid}"

    def vm(self, vmid: int) -> VmInfo | None:
        try:
            # What the VM runs with, not pending changes (a hot-plug PVE could not do stays pending until a
            # restart): the hand-over and the one-mounter guard must see the devices a running VM really has.
            config = self.pve.get(f"{self._qemu(vmid)}/config", current=1)
        except ProxmoxError as exc:
            if "does not exist" in str(exc):
                return None
            raise
        status = self.pve.get(f"{self._qemu(vmid)}/status/current")
        return VmInfo(vmid, str(status.get("status")), {k: str(v) for k, v in config.items() if k != "digest"})

    def vms(self) -> list[VmInfo]:
        out = []
        for entry in self.pve.get("/cluster/resources", type="vm"):
            if entry.get("type") != "qemu" or entry.get("node") != self.node:
                continue
            vm = self.vm(int(entry["vmid"]))
            if vm is not None:
                out.append(vm)
        return out

    def volume_exists(self, volid: str) -> bool:
        storage = volid.split(":", 1)[0]
        entries = self.pve.get(f"/nodes/{self.node}/storage/{storage}/content", content="images")
        return any(e.get("volid") == volid for e in entries)

    def owned_volumes(self, vmid: int) -> list[str]:
        storage = self.storages["images"]
        entries = self.pve.get(f"/nodes/{self.node}/storage/{storage}/content", content="images", vmid=vmid)
        return sorted(str(e["volid"]) for e in entries)

    def mappings(self) -> set[str]:
        return {str(m["id"]) for m in self.pve.get("/cluster/mapping/dir")}

    def snapshots(self, vmid: int) -> list[str]:
        return [str(s["name"]) for s in self.pve.get(f"{self._qemu(vmid)}/snapshot") if s.get("name") != "current"]

    # --- changing

    def _task(self, upid: Any) -> dict[str, Any]:
        proxmox.wait_task(self.pve, str(upid), self.task_timeout)
        return {"upid": str(upid)}

    def upload_image(self, path: Path, sha256: str) -> dict[str, Any]:
        result = proxmox.upload(self.pve, self.storages["import"], "import", path, sha256,
                                task_timeout=self.task_timeout)
        return {"volid": result.volid, "skipped": result.skipped}

    def upload_seed(self, path: Path, sha256: str) -> dict[str, Any]:
        result = proxmox.upload(self.pve, self.storages["iso"], "iso", path, sha256, task_timeout=self.task_timeout)
        return {"volid": result.volid, "skipped": result.skipped}

    def create_vm(self, spec: VmSpec) -> dict[str, Any]:
        net = {"bridge": spec.bridge, **({"link_down": "1"} if spec.link_down else {})}
        config: dict[str, Any] = {
            "vmid": spec.vmid, "name": spec.name, "cores": spec.cores, "memory": spec.memory_mb,
            "ostype": "l26", "scsihw": "virtio-scsi-single", "agent": "1", "boot": f"order={ROOT_DISK}",
            # PVE's default, spelt out: the swap hot-plugs the data disk into the running green (`disk`) and
            # toggles its link (`network`); a host-wide change of the default must not turn that into pending.
            "hotplug": "network,disk,usb",
            ROOT_DISK: f"{self.storages['images']}:0,import-from={spec.image_volid}",
            SEED_DRIVE: f"{spec.seed_volid},media=cdrom",
            "net0": render_net("virtio", spec.mac, net), "tags": ";".join(spec.tags),
        }
        for key, value in spec.drives.items():
            config[key] = value
        upid = self.pve.call("POST", f"/nodes/{self.node}/qemu", **config)
        return {"vmid": spec.vmid, **self._task(upid)}

    def _power(self, vmid: int, action: str, **params: Any) -> dict[str, Any]:
        upid = self.pve.call("POST", f"{self._qemu(vmid)}/status/{action}", **params)
        return {"vmid": vmid, action: self._task(upid)["upid"]}

    def start(self, vmid: int) -> dict[str, Any]:
        return self._power(vmid, "start")

    def stop(self, vmid: int) -> dict[str, Any]:
        return self._power(vmid, "stop")

    def shutdown(self, vmid: int, timeout: float) -> dict[str, Any]:
        """ACPI shutdown within `timeout`, then a hard stop if the guest did not power off."""
        try:
            result = self._power(vmid, "shutdown", timeout=int(timeout))
        except ProxmoxError as exc:
            result = {"vmid": vmid, "shutdown_failed": str(exc)}
        vm = self.vm(vmid)
        if vm is not None and vm.status != "stopped":
            result.update(self.stop(vmid))
        return result

    def agent_ping(self, vmid: int) -> None:
        self.pve.call("POST", f"{self._qemu(vmid)}/agent/ping")

    def agent_exec(self, vmid: int, argv: tuple[str, ...], timeout: float) -> GuestResult:
        pid = self.pve.call("POST", f"{self._qemu(vmid)}/agent/exec", command=list(argv))["pid"]
        end = self.now() + timeout
        while True:
            status = self.pve.get(f"{self._qemu(vmid)}/agent/exec-status", pid=pid)
            if status.get("exited"):
                return GuestResult(int(status.get("exitcode", -1)), str(status.get("out-data", "")),
                                   str(status.get("err-data", "")))
            if self.now() >= end:
                raise DeployError(f"VM {vmid}: `{' '.join(argv)}` still running after {timeout:.0f} s")
            self.sleep(AGENT_POLL)

    def snapshot_volumes(self, vmid: int, name: str) -> dict[str, Any]:
        """A VM snapshot of the stopped VM holding the data disks (ZFS snapshots of each zvol, taken by PVE)."""
        upid = self.pve.call("POST", f"{self._qemu(vmid)}/snapshot", snapname=name,
                             description="homelab: data as handed over by the swap")
        return self._task(upid)

    def rollback_snapshot(self, vmid: int, name: str) -> dict[str, Any]:
        return self._task(self.pve.call("POST", f"{self._qemu(vmid)}/snapshot/{name}/rollback"))

    def delete_snapshot(self, vmid: int, name: str) -> dict[str, Any]:
        return self._task(self.pve.call("DELETE", f"{self._qemu(vmid)}/snapshot/{name}"))

    def move_disk(self, vmid: int, key: str, target: int) -> dict[str, Any]:
        upid = self.pve.call("POST", f"{self._qemu(vmid)}/move_disk", disk=key, **{"target-vmid": target,
                                                                                     "target-disk": key})
        return self._task(upid)

    def attach_share(self, vmid: int, key: str, mapping: str) -> dict[str, Any]:
        self.pve.call("PUT", f"{self._qemu(vmid)}/config", **{key: mapping})
        return {}

    def detach(self, vmid: int, key: str) -> dict[str, Any]:
        self.pve.call("PUT", f"{self._qemu(vmid)}/config", delete=key)
        return {}

    def set_link(self, vmid: int, up: bool, mac: str | None = None) -> dict[str, Any]:
        vm = self.vm(vmid)
        if vm is None:
            raise DeployError(f"VM {vmid} does not exist")
        model, current, options = parse_net(vm.config.get("net0", ""))
        options = {k: v for k, v in options.items() if k != "link_down"}
        if not up:
            options["link_down"] = "1"
        value = render_net(model, mac or current, options)
        if value != vm.config.get("net0"):
            self.pve.call("PUT", f"{self._qemu(vmid)}/config", net0=value)
        return {"net0": value}

    def set_tags(self, vmid: int, tags: tuple[str, ...]) -> dict[str, Any]:
        self.pve.call("PUT", f"{self._qemu(vmid)}/config", tags=";".join(tags))
        return {}

    def destroy_vm(self, vmid: int) -> dict[str, Any]:
        # Only the disks the config references (PVE's default): a volume merely named after the VMID stays.
        upid = self.pve.call("DELETE", self._qemu(vmid), **{"destroy-unreferenced-disks": 0})
        return {"destroyed": vmid, **self._task(upid)}

    def health_gate(self, vmid: int, deadline: float, endpoints: tuple[Endpoint, ...] = ()) -> dict[str, Any]:
        return health_gate(self, vmid, deadline, endpoints)

    def run_suite(self, vmid: int, expect: dict[str, Any]) -> dict[str, Any]:
        """The role's testinfra suite over ssh to the VM on its production address (it has the identity by now),
        as the site's admin user with the owner's key, trusting only the host key the guest agent reads."""
        with self._pinned_ssh(vmid, expect) as (suite, address, config):
            report = suite.run(expect["role"], deploy_context(expect), f"ssh://{address}", config)
        return {"vmid": vmid, "suite": "passed", "report": str(report)}

    def ssh_problem(self, vmid: int, expect: dict[str, Any]) -> str | None:
        """Why this machine could not log in to the VM serving on the production address as the suite will."""
        with self._pinned_ssh(vmid, expect) as (suite, address, config):
            return suite.reach(address, config)

    @contextlib.contextmanager
    def _pinned_ssh(self, vmid: int, expect: dict[str, Any]) -> Iterator[tuple[SuiteRunner, str, Path]]:
        if self.suite is None:
            raise DeployError("this Proxmox VE provider has no testinfra runner")
        key = self.agent_exec(vmid, ("cat", HOST_KEY), 30)
        if key.exitcode != 0:
            raise DeployError(f"VM {vmid}: cannot read {HOST_KEY} through the guest agent: {key.err.strip()}")
        address = expect["address"].split("/")[0]
        with tempfile.TemporaryDirectory(prefix="homelab-ssh-") as directory:
            yield self.suite, address, pinned_ssh_config(Path(directory), address, expect["user"], key.out)

