"""A throwaway OpenVPN PKI made with openssl: a CA, a server certificate (serverAuth) and a client one (clientAuth),
EC P-256 keys (fast), valid for two days, plus a tls-crypt key. For tests only: the host test makes a fresh one;
tests/fixtures/vpn/test-vpn-secrets.yaml holds one made by `python -m tests.pki` for the unit tests (which may
not start processes).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
EXTENSIONS = {
    "server": "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyAgreement\n"
              "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:vpn.test.home.arpa\n",
    "client": "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyAgreement\n"
              "extendedKeyUsage=clientAuth\n",
}


def _run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True, timeout=30)


def make_pki(directory: Path) -> dict[str, Path]:
    """ca.crt, server.crt/.key, client.crt/.key and tls-crypt.key in `directory`; returns them by name."""
    ca_key, ca = directory / "ca.key", directory / "ca.crt"
    _run("openssl", "req", "-x509", *KEY, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=homelab test CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, extensions in EXTENSIONS.items():
        csr, ext = directory / f"{name}.csr", directory / f"{name}.ext"
        ext.write_text(extensions)
        _run("openssl", "req", "-new", *KEY, "-keyout", directory / f"{name}.key", "-out", csr,
             "-subj", f"/CN=homelab test {name}")
        _run("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
             "-extfile", ext, "-out", directory / f"{name}.crt")
    _run("openvpn", "--genkey", "tls-crypt", directory / "tls-crypt.key")
    names = ("ca.crt", "server.crt", "server.key", "client.crt", "client.key", "tls-crypt.key")
    return {name: directory / name for name in names}


def secrets_yaml(pki: dict[str, Path]) -> str:
    """The extranet's VPN secrets as a secrets file section (block scalars keep the PEM lines)."""
    lines = ["extranet:"]
    for secret, name in (("VPN_CA_CERT", "ca.crt"), ("VPN_SERVER_CERT", "server.crt"),
                         ("VPN_SERVER_KEY", "server.key"), ("VPN_TLS_CRYPT_KEY", "tls-crypt.key")):
        lines.append(f"  {secret}: |")
        lines.extend(f"    {line}" if line else "" for line in pki[name].read_text().splitlines())
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        sys.stdout.write(secrets_yaml(make_pki(Path(tmp))))
