"""OpenVPN on the extranet: its PEM secrets reach the VM as their own files, checked by kind; the site's tunnel and
LAN become the server's include file; the baked config, the unit's condition and the paths agree.

The PKI is a throwaway one in tests/fixtures/vpn/test-vpn-secrets.yaml (made by `python -m tests.pki`).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.cloudinit import render_seed
from builder.definition import load_role
from builder.errors import DefinitionError
from builder.site import Site, load_secrets, load_site
from builder.vpn import (
    INTERFACE,
    KEY_PATH,
    PEM_SECRET_NAMES,
    PEM_SECRETS,
    SERVER_CONF,
    SITE_CONF,
    client_profile,
    site_conf,
)
from tests.conftest import FIXTURES, PROJECT

STACK_SECRETS = load_secrets(FIXTURES / "site" / "test-secrets.yaml")
VPN_SECRETS = load_secrets(FIXTURES / "vpn" / "test-vpn-secrets.yaml")["extranet"]
EXTRANET = PROJECT / "images" / "extranet.yaml"
BAKED_CONF = PROJECT / "images" / "files" / "extranet" / "openvpn-homelab.conf"
DROP_IN = PROJECT / "images" / "files" / "extranet" / "openvpn-server@homelab.service.d" / "homelab.conf"


@pytest.fixture
def site() -> Site:
    return load_site(FIXTURES / "site" / "test-site.yaml")


def with_vpn(vpn: dict[str, str] | None = None, role: str = "extranet") -> dict[str, dict[str, str]]:
    secrets = {section: dict(values) for section, values in STACK_SECRETS.items()}
    secrets.setdefault(role, {}).update(VPN_SECRETS if vpn is None else vpn)
    return secrets


def written(site: Site, secrets: dict[str, dict[str, str]], role: str = "extranet") -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(render_seed(PROJECT, role, site, secrets).user_data)
    return {entry["path"]: entry for entry in data["write_files"]}


def test_the_pem_secrets_load_multi_line_and_others_still_may_not() -> None:
    assert set(VPN_SECRETS) == set(PEM_SECRET_NAMES)
    assert all(value.count("\n") > 3 for value in VPN_SECRETS.values())


def test_each_pem_secret_is_its_own_private_file_never_an_env_line(site: Site) -> None:
    files = written(site, with_vpn())
    for secret in PEM_SECRETS:
        entry = files[secret.path]
        assert (entry["owner"], entry["permissions"]) == ("root:root", "0600")
        assert entry["content"] == VPN_SECRETS[secret.name].strip() + "\n"
    env = files["/etc/homelab/secrets.env"]["content"]
    assert not any(name in env for name in PEM_SECRET_NAMES)
    assert "BEGIN" not in env


def test_the_site_include_holds_the_tunnel_and_the_lan_route(site: Site) -> None:
    entry = written(site, with_vpn())[SITE_CONF]
    assert entry["permissions"] == "0644"
    lines = [line for line in entry["content"].splitlines() if not line.startswith("#")]
    assert lines == ["server 10.99.8.0 255.255.255.0", 'push "route 10.99.0.0 255.255.255.0"']


def test_without_vpn_secrets_nothing_of_openvpn_is_written(site: Site) -> None:
    files = written(site, with_vpn({}))
    assert not [path for path in files if path.startswith("/etc/openvpn/")]


@pytest.mark.parametrize("missing", PEM_SECRET_NAMES)
def test_a_missing_vpn_secret_is_one_line_naming_it(site: Site, missing: str) -> None:
    vpn = {name: value for name, value in VPN_SECRETS.items() if name != missing}
    with pytest.raises(DefinitionError, match=rf"^secrets: extranet\.{missing}: missing: OpenVPN needs all of") as e:
        render_seed(PROJECT, "extranet", site, with_vpn(vpn))
    assert "\n" not in str(e.value)




def _truncated(text: str) -> str:
    """The first line of the body loses its last 4 characters (a bad copy and paste)."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("-----BEGIN")) + 1
    return "\n".join([*lines[:first], lines[first][:-4], *lines[first + 1:]]) + "\n"


BAD = [
    ("VPN_SERVER_KEY", VPN_SECRETS["VPN_CA_CERT"], "expected an unencrypted PEM private key, got a PEM CERTIFICATE"),
    ("VPN_SERVER_KEY", VPN_SECRETS["VPN_SERVER_KEY"].replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY"),
     "expected an unencrypted PEM private key, got a PEM ENCRYPTED PRIVATE KEY"),
    ("VPN_SERVER_KEY", VPN_SECRETS["VPN_SERVER_KEY"] * 2, "expected one PEM block, got 2"),
    ("VPN_CA_CERT", VPN_SECRETS["VPN_SERVER_KEY"], "expected a PEM certificate (the CA), got a PEM PRIVATE KEY"),
    ("VPN_CA_CERT", "not a certificate at all", "expected a PEM certificate (the CA): -----BEGIN CERTIFICATE-----"),
    ("VPN_SERVER_CERT", VPN_SECRETS["VPN_SERVER_CERT"].replace("-----END CERTIFICATE-----", ""),
     "expected a PEM certificate (the server's)"),
    ("VPN_SERVER_CERT", VPN_SECRETS["VPN_SERVER_CERT"].replace("M", "*", 1), "the PEM body is not base64"),
    ("VPN_TLS_CRYPT_KEY", _truncated(VPN_SECRETS["VPN_TLS_CRYPT_KEY"]), "the key is not 256 bytes of hex"),
    ("VPN_TLS_CRYPT_KEY", VPN_SECRETS["VPN_CA_CERT"], "expected an OpenVPN static key"),
]


