"""The generated firewall: the ruleset follows the definition's matrix; zones come from the site, normalised."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from builder.definition import RESERVED_DESTINATIONS, RESERVED_TREES, load_role
from builder.errors import RenderError
from builder.firewall import RULESET_DEST, ZONES_DIR, ZONES_FILE, allowed, ruleset, zones_file
from builder.site import ZONES, load_site

PROJECT = Path(__file__).resolve().parents[2]
SITE = load_site(PROJECT / "tests" / "fixtures" / "site" / "test-site.yaml")


@pytest.mark.parametrize("role", ["intranet", "extranet"])
def test_each_chain_accepts_exactly_the_matrix(role: str) -> None:
    definition = load_role(PROJECT, role)
    text = ruleset(definition)
    expected = sorted((e["proto"], e["port"], zone) for e in definition["ports"] for zone in e["from"])
    host = re.findall(r"meta l4proto (\w+) th dport (\d+) ip saddr @zone_(\w+) accept", text)
    forwarded = re.findall(r"ct status dnat meta l4proto (\w+) ct original proto-dst (\d+) ip saddr @zone_(\w+) accept",
                           text)
    assert sorted((p, int(n), z) for p, n, z in host) == expected
    assert sorted((p, int(n), z) for p, n, z in forwarded) == expected
    assert text.count("policy drop;") == 2
    assert "flush ruleset" not in text  # Docker's tables must survive a reload
    assert f'include "{ZONES_DIR}/*.nft"' in text


def test_the_ruleset_never_opens_the_database_or_cache() -> None:
    text = ruleset(load_role(PROJECT, "intranet"))
    assert "5432" not in text and "6379" not in text


def test_zones_file_normalises_merges_and_deduplicates() -> None:
    text = zones_file({"lan": ["10.99.0.7/24", "10.99.0.0/24"], "wan": []}, {"lan": ["10.0.2.2"]})
    assert text.splitlines()[1:] == ["add element inet homelab zone_lan { 10.99.0.0/24, 10.0.2.2/32 }"]


def test_zones_file_names_a_bad_network() -> None:
    with pytest.raises(RenderError, match=r"zones\.vpn: '10\.8\.0\.0/33' is not an IPv4 network"):
        zones_file({"vpn": ["10.8.0.0/33"]})


def test_every_site_zone_has_a_set() -> None:
    text = ruleset(load_role(PROJECT, "extranet"))
    for zone in ZONES:
        assert f"set zone_{zone} {{ type ipv4_addr; flags interval; auto-merge; }}" in text


@pytest.mark.parametrize(("source", "port", "expected"), [
    ("10.99.0.50", 8096, True),    # LAN → Jellyfin
    ("10.99.9.10", 8096, False),   # WAN → Jellyfin
    ("10.99.0.50", 9090, False),   # LAN → Prometheus: monitoring only
    ("10.99.0.101", 9100, True),   # the scraper → node_exporter
    ("10.99.8.6", 22, True),       # VPN → ssh
    ("10.99.0.50", 5432, False),   # nobody → Postgres
])
def test_allowed_reads_the_matrix(source: str, port: int, expected: bool) -> None:
    assert allowed(load_role(PROJECT, "intranet"), SITE.zones, source, port) is expected


def test_the_firewall_files_are_reserved_from_definitions() -> None:
    assert RULESET_DEST in RESERVED_DESTINATIONS
    assert ZONES_FILE.startswith(RESERVED_TREES)


def test_the_vpn_gateway_forwards_its_clients_to_the_lan_and_masquerades_them() -> None:
    definition = load_role(PROJECT, "extranet")
    assert definition["vpn_gateway"] is True
    text = ruleset(definition)
    forward = text.split("chain forward {", 1)[1].split("}", 1)[0]
    assert 'iifname "tun0" ip saddr @zone_vpn ip daddr @zone_lan accept' in forward
    nat = text.split("chain postrouting {", 1)[1].split("}", 1)[0]
    assert "type nat hook postrouting priority srcnat; policy accept;" in nat
    assert 'ip saddr @zone_vpn oifname != "tun0" masquerade' in nat
    # Still one table, replaced whole: the NAT chain is inside it, Docker's NAT stays its own.
    assert text.count("table inet homelab {") == 1


def test_a_role_that_does_not_route_the_vpn_has_no_tunnel_rules() -> None:
    definition = load_role(PROJECT, "intranet")
    assert definition["vpn_gateway"] is False
    text = ruleset(definition)
    assert "tun0" not in text and "postrouting" not in text and "masquerade" not in text
