"""ddclient's /etc/ddclient.conf, driven by tests/fixtures/ddclient/<case>.yaml (a secrets file) + <case>.json.

Rendered with the test site (tests/fixtures/site/test-site.yaml, which names a dynhost). Then how it reaches the
extranet: a cloud-init file (root, 0600) on the extranet only, and nowhere when the site names no dynhost.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.cloudinit import render_seed
from builder.ddclient import DDCLIENT_CONF, MARKER, ddclient_conf, ddclient_files
from builder.errors import DefinitionError
from builder.site import Site, load_secrets, load_site
from tests.conftest import FIXTURES, PROJECT

CASES = FIXTURES / "ddclient"
DROP_IN = PROJECT / "images" / "files" / "extranet" / "ddclient-homelab.service.conf"


@pytest.fixture
def site() -> Site:
    return load_site(FIXTURES / "site" / "test-site.yaml")


@pytest.fixture
def secrets() -> dict[str, dict[str, str]]:
    return load_secrets(FIXTURES / "site" / "test-secrets.yaml")


def _cases() -> list[Path]:
    return sorted(CASES.glob("*.yaml"))


@pytest.mark.parametrize("case", _cases(), ids=lambda p: p.stem)
def test_ddclient_case(case: Path, site: Site) -> None:
    expected: dict[str, Any] = json.loads(case.with_suffix(".json").read_text())
    assert ("error" in expected) != ("conf" in expected), f"{case.with_suffix('.json')}: error or conf"
    if "error" in expected:
        with pytest.raises(DefinitionError) as caught:
            ddclient_conf(site, load_secrets(case))
        assert str(caught.value) == expected["error"]
        return
    assert ddclient_conf(site, load_secrets(case)) == expected["conf"]


def test_every_case_has_a_yaml_and_a_json() -> None:
    assert {p.stem for p in CASES.glob("*.yaml")} == {p.stem for p in CASES.glob("*.json")}


def test_the_config_uses_usev4_never_the_deprecated_use(site: Site, secrets: dict[str, dict[str, str]]) -> None:
    conf = ddclient_conf(site, secrets)
    assert conf is not None
    lines = conf.splitlines()
    assert lines[0].startswith(MARKER)
    assert "protocol=ovh" in lines and "server=www.ovh.com" in lines
    assert any(line.startswith("usev4=webv4, webv4=") for line in lines)
    assert not any(re.match(r"(use|web)=", line) for line in lines)


def test_no_dynhost_no_ddclient(site: Site) -> None:
    without = Site(**{**site.__dict__, "dynhost": None})
    # No secrets needed either: nothing is written, and ddclient.service skips itself.
    assert ddclient_conf(without, {}) is None
    assert ddclient_files("extranet", without, {}) == {}


def test_only_the_extranet_runs_ddclient(site: Site, secrets: dict[str, dict[str, str]]) -> None:
    assert list(ddclient_files("extranet", site, secrets)) == [DDCLIENT_CONF]
    assert ddclient_files("intranet", site, secrets) == {}


def test_the_extranet_user_data_writes_it_private(site: Site, secrets: dict[str, dict[str, str]]) -> None:
    user_data = yaml.safe_load(render_seed(PROJECT, "extranet", site, secrets).user_data)
    files = {entry["path"]: entry for entry in user_data["write_files"]}
    conf = files[DDCLIENT_CONF]
    assert (conf["owner"], conf["permissions"]) == ("root:root", "0600")
    assert conf["content"] == ddclient_conf(site, secrets)


def test_the_intranet_user_data_has_no_ddclient(site: Site, secrets: dict[str, dict[str, str]]) -> None:
    user_data = yaml.safe_load(render_seed(PROJECT, "intranet", site, secrets).user_data)
    assert DDCLIENT_CONF not in {entry["path"] for entry in user_data["write_files"]}


def test_a_missing_secret_stops_the_render_naming_it(site: Site, secrets: dict[str, dict[str, str]]) -> None:
    weak = {**secrets, "extranet": {k: v for k, v in secrets["extranet"].items() if k != "OVH_DYNHOST_PASSWORD"}}
    with pytest.raises(DefinitionError, match=r"^secrets: extranet\.OVH_DYNHOST_PASSWORD: missing: /etc/ddclient"):
        render_seed(PROJECT, "extranet", site, weak)


def test_the_image_runs_ddclient_only_on_a_config_written_here() -> None:
    # The drop-in's ExecCondition greps for the marker this module writes on the first line.
    assert f'"^{MARKER}"' in DROP_IN.read_text()
