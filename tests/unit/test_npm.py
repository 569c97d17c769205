"""The proxy's desired state (builder/npm.py), driven by tests/fixtures/npm/<case>.yaml + <case>.json.

A case is a site file; its JSON holds either {"state": ...}, the exact desired state, or {"error": "..."}, the one
line refusing it (a target port the proxy cannot reach). Every payload must also pass NPM's own request schemas
(tests/fixtures/npm-api/requests.json, transcribed from NPM's source), as the real API would check it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from builder.cloudinit import render_seed
from builder.definition import load_role
from builder.errors import RenderError
from builder.npm import DESIRED_PATH, MARKER, check_targets, desired_state
from builder.site import Site, load_secrets, load_site
from tests.conftest import FIXTURES, PROJECT

CASES = FIXTURES / "npm"
REQUESTS = json.loads((FIXTURES / "npm-api" / "requests.json").read_text())
SECRETS = load_secrets(FIXTURES / "site" / "test-secrets.yaml")


def _cases() -> list[Path]:
    return sorted(CASES.glob("*.yaml"))


def _check(site: Site) -> None:
    check_targets(site, {role: load_role(PROJECT, role) for role in site.hosts})


@pytest.mark.parametrize("case", _cases(), ids=lambda p: p.stem)
def test_npm_case(case: Path) -> None:
    expected = json.loads(case.with_suffix(".json").read_text())
    site = load_site(case)
    if "error" in expected:
        with pytest.raises(RenderError) as caught:
            _check(site)
        assert expected["error"] in str(caught.value)
        assert str(caught.value).startswith(f"{case}:")
        return
    _check(site)
    assert desired_state(site) == expected["state"]


@pytest.mark.parametrize("case", [c for c in _cases() if "state" in json.loads(c.with_suffix(".json").read_text())],
                         ids=lambda p: p.stem)
def test_payloads_pass_npms_request_schemas(case: Path) -> None:
    state = desired_state(load_site(case))
    for host in state["proxy_hosts"]:
        body = {**host["payload"], "access_list_id": 7 if host["access_list"] else 0}
        jsonschema.validate(body, REQUESTS["POST /nginx/proxy-hosts"])
        jsonschema.validate(body, REQUESTS["PUT /nginx/proxy-hosts/{id}"])
    for access_list in state["access_lists"]:
        jsonschema.validate(access_list, REQUESTS["POST /nginx/access-lists"])
        jsonschema.validate(access_list, REQUESTS["PUT /nginx/access-lists/{id}"])


def test_every_case_has_a_yaml_and_a_json() -> None:
    assert {p.stem for p in CASES.glob("*.yaml")} == {p.stem for p in CASES.glob("*.json")}


def test_every_host_carries_the_marker_and_no_tls_fields() -> None:
    """The marker is how the applier knows its own hosts; TLS fields are the UI's, never overwritten."""
    for host in desired_state(load_site(CASES / "owner.yaml"))["proxy_hosts"]:
        payload = host["payload"]
        assert payload["advanced_config"].startswith(MARKER + "\n")
        assert payload["meta"] == {"homelab_managed": True}
        assert not {"certificate_id", "ssl_forced", "hsts_enabled", "hsts_subdomains", "http2_support"} & set(payload)


def test_the_example_site_is_the_owners_three() -> None:
    site = load_site(PROJECT / "site.example.yaml")
    _check(site)
    hosts = {h["payload"]["domain_names"][0]: h for h in desired_state(site)["proxy_hosts"]}
    assert {d: (h["payload"]["forward_host"], h["payload"]["forward_port"]) for d, h in hosts.items()} == {
        "media.example.org": ("192.168.1.101", 8096),
        "photos.example.org": ("192.168.1.101", 2283),
        "grafana.example.org": ("192.168.1.101", 3000),
    }
    assert "client_max_body_size 0;" in hosts["photos.example.org"]["payload"]["advanced_config"]
    assert hosts["grafana.example.org"]["access_list"] == "homelab: lan+vpn"


def _files(user_data: str) -> dict[str, dict[str, Any]]:
    return {entry["path"]: entry for entry in yaml.safe_load(user_data)["write_files"]}


def test_the_extranet_gets_the_state_file_world_readable() -> None:
    site = load_site(CASES / "owner.yaml")
    files = _files(render_seed(PROJECT, "extranet", site, SECRETS).user_data)
    assert files[DESIRED_PATH]["permissions"] == "0644"
    assert json.loads(files[DESIRED_PATH]["content"]) == desired_state(site)
    assert DESIRED_PATH not in _files(render_seed(PROJECT, "intranet", site, SECRETS).user_data)


def test_no_proxy_hosts_no_state_file() -> None:
    """The test site (and so the VM tests) declares none: the file is absent and the unit is skipped."""
    site = load_site(FIXTURES / "site" / "test-site.yaml")
    assert DESIRED_PATH not in _files(render_seed(PROJECT, "extranet", site, SECRETS).user_data)


def test_rendering_refuses_an_unreachable_target() -> None:
    with pytest.raises(RenderError, match=r"proxy_hosts\[3\]: intranet port 9090 is not open to the extranet"):
        render_seed(PROJECT, "extranet", load_site(CASES / "unreachable-port.yaml"), SECRETS)
