"""OpenVPN on a role that routes the VPN (`vpn_gateway: true`): its PKI arrives as secrets, its site facts at boot.

The server's configuration is baked (images/files/extranet/openvpn-homelab.conf); what is per host is written by
cloud-init under SERVER_DIR: the PEM secrets, each as its own root-only file (a PEM is multi-line, so it can never
be a KEY=value line of an env file), and SITE_CONF, the tunnel network (zones.vpn) and the LAN route pushed to
clients (zones.lan), which the baked file reads with `config`. No VPN secret at all means no VPN: nothing is
written and the unit's ConditionPathExists skips it.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import DefinitionError

if TYPE_CHECKING:
    from .site import Site

SERVER_DIR = "/etc/openvpn/server"
# The baked server config (openvpn-server@homelab.service reads <instance>.conf from SERVER_DIR).
SERVER_CONF = f"{SERVER_DIR}/homelab.conf"
SITE_CONF = f"{SERVER_DIR}/homelab-site.conf"
# The tunnel interface: fixed (`dev tun0`) so that the firewall can name it.
INTERFACE = "tun0"


@dataclass(frozen=True)
class PemSecret:
    """A secret holding PEM blocks, written by cloud-init to `path` (root:root 0600)."""

    name: str
    path: str
    labels: tuple[str, ...]  # accepted BEGIN/END labels
    what: str
    # A bundle (a CA chain) may hold several blocks; a key exactly one.
    several: bool = False
    # The block's body: base64 for X.509 and keys, hex for OpenVPN's static keys.
    hex_body: bool = False


PEM_SECRETS: tuple[PemSecret, ...] = (
    PemSecret("VPN_CA_CERT", f"{SERVER_DIR}/ca.crt", ("CERTIFICATE",), "a PEM certificate (the CA)", several=True),
    PemSecret("VPN_SERVER_CERT", f"{SERVER_DIR}/server.crt", ("CERTIFICATE",), "a PEM certificate (the server's)",
              several=True),
    # An encrypted key ("ENCRYPTED PRIVATE KEY") is refused: OpenVPN would wait for its passphrase at boot.
    PemSecret("VPN_SERVER_KEY", f"{SERVER_DIR}/server.key", ("PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"),
              "an unencrypted PEM private key"),
    PemSecret("VPN_TLS_CRYPT_KEY", f"{SERVER_DIR}/tls-crypt.key", ("OpenVPN Static key V1",),
              "an OpenVPN static key (openvpn --genkey tls-crypt)", hex_body=True),
)
PEM_SECRET_NAMES = tuple(secret.name for secret in PEM_SECRETS)
# The unit runs only once this file exists (drop-in ConditionPathExists): cloud-init writes all or nothing.
KEY_PATH = next(s.path for s in PEM_SECRETS if s.name == "VPN_SERVER_KEY")
# 2048-bit static key: 16 lines of 32 hex digits.
STATIC_KEY_BYTES = 256

_BLOCK = re.compile(r"-----BEGIN ([A-Za-z0-9 ]+)-----\n(.*?)\n?-----END \1-----(?:\n|$)", re.S)


def pem_problem(secret: PemSecret, value: str) -> str | None:
    """Why `value` is not what `secret` must hold (never quoting the value), or None."""
    # Comment lines around the blocks are kept and ignored (`openvpn --genkey` writes some before its key).
    lines = value.replace("\r\n", "\n").splitlines()
    text = "\n".join(line for line in lines if not line.startswith("#")).strip() + "\n"
    blocks = list(_BLOCK.finditer(text))
    if not blocks or "".join(b.group(0) for b in blocks).strip() != text.strip():
        return f"expected {secret.what}: -----BEGIN {secret.labels[0]}----- ... -----END {secret.labels[0]}-----"
    if len(blocks) > 1 and not secret.several:
        return f"expected one PEM block, got {len(blocks)}"
    for block in blocks:
        label = block.group(1)
        if label not in secret.labels:
            return f"expected {secret.what}, got a PEM {label}"
        problem = _body_problem(block.group(2), secret.hex_body)
        if problem:
            return f"{problem} (a truncated or mangled paste?)"
    return None


def _body_problem(body: str, hex_body: bool) -> str | None:
    lines = [line.strip() for line in body.splitlines() if line.strip() and not line.startswith("#")]
    data = "".join(lines)
    if hex_body:
        if not re.fullmatch(r"[0-9a-fA-F]*", data) or len(data) != 2 * STATIC_KEY_BYTES:
            return f"the key is not {STATIC_KEY_BYTES} bytes of hex"
        return None
    try:
        decoded = base64.b64decode(data, validate=True)
    except binascii.Error:
        return "the PEM body is not base64"
    if not decoded:
        return "the PEM body is empty"
    return None


def wanted(secrets: Mapping[str, str]) -> bool:
    """Whether the secrets configure OpenVPN: any VPN secret does (and then all must be there)."""
    return any(name in secrets for name in PEM_SECRET_NAMES)


def check_secrets(role: str, secrets: Mapping[str, str], gateway: bool, definition_name: str) -> None:
    """Raise DefinitionError (one line naming the secret) unless the VPN secrets are none, or all and valid."""
    present = [name for name in PEM_SECRET_NAMES if name in secrets]
    if not present:
        return
    if not gateway:
        raise DefinitionError(f"secrets: {role}.{present[0]}: {role} does not serve OpenVPN ({definition_name} "
                              "has no vpn_gateway: true): give the VPN secrets to the role that does")
    for secret in PEM_SECRETS:
        if secret.name not in secrets:
            raise DefinitionError(f"secrets: {role}.{secret.name}: missing: OpenVPN needs all of "
                                  f"{', '.join(PEM_SECRET_NAMES)} (given: {', '.join(present)})")
        problem = pem_problem(secret, secrets[secret.name])
        if problem:
            raise DefinitionError(f"secrets: {role}.{secret.name}: {problem}")


def _mask(network: ipaddress.IPv4Network) -> str:
    return f"{network.network_address} {network.netmask}"


def site_conf(site: Site) -> str:
    """The per-site lines of the server config: the tunnel network (zones.vpn) and the LAN routes (zones.lan)."""
    tunnels = site.zones.get("vpn", ())
    if len(tunnels) != 1:
        raise DefinitionError(f"{site.path}: zones.vpn: OpenVPN's tunnel is one network, the site gives "
                              f"{len(tunnels)} ({', '.join(tunnels) or 'none'})")
    tunnel = ipaddress.IPv4Network(tunnels[0])
    if tunnel.prefixlen > 29:
        raise DefinitionError(f"{site.path}: zones.vpn: {tunnel} is too small for a tunnel (at most /29)")
    lans = [ipaddress.IPv4Network(net) for net in site.zones.get("lan", ())]
    if not lans:
        raise DefinitionError(f"{site.path}: zones.lan: missing: OpenVPN pushes the route to the LAN from it")
    lines = [
        "# This site's tunnel network and the LAN routes pushed to clients (zones.vpn, zones.lan of the site file),",
        f"# rendered by homelab; read by {SERVER_CONF}.",
        f"server {_mask(tunnel)}",
        *[f'push "route {_mask(lan)}"' for lan in lans],
    ]
    return "\n".join(lines) + "\n"


def vpn_files(role: str, site: Site, secrets: Mapping[str, str], gateway: bool,
              definition_name: str) -> list[dict[str, str]]:
    """The write_files entries of OpenVPN: the PEM secrets (0600) and the site include; none without secrets."""
    check_secrets(role, secrets, gateway, definition_name)
    if not wanted(secrets):
        return []
    files = [{"path": s.path, "permissions": "0600", "content": _normalised(secrets[s.name])} for s in PEM_SECRETS]
    files.append({"path": SITE_CONF, "permissions": "0644", "content": site_conf(site)})
    return files


def _normalised(value: str) -> str:
    return value.replace("\r\n", "\n").strip() + "\n"


def client_profile(remote: str, port: int = 1194) -> str:
    """The lines of a client's .ovpn besides its inline <ca>, <cert>, <key> and <tls-crypt> (README)."""
    return "\n".join([
        "client", "dev tun", "proto udp", f"remote {remote} {port}", "nobind", "persist-key", "persist-tun",
        "remote-cert-tls server", "data-ciphers AES-256-GCM:CHACHA20-POLY1305", "verb 3",
    ]) + "\n"
