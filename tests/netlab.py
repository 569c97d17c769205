"""A test network inside this machine: a bridge and network namespaces acting as the site's zones.

    hl-lan 10.99.0.50 ─┐
    hl-mon 10.99.0.120 ┼─ bridge hlfw0 ─ the VM's second NIC (10.99.0.101 / .111)
    hl-dmz 10.99.0.111 ┤
    hl-gw  10.99.0.1  ─┘ (router) ─ hl-wan 10.99.9.10, hl-vpn 10.99.8.6

The addresses are the test site's (tests/fixtures/site/test-site.yaml), never a real LAN. The bridge has no
address and the namespaces no route but each other, so no packet leaves: the host's own namespace cannot reach
the bridge, and the bridge skips the host's netfilter (nf_call_iptables 0), so the host firewall plays no part.
"""

from __future__ import annotations

import ipaddress
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

BRIDGE = "hlfw0"
ROUTER = "hl-gw"
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
    Client("lan", "hl-lan", "10.99.0.50/24", "10.99.0.1", False),
    Client("monitoring", "hl-mon", "10.99.0.120/24", "10.99.0.1", False),
    Client("dmz", "hl-dmz", "10.99.0.111/24", "10.99.0.1", False),
    Client("wan", "hl-wan", "10.99.9.10/24", "10.99.9.1", True),
    Client("vpn", "hl-vpn", "10.99.8.6/24", "10.99.8.1", True),
)
ROUTER_ADDRESS = "10.99.0.1/24"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


def ns(namespace: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", namespace, *argv, check=check)


class ZoneNetwork:
    """The bridge, the router and the clients; `without` leaves out clients whose address a VM takes."""

    def __init__(self, without: tuple[str, ...] = ()) -> None:
        self.clients = [c for c in CLIENTS if c.zone not in without]

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
        sh("ip", "link", "add", BRIDGE, "type", "bridge", "nf_call_iptables", "0", "nf_call_ip6tables", "0",
           "nf_call_arptables", "0")
        sh("sysctl", "-qw", f"net.ipv6.conf.{BRIDGE}.disable_ipv6=1")
        sh("ip", "link", "set", BRIDGE, "up")
        self._namespace(ROUTER)
        ns(ROUTER, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self._on_bridge(ROUTER, "gw0", ROUTER_ADDRESS)
        for client in self.clients:
            self._namespace(client.namespace)
            if client.behind_router:
                self._behind_router(client)
            else:
                self._on_bridge(client.namespace, "eth0", client.address)
            ns(client.namespace, "ip", "route", "add", "default", "via", client.gateway)

    @staticmethod
    def _namespace(name: str) -> None:
        sh("ip", "netns", "add", name)
        ns(name, "ip", "link", "set", "lo", "up")

    @staticmethod
    def _on_bridge(namespace: str, ifname: str, address: str) -> None:
        host_end = f"v{namespace}"[:15]
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ifname, "netns", namespace)
        sh("ip", "link", "set", host_end, "master", BRIDGE, "up")
        ns(namespace, "ip", "addr", "add", address, "dev", ifname)
        ns(namespace, "ip", "link", "set", ifname, "up")

    @staticmethod
    def _behind_router(client: Client) -> None:
        router_end = f"r{client.zone}"[:15]
        sh("ip", "link", "add", router_end, "netns", ROUTER, "type", "veth", "peer", "name", "eth0",
           "netns", client.namespace)
        network = ipaddress.IPv4Interface(client.address).network
        ns(ROUTER, "ip", "addr", "add", f"{client.gateway}/{network.prefixlen}", "dev", router_end)
        ns(ROUTER, "ip", "link", "set", router_end, "up")
        ns(client.namespace, "ip", "addr", "add", client.address, "dev", "eth0")
        ns(client.namespace, "ip", "link", "set", "eth0", "up")

    def remove(self) -> None:
        for name in (ROUTER, *(c.namespace for c in CLIENTS)):
            sh("ip", "netns", "del", name, check=False)
            sh("ip", "link", "del", f"v{name}"[:15], check=False)
        sh("ip", "link", "del", BRIDGE, check=False)

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
