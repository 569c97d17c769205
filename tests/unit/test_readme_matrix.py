"""The README's firewall matrix is the definitions' matrix (the VM tests prove the definitions on booted VMs)."""

from __future__ import annotations

import re
from pathlib import Path

from builder.definition import known_roles, load_role

PROJECT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| (\w+) \| (\d+)/(tcp|udp) \| [^|]+ \| ([^|]+) \|$")


def readme_matrix() -> dict[tuple[str, int, str], list[str]]:
    text = (PROJECT / "README.md").read_text()
    block = text.split("<!-- firewall-matrix", 1)[1].split("<!-- /firewall-matrix -->", 1)[0]
    rows = {}
    for line in block.splitlines():
        match = ROW.match(line)
        if match:
            role, port, proto, zones = match.groups()
            rows[(role, int(port), proto)] = [] if zones.startswith("nobody") else zones.strip().split(", ")
    return rows


def test_readme_matrix_is_the_definitions_matrix() -> None:
    readme = readme_matrix()
    declared = {(role, e["port"], e["proto"]): list(e["from"])
                for role in known_roles(PROJECT) for e in load_role(PROJECT, role)["ports"]}
    assert {key: zones for key, zones in readme.items() if zones} == declared
    # The rows saying "nobody" name ports that no definition opens.
    assert all(key not in declared for key, zones in readme.items() if not zones)
    assert len(readme) >= len(declared) + 2
