"""Site and secrets files, driven by tests/fixtures/site/<case>.yaml + <case>.json.

A case's JSON says which loader reads it ("load": "site" or "secrets") and holds either {"error": "<substring of
the one-line error>"}, which must name file:line and key, or {"result": ...}: the site's validated values or the
secrets mapping, exactly.
"""

from __future__ import annotations

import json
import zoneinfo
from pathlib import Path
from typing import Any

import pytest

from builder.errors import DefinitionError
from builder.site import SITE_FIELDS, fields_help, load_secrets, load_site, ssh_key_problem
from tests.conftest import FIXTURES, PROJECT

CASES = FIXTURES / "site"
# Errors about the whole document have no line to give.
WITHOUT_LINE = {"site-top-level-list", "secrets-top-level-list"}


def _cases() -> list[Path]:
    return sorted(CASES.glob("*.yaml"))


def _expected(case: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(case.with_suffix(".json").read_text())
    return data


def _load(kind: str, path: Path) -> Any:
    if kind == "secrets":
        return load_secrets(path)
    return dict(load_site(path).values)


@pytest.mark.parametrize("case", _cases(), ids=lambda p: p.stem)
def test_site_case(case: Path) -> None:
    expected = _expected(case)
    assert expected["load"] in ("site", "secrets")
    assert ("error" in expected) != ("result" in expected), f"{case.with_suffix('.json')}: error or result"
    if expected.get("requires_tzdata") and not zoneinfo.available_timezones():
        pytest.skip("no tz database on this machine")

    if "error" in expected:
        with pytest.raises(DefinitionError) as caught:
            _load(expected["load"], case)
        message = str(caught.value)
        assert expected["error"] in message
        assert "\n" not in message, "a site error is one line"
        return

    assert _load(expected["load"], case) == expected["result"]


def test_every_case_has_a_yaml_and_a_json() -> None:
    yamls = {p.stem for p in CASES.glob("*.yaml")}
    jsons = {p.stem for p in CASES.glob("*.json")}
    assert yamls == jsons
    assert len(yamls) >= 30


def test_error_cases_name_the_file_and_line() -> None:
    for case in _cases():
        expected = _expected(case)
        if "error" in expected and case.stem not in WITHOUT_LINE:
            assert expected["error"].startswith(f"{case.name}:"), case.name
            line = expected["error"][len(case.name) + 1 :].split(":", 1)[0]
            assert line.isdigit(), f"{case.name}: expected error has no line"


def test_site_object_carries_the_values() -> None:
    site = load_site(CASES / "test-site.yaml")
    assert site.domain == "test.home.arpa"
    assert site.admin_user == "tester"
    assert site.dns == ("10.99.0.1", "10.99.0.2")
    assert site.host("extranet").address == "10.99.0.111/24"
    assert site.fqdn("intranet") == "intranet.test.home.arpa"
    assert site["timezone"] == "Europe/Paris"


def test_missing_host_names_the_site_file_and_role() -> None:
    site = load_site(CASES / "test-site.yaml")
    with pytest.raises(DefinitionError, match=r"site file .*test-site\.yaml has no hosts\.backup \(hosts: "):
        site.host("backup")


def test_missing_site_file_is_one_line() -> None:
    with pytest.raises(DefinitionError, match=r"nope\.yaml: file not found"):
        load_site(CASES / "nope.yaml")


def test_no_secrets_file_means_no_secrets() -> None:
    assert load_secrets(None) == {}


def test_missing_secrets_file_given_by_path_is_an_error() -> None:
    with pytest.raises(DefinitionError, match="file not found"):
        load_secrets(CASES / "nope.yaml")


def test_the_committed_example_is_valid_and_uses_documentation_addresses() -> None:
    site = load_site(PROJECT / "site.example.yaml")
    assert site.gateway.startswith("192.168.1.")
    assert all(h.address.startswith("192.168.1.") for h in site.hosts.values())
    assert set(site.hosts) == {p.stem for p in (PROJECT / "images").glob("*.yaml")}


def test_the_example_shows_every_key() -> None:
    text = (PROJECT / "site.example.yaml").read_text()
    for f in SITE_FIELDS:
        assert f"\n{f.name}:" in f"\n{text}", f.name


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEZ34vFY5e3UW2paPff94a7Uzy0jlyjar5xfwMs6s9ac", None),
        ("ssh-ed25519", "expected '<type> <base64> [comment]'"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", "not a whole ssh-ed25519 key"),  # truncated
        ("ecdsa-sha2-nistp256 AAAAC3NzaC1lZDI1NTE5AAAAIEZ34vFY5e3UW2paPff94a7Uzy0jlyjar5xfwMs6s9ac", "not a whole"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----", "expected '<type> <base64> [comment]'"),
    ],
)
def test_ssh_key_problem(key: str, problem: str | None) -> None:
    found = ssh_key_problem(key)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_fields_help_lists_nested_host_keys() -> None:
    names = [row[0] for row in fields_help()]
    assert "hosts.<name>.address" in names
    assert "ssh_authorized_keys" in names
