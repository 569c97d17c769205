"""Certificate pinning against a real TLS handshake: an in-process HTTPS server (a thread, no process)."""

from __future__ import annotations

import datetime
import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from builder import proxmox
from builder.errors import ProxmoxError
from builder.proxmox import Pve, Target, TlsPolicy, Token


def _self_signed(directory: Path) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pve.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, cert.public_bytes(serialization.Encoding.DER)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"data": {"version": "8.4.1", "release": "8.4"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(url, fingerprint) of a self-signed HTTPS server answering GET /version."""
    cert, key, der = _self_signed(tmp_path)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}", proxmox.format_fingerprint(der)
    finally:
        httpd.shutdown()
        httpd.server_close()


def _pve(url: str, tls: TlsPolicy) -> Pve:
    return Pve(Target(url, "pve", {"import": "local", "images": "local-zfs", "iso": "local"}, "vmbr0", tls,
                      Token("homelab@pve", "deploy", "secret")))


def test_the_pinned_certificate_is_accepted(server: tuple[str, str]) -> None:
    url, fingerprint = server
    assert _pve(url, TlsPolicy(fingerprint=fingerprint)).get("/version")["version"] == "8.4.1"


def test_another_certificate_is_refused_naming_both_fingerprints(server: tuple[str, str]) -> None:
    url, fingerprint = server
    pinned = "AB:" * 31 + "AB"
    with pytest.raises(ProxmoxError) as caught:
        _pve(url, TlsPolicy(fingerprint=pinned)).get("/version")
    assert str(caught.value) == (f"GET /version: the certificate of {url} is not the pinned proxmox.tls.fingerprint "
                                 f"{pinned} (it presents {fingerprint})")


def test_a_self_signed_certificate_is_refused_by_default(server: tuple[str, str]) -> None:
    url, _ = server
    with pytest.raises(ProxmoxError, match=r"^GET /version: the certificate of .* is not trusted .*: pin it with "
                                           r"proxmox.tls.fingerprint"):
        _pve(url, TlsPolicy()).get("/version")


@pytest.mark.filterwarnings("error")
def test_insecure_accepts_anything_quietly(server: tuple[str, str]) -> None:
    url, _ = server
    assert _pve(url, TlsPolicy(insecure=True)).get("/version")["version"] == "8.4.1"


def test_nobody_listening_is_one_line() -> None:
    with pytest.raises(ProxmoxError, match=r"^GET /version: cannot reach https://127.0.0.1:9 \("):
        _pve("https://127.0.0.1:9", TlsPolicy()).get("/version")
