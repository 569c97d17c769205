"""A real OpenVPN server and client in network namespaces, without a VM: the server runs the extranet's baked config
with the files cloud-init would write (a fresh throwaway PKI as its secrets, the test site's tunnel and LAN), behind
the extranet's generated firewall; a client on the WAN side connects and reaches a LAN host through the tunnel, and
the LAN host sees the server's LAN address (masquerade: it has no route back to the tunnel).

    vpnt-cli 10.99.9.10 ── vpnt-srv 10.99.9.1 | tun0 10.99.8.1 | 10.99.0.111 ── vpnt-lan 10.99.0.50 (no default route)

Namespaces and links are all named vpnt-* and removed in the end; nothing touches the host's own network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.definition import load_role
from builder.firewall import ZONES_DIR, ruleset, zones_file
from builder.site import load_site
from builder.vpn import SERVER_CONF, SERVER_DIR, client_profile, vpn_files
from tests.netlab import ns, sh
from tests.pki import make_pki

pytestmark = pytest.mark.host

PROJECT = Path(__file__).resolve().parents[2]
SITE = load_site(PROJECT / "tests" / "fixtures" / "site" / "test-site.yaml")
BAKED = PROJECT / "images" / "files" / "extranet"
SERVER, CLIENT, LAN = "vpnt-srv", "vpnt-cli", "vpnt-lan"
SERVER_WAN, CLIENT_WAN = "10.99.9.1", "10.99.9.10"  # in the test site's zones.wan
SERVER_LAN = SITE.host("extranet").address  # 10.99.0.111/24
LAN_HOST, LAN_PORT = "10.99.0.50", 8080
SECRETS_FILES = {"VPN_CA_CERT": "ca.crt", "VPN_SERVER_CERT": "server.crt", "VPN_SERVER_KEY": "server.key",
                 "VPN_TLS_CRYPT_KEY": "tls-crypt.key"}
# The LAN host: accepts connections and prints each peer's address.
WHO_CALLS = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)
print("listening", flush=True)
while True:
    conn, peer = s.accept(); print(peer[0], flush=True); conn.close()
"""
CONNECT = """
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close(); print("connected")
"""

needs = [tool for tool in ("openvpn", "openssl", "nft") if shutil.which(tool) is None]
if needs or os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
    pytest.skip(f"needs root, /dev/net/tun and {', '.join(needs) or 'openvpn, openssl, nft'}",
                allow_module_level=True)


def _remove() -> None:
    for name in (SERVER, CLIENT, LAN):
        sh("ip", "netns", "del", name, check=False)


