"""The generated ruleset in a real kernel, without a VM: a namespace plays the VM, with Docker's kind of DNAT to a
"container" namespace behind an interface named like Docker's bridges, and the test network's clients probe
every (zone, port) pair. The VM tests prove the same matrix on the booted images; this proves the ruleset's
logic in seconds, including the reason it exists: a DNAT'ed (published) port is filtered on the forward hook.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from builder.definition import load_role
from builder.firewall import ZONES_DIR, allowed, ruleset, zones_file
from builder.site import load_site
from tests.netlab import ZoneNetwork, ns, sh

pytestmark = pytest.mark.host

PROJECT = Path(__file__).resolve().parents[2]
SITE = load_site(PROJECT / "tests" / "fixtures" / "site" / "test-site.yaml")
CONTAINER = "172.30.0.2"
LISTEN = """
import socket, sys, time
socks = []
for port in sys.argv[1:]:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port))); s.listen(64); socks.append(s)
print("listening", flush=True)
time.sleep(3600)
"""


def published_ports(role: str) -> list[int]:
    compose = yaml.safe_load((PROJECT / "compose" / role / "compose.yaml").read_text())
    return sorted(int(str(entry).split(":")[-2]) for service in compose["services"].values()
                  for entry in service.get("ports", []))


def _listen(namespace: str, ports: list[int]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(["ip", "netns", "exec", namespace, "python3", "-c", LISTEN, *map(str, ports)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
    return proc


def _emulated_vm(network: ZoneNetwork, role: str, tmp: Path) -> tuple[str, str]:
    """The VM's namespace: the site address on the bridge, a container behind `br-test`, Docker-style DNAT.
    Returns the VM's and the container's namespaces."""
    address = SITE.host(role).address
    vm_ns, container_ns = network.namespace("vm"), network.namespace("ctr")
    network.extra_namespaces += [vm_ns, container_ns]
    sh("ip", "netns", "add", vm_ns)
    ns(vm_ns, "ip", "link", "set", "lo", "up")
    network.attach(vm_ns, "eth1", address)
    ns(vm_ns, "ip", "route", "add", "default", "via", SITE.gateway)
    ns(vm_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    sh("ip", "netns", "add", container_ns)
    sh("ip", "link", "add", "br-test", "netns", vm_ns, "type", "veth", "peer", "name", "eth0", "netns", container_ns)
    ns(vm_ns, "ip", "addr", "add", "172.30.0.1/24", "dev", "br-test")
    ns(vm_ns, "ip", "link", "set", "br-test", "up")
    ns(container_ns, "ip", "addr", "add", f"{CONTAINER}/24", "dev", "eth0")
    ns(container_ns, "ip", "link", "set", "eth0", "up")
    ns(container_ns, "ip", "route", "add", "default", "via", "172.30.0.1")
    published = ",".join(map(str, published_ports(role)))
    docker_nat = ("table ip dockerish {\n  chain prerouting {\n    type nat hook prerouting priority dstnat;\n"
                  f"    iifname != \"br-test\" tcp dport {{ {published} }} dnat to {CONTAINER}\n  }}\n}}\n")
    zones = tmp / "firewall.d"
    zones.mkdir()
    (zones / "zones.nft").write_text(zones_file(SITE.zones))
    rules = tmp / "firewall.nft"
    rules.write_text(ruleset(load_role(PROJECT, role)).replace(ZONES_DIR, str(zones)))
    (tmp / "docker.nft").write_text(docker_nat)
    ns(vm_ns, "nft", "-f", str(rules))
    ns(vm_ns, "nft", "-f", str(tmp / "docker.nft"))
    return vm_ns, container_ns


@pytest.fixture(params=["intranet", "extranet"])
def role_vm(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    role: str = request.param
    # The DMZ client would take the extranet's own address.
    with ZoneNetwork(without=("dmz",) if role == "extranet" else ()) as network:
        request.node.network = network
        procs: list[subprocess.Popen[str]] = []
        try:
            vm_ns, container_ns = _emulated_vm(network, role, tmp_path)
            request.node.vm_ns = vm_ns
            ports = [e["port"] for e in load_role(PROJECT, role)["ports"] if e["proto"] == "tcp"]
            containers = published_ports(role)
            procs.append(_listen(vm_ns, [p for p in ports if p not in containers] + [5432, 6379]))
            procs.append(_listen(container_ns, [*containers, 5432, 6379]))
            yield role
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()


def test_the_matrix_holds_for_host_services_and_published_container_ports(
        role_vm: str, request: pytest.FixtureRequest) -> None:
    network: ZoneNetwork = request.node.network
    definition = load_role(PROJECT, role_vm)
    ports = sorted({e["port"] for e in definition["ports"] if e["proto"] == "tcp"} | {5432, 6379})
    address = SITE.host(role_vm).address.split("/")[0]
    got = network.probe_all(address, ports, timeout=2)
    expected = {(client.zone, port): "open" if allowed(definition, SITE.zones, client.ip, port) else "filtered"
                for client in network.clients for port in ports}
    assert got == expected
    # Not vacuous: each role has ports open to some zones and closed to others.
    assert "open" in got.values() and "filtered" in got.values()


def test_a_banned_address_is_dropped_on_the_forward_hook_too(role_vm: str, request: pytest.FixtureRequest) -> None:
    network: ZoneNetwork = request.node.network
    lan = next(c for c in network.clients if c.zone == "lan")
    port = published_ports(role_vm)[0]
    address = SITE.host(role_vm).address.split("/")[0]
    assert network.probe(lan, address, port) == "open"
    ns(request.node.vm_ns, "nft", "add", "element", "inet", "homelab", "banned", f"{{ {lan.ip} timeout 60s }}")
    assert network.probe(lan, address, port, timeout=2) == "filtered"
    assert network.probe(lan, address, 22, timeout=2) == "filtered"


def test_reloading_the_ruleset_keeps_other_tables(role_vm: str, tmp_path: Path, request: pytest.FixtureRequest
                                                  ) -> None:
    vm_ns = request.node.vm_ns
    # The table is replaced whole, never `flush ruleset`: Docker's NAT survives a reload, and a reload twice in a
    # row (the boot loads it before and after cloud-init) works.
    before = ns(vm_ns, "nft", "list", "table", "ip", "dockerish").stdout
    ns(vm_ns, "nft", "-f", str(tmp_path / "firewall.nft"))
    ns(vm_ns, "nft", "-f", str(tmp_path / "firewall.nft"))
    assert ns(vm_ns, "nft", "list", "table", "ip", "dockerish").stdout == before
    zone = ns(vm_ns, "nft", "list", "set", "inet", "homelab", "zone_lan").stdout
    assert "10.99.0.0/24" in zone
