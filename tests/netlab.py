"""A test network inside this machine: a bridge and network namespaces acting as the site's zones.

    hlT-lan 10.99.0.50 ─┐
    hlT-mon 10.99.0.120 ┼─ bridge hlbrT ─ the VM's second NIC (10.99.0.101 / .111)
    hlT-dmz 10.99.0.111 ┤
    hlT-gw  10.99.0.1  ─┘ (router) ─ hlT-wan 10.99.9.10, hlT-vpn 10.99.8.6

T is a tag unique to the test process (its PID in hex), so two test runs (say a VM suite and a host test in
another checkout) never share or delete each other's namespaces.

The addresses are the test site's (tests/fixtures/site/test-site.yaml), never a real LAN. The bridge has no
address and the namespaces no route but each other, so no packet leaves: the host's own namespace cannot reach
the bridge, and the bridge skips the host's netfilter (nf_call_iptables 0), so the host firewall plays no part.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

Outcome = Literal["open", "refused", "filtered"]

# A TCP connect from inside a namespace: open (connected), refused (RST: let through, nothing listening) or
# filtered (no answer: dropped).
PROBE = """
import socket, sys
s = socket.socket(); s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print("open")
except ConnectionRefusedError:
    print("refused")
except OSError:
    print("filtered")
"""


@dataclass(frozen=True)
class Client:
    zone: str
    namespace: str
    address: str  # with prefix
    gateway: str
    behind_router: bool  # on its own network behind hl-gw, not on the bridge

    @property
    def ip(self) -> str:
        return str(ipaddress.IPv4Interface(self.address).ip)


CLIENTS = (
    Client("lan", "lan", "10.99.0.50/24", "10.99.0.1", False),
    Client("monitoring", "mon", "10.99.0.120/24", "10.99.0.1", False),
    Client("dmz", "dmz", "10.99.0.111/24", "10.99.0.1", False),
    Client("wan", "wan", "10.99.9.10/24", "10.99.9.1", True),
    Client("vpn", "vpn", "10.99.8.6/24", "10.99.8.1", True),
)
ROUTER_ADDRESS = "10.99.0.1/24"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


def ns(namespace: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", namespace, *argv, check=check)


class ZoneNetwork:
    """The bridge, the router and the clients; `without` leaves out clients whose address a VM takes."""

    def __init__(self, without: tuple[str, ...] = ()) -> None:
        self.tag = f"{os.getpid() & 0xFFFF:04x}"
        self.bridge = f"hlbr{self.tag}"
        self.router = self.namespace("gw")
        self.clients = [dataclasses.replace(c, namespace=self.namespace(c.namespace))
                        for c in CLIENTS if c.zone not in without]
        # Namespaces a test adds (e.g. an emulated VM), removed with the network.
        self.extra_namespaces: list[str] = []

    def namespace(self, short: str) -> str:
        """A namespace name of this run (the tag keeps runs apart)."""
        return f"hl{self.tag}-{short}"

    def bridge_port(self, namespace: str) -> str:
        """The host end of a namespace's veth on the bridge (at most 15 characters)."""
        return f"v{namespace}"[:15]

    def __enter__(self) -> ZoneNetwork:
        self.remove()
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _create(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge", "nf_call_iptables", "0", "nf_call_ip6tables", "0",
           "nf_call_arptables", "0")
        sh("sysctl", "-qw", f"net.ipv6.conf.{self.bridge}.disable_ipv6=1")
        sh("ip", "link", "set", self.bridge, "up")
        self._namespace(self.router)
        ns(self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.attach(self.router, "gw0", ROUTER_ADDRESS)
        for client in self.clients:
            self._namespace(client.namespace)
            if client.behind_router:
                self._behind_router(client)
            else:
                self.attach(client.namespace, "eth0", client.address)
            ns(client.namespace, "ip", "route", "add", "default", "via", client.gateway)

    @staticmethod
    def _namespace(name: str) -> None:
        sh("ip", "netns", "add", name)
        ns(name, "ip", "link", "set", "lo", "up")

    def attach(self, namespace: str, ifname: str, address: str) -> None:
        """Put `namespace` on the bridge as `ifname` with `address`."""
        host_end = self.bridge_port(namespace)
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ifname, "netns", namespace)
        sh("ip", "link", "set", host_end, "master", self.bridge, "up")
        ns(namespace, "ip", "addr", "add", address, "dev", ifname)
        ns(namespace, "ip", "link", "set", ifname, "up")

    def _behind_router(self, client: Client) -> None:
        router_end = f"r{client.zone}"[:15]
        sh("ip", "link", "add", router_end, "netns", self.router, "type", "veth", "peer", "name", "eth0",
           "netns", client.namespace)
        network = ipaddress.IPv4Interface(client.address).network
        ns(self.router, "ip", "addr", "add", f"{client.gateway}/{network.prefixlen}", "dev", router_end)
        ns(self.router, "ip", "link", "set", router_end, "up")
        ns(client.namespace, "ip", "addr", "add", client.address, "dev", "eth0")
        ns(client.namespace, "ip", "link", "set", "eth0", "up")

    def remove(self) -> None:
        """Delete this run's namespaces (their veths go with them) and bridge; another run's are not touched."""
        for name in (self.router, *(self.namespace(c.namespace) for c in CLIENTS), *self.extra_namespaces):
            sh("ip", "netns", "del", name, check=False)
            sh("ip", "link", "del", self.bridge_port(name), check=False)
        sh("ip", "link", "del", self.bridge, check=False)

    def probe(self, client: Client, address: str, port: int, timeout: float = 3.0) -> Outcome:
        out = ns(client.namespace, "python3", "-c", PROBE, address, str(port), str(timeout)).stdout.strip()
        assert out in ("open", "refused", "filtered"), out
        return out  # type: ignore[return-value]

    def probe_all(self, address: str, ports: list[int], timeout: float = 3.0) -> dict[tuple[str, int], Outcome]:
        """Every (client zone, port) pair, in parallel (dropped probes each wait out the timeout)."""
        pairs = [(client, port) for client in self.clients for port in ports]
        with ThreadPoolExecutor(max_workers=16) as pool:
            outcomes = list(pool.map(lambda pair: self.probe(pair[0], address, pair[1], timeout), pairs))
        return {(client.zone, port): outcome for (client, port), outcome in zip(pairs, outcomes, strict=True)}