@pytest.mark.parametrize(("name", "value", "problem"), BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_a_bad_pem_secret_is_refused_by_kind_never_quoting_it(site: Site, name: str, value: str,
                                                                problem: str) -> None:
    with pytest.raises(DefinitionError) as caught:
        render_seed(PROJECT, "extranet", site, with_vpn({**VPN_SECRETS, name: value}))
    message = str(caught.value)
    assert message.startswith(f"secrets: extranet.{name}: ") and problem in message
    assert "\n" not in message
    body = [line for line in value.splitlines() if line and not line.startswith("-----")]
    assert not any(line in message for line in body if len(line) > 8)


def test_the_pem_secrets_of_a_role_that_does_not_route_the_vpn_are_refused(site: Site) -> None:
    with pytest.raises(DefinitionError, match=r"secrets: intranet\.VPN_CA_CERT: intranet does not serve OpenVPN"):
        render_seed(PROJECT, "intranet", site, with_vpn(role="intranet"))


@pytest.mark.parametrize(("zones", "error"), [
    ({"vpn": ("10.8.0.0/24", "10.9.0.0/24"), "lan": ("192.168.1.0/24",)}, "zones.vpn: OpenVPN's tunnel is one network"),
    ({"lan": ("192.168.1.0/24",)}, "zones.vpn: OpenVPN's tunnel is one network, the site gives 0 (none)"),
    ({"vpn": ("10.8.0.0/30",), "lan": ("192.168.1.0/24",)}, "zones.vpn: 10.8.0.0/30 is too small"),
    ({"vpn": ("10.8.0.0/24",)}, "zones.lan: missing"),
])
def test_the_site_must_give_one_tunnel_and_a_lan(site: Site, zones: dict[str, tuple[str, ...]], error: str) -> None:
    with pytest.raises(DefinitionError, match=re.escape(error)):
        site_conf(dataclasses.replace(site, zones=zones))


def test_several_lan_networks_are_each_pushed(site: Site) -> None:
    zones = {"vpn": ("10.8.0.0/24",), "lan": ("192.168.1.0/24", "192.168.2.0/23")}
    text = site_conf(dataclasses.replace(site, zones=zones))
    assert text.splitlines()[2:] == ["server 10.8.0.0 255.255.255.0", 'push "route 192.168.1.0 255.255.255.0"',
                                     'push "route 192.168.2.0 255.255.254.0"']


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";")):
            key, _, rest = line.strip().partition(" ")
            out.setdefault(key, []).append(rest)
    return out


def test_the_baked_server_config_is_the_issues() -> None:
    conf = _directives(BAKED_CONF.read_text())
    assert conf["proto"] == ["udp"] and conf["port"] == ["1194"]
    assert conf["dev"] == [INTERFACE] and conf["topology"] == ["subnet"]
    assert conf["config"] == [SITE_CONF]
    assert "server" not in conf, "the tunnel network is a site fact (homelab-site.conf)"
    assert conf["data-ciphers"] == ["AES-256-GCM:CHACHA20-POLY1305"]
    assert conf["dh"] == ["none"]
    assert conf["user"] == ["nobody"] and conf["group"] == ["nogroup"]
    assert {"persist-key", "persist-tun"} <= set(conf)
    assert conf["keepalive"] == ["10 60"]
    assert conf["verify-client-cert"] == ["require"]
    assert "log" not in conf and "log-append" not in conf, "the log goes to the journal"
    # The files it reads are exactly those cloud-init writes.
    paths = {s.name: s.path for s in PEM_SECRETS}
    assert conf["ca"] == [paths["VPN_CA_CERT"]] and conf["cert"] == [paths["VPN_SERVER_CERT"]]
    assert conf["key"] == [paths["VPN_SERVER_KEY"]] and conf["tls-crypt"] == [paths["VPN_TLS_CRYPT_KEY"]]


def test_the_extranet_bakes_the_config_condition_and_forwarding() -> None:
    definition = load_role(PROJECT, "extranet")
    files = {entry["dest"]: entry["src"] for entry in definition["files"]}
    assert files[SERVER_CONF] == "images/files/extranet/openvpn-homelab.conf"
    assert Path(PROJECT / files["/etc/systemd/system/openvpn-server@homelab.service.d/homelab.conf"]) == DROP_IN
    sysctl = PROJECT / files["/etc/sysctl.d/60-homelab-forward.conf"]
    assert "net.ipv4.ip_forward = 1" in sysctl.read_text().splitlines()
    assert "openvpn-server@homelab.service" in definition["units"]
    assert "openvpn" in definition["packages"]
    # openvpn-server@.service runs `--config homelab.conf` from SERVER_DIR: the instance name is the file's.
    assert SERVER_CONF.endswith("/homelab.conf")


def test_the_unit_is_skipped_not_failed_without_its_key() -> None:
    lines = DROP_IN.read_text().splitlines()
    assert f"ConditionPathExists={KEY_PATH}" in lines
    assert f"ConditionPathExists={SITE_CONF}" in lines
    assert not any(line.startswith("AssertPathExists") for line in lines)


def test_the_readme_client_profile_is_the_one_the_host_test_connects_with() -> None:
    readme = (PROJECT / "README.md").read_text()
    assert "\n" + client_profile("vpn.example.org") + "<ca>\n" in readme