def _link(a: str, a_if: str, a_addr: str, b: str, b_if: str, b_addr: str) -> None:
    sh("ip", "link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b)
    for name, ifname, address in ((a, a_if, a_addr), (b, b_if, b_addr)):
        ns(name, "ip", "addr", "add", address, "dev", ifname)
        ns(name, "ip", "link", "set", ifname, "up")


def _network() -> None:
    for name in (SERVER, CLIENT, LAN):
        sh("ip", "netns", "add", name)
        ns(name, "ip", "link", "set", "lo", "up")
    _link(SERVER, "vpnt-wan", f"{SERVER_WAN}/24", CLIENT, "vpnt-c0", f"{CLIENT_WAN}/24")
    _link(SERVER, "vpnt-lan", SERVER_LAN, LAN, "vpnt-h0", f"{LAN_HOST}/24")
    # Forwarding as the image bakes it (not a value of the test's own).
    ns(SERVER, "sysctl", "-q", "-p", str(BAKED / "60-homelab-forward.conf"))


def _firewall(tmp: Path) -> None:
    zones = tmp / "firewall.d"
    zones.mkdir()
    (zones / "zones.nft").write_text(zones_file(SITE.zones))
    rules = tmp / "firewall.nft"
    rules.write_text(ruleset(load_role(PROJECT, "extranet")).replace(ZONES_DIR, str(zones)))
    ns(SERVER, "nft", "-f", str(rules))


def _server_dir(tmp: Path, pki: dict[str, Path]) -> Path:
    """SERVER_DIR as the VM has it: the baked config, and the files cloud-init writes, with paths moved to tmp."""
    server = tmp / "server"
    server.mkdir()
    secrets = {name: pki[file].read_text() for name, file in SECRETS_FILES.items()}
    for entry in vpn_files("extranet", SITE, secrets, True, "images/extranet.yaml"):
        path = Path(entry["path"].replace(SERVER_DIR, str(server)))
        path.write_text(entry["content"])
        path.chmod(int(entry["permissions"], 8))
    conf = (BAKED / "openvpn-homelab.conf").read_text().replace(SERVER_DIR, str(server))
    (server / Path(SERVER_CONF).name).write_text(conf)
    return server


def _client_conf(tmp: Path, pki: dict[str, Path]) -> Path:
    lines = [client_profile(SERVER_WAN)]
    lines += [f"{key} {pki[name]}\n" for key, name in
              (("ca", "ca.crt"), ("cert", "client.crt"), ("key", "client.key"), ("tls-crypt", "tls-crypt.key"))]
    path = tmp / "client.conf"
    path.write_text("".join(lines))
    return path


def _openvpn(namespace: str, log: Path, *argv: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(["ip", "netns", "exec", namespace, "openvpn", *argv], stdout=out,
                                stderr=subprocess.STDOUT, cwd=cwd)


def _wait_for(log: Path, text: str, procs: list[subprocess.Popen[bytes]], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if any(proc.poll() is not None for proc in procs):
            break
        time.sleep(0.2)
    pytest.fail(f"no {text!r} in {log.name}:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture
def tunnel(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """The three namespaces, the firewall, the LAN host's listener, the server and a connected client."""
    procs: list[subprocess.Popen[bytes]] = []
    lan_host: subprocess.Popen[str] | None = None
    _remove()
    try:
        _network()
        _firewall(tmp_path)
        pki_dir = tmp_path / "pki"
        pki_dir.mkdir()
        pki = make_pki(pki_dir)
        server = _server_dir(tmp_path, pki)
        lan_host = subprocess.Popen(["ip", "netns", "exec", LAN, "python3", "-c", WHO_CALLS, LAN_HOST,
                                     str(LAN_PORT)], stdout=subprocess.PIPE, text=True)
        assert lan_host.stdout is not None and lan_host.stdout.readline().strip() == "listening"
        # The arguments openvpn-server@.service gives (Debian's unit), from the unit's working directory.
        procs.append(_openvpn(SERVER, tmp_path / "server.log", "--status", str(tmp_path / "status.log"),
                              "--status-version", "2", "--suppress-timestamps", "--config",
                              Path(SERVER_CONF).name, cwd=server))
        _wait_for(tmp_path / "server.log", "Initialization Sequence Completed", procs)
        procs.append(_openvpn(CLIENT, tmp_path / "client.log", "--config", str(_client_conf(tmp_path, pki))))
        _wait_for(tmp_path / "client.log", "Initialization Sequence Completed", procs)
        yield lan_host
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        if lan_host is not None:
            lan_host.kill()
            lan_host.wait()
        _remove()


def test_a_client_reaches_the_lan_through_the_tunnel_masqueraded(tunnel: subprocess.Popen[str]) -> None:
    # The client got an address of the site's tunnel network and the pushed LAN route.
    address = ns(CLIENT, "ip", "-4", "-o", "addr", "show", "dev", "tun0").stdout
    assert " 10.99.8." in address, address
    route = ns(CLIENT, "ip", "-4", "route", "get", LAN_HOST).stdout
    assert "dev tun0" in route, route
    assert ns(CLIENT, "python3", "-c", CONNECT, LAN_HOST, str(LAN_PORT)).stdout.strip() == "connected"
    assert tunnel.stdout is not None
    # The LAN host saw the server's LAN address, not the tunnel's: it has no route to 10.99.8.0/24 at all.
    assert tunnel.stdout.readline().strip() == SERVER_LAN.split("/")[0]


def test_the_tunnel_forwards_to_the_lan_only(tunnel: subprocess.Popen[str]) -> None:
    # The WAN side itself is not routed to the LAN: only the tunnel's clients are (forward chain). Both ends get
    # routes through the server, so that only its firewall can stop the connection.
    ns(CLIENT, "ip", "route", "replace", f"{LAN_HOST}/32", "via", SERVER_WAN, "dev", "vpnt-c0")
    ns(LAN, "ip", "route", "add", f"{CLIENT_WAN}/32", "via", SERVER_LAN.split("/")[0])
    outcome = ns(CLIENT, "python3", "-c", CONNECT, LAN_HOST, str(LAN_PORT), check=False)
    assert outcome.returncode != 0 and "connected" not in outcome.stdout
