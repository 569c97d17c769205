"""The baked applier (images/files/extranet/npm-apply) run for real, as a subprocess under the system python3 in
isolated mode (-I: the standard library only, as on the VM), against tests/npm_emulator.py.

The emulator stands in for Nginx Proxy Manager only because NPM's container image cannot be fetched here; it
validates every request body against NPM's own request schemas and keeps state, so these tests prove the
applier's requests are well-formed and that it is idempotent. The desired state is the real one builder/npm.py
renders from tests/fixtures/npm/owner.yaml.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builder.npm import desired_state
from builder.site import load_site
from tests.conftest import FIXTURES, PROJECT
from tests.npm_emulator import NpmEmulator, running

pytestmark = pytest.mark.host

APPLIER = PROJECT / "images" / "files" / "extranet" / "npm-apply"
PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
EMAIL, PASSWORD = "admin@test.home.arpa", "correct-horse-battery"


@pytest.fixture
def emulator(tmp_path: Path) -> NpmEmulator:
    return NpmEmulator(EMAIL, PASSWORD, data_dir=tmp_path / "data")


@pytest.fixture
def api(emulator: NpmEmulator) -> Iterator[str]:
    with running(emulator) as url:
        yield url


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    path = tmp_path / "npm-proxy-hosts.json"
    path.write_text(json.dumps(desired_state(load_site(FIXTURES / "npm" / "owner.yaml"))))
    return path


def apply(api: str, state_file: Path, password: str = PASSWORD) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NPM_API_URL": api, "NPM_APPLY_STATE": str(state_file),
           "NPM_DATA_DIR": str(state_file.parent / "data"), "NPM_APPLY_WAIT_S": "20",
           "INITIAL_ADMIN_EMAIL": EMAIL, "INITIAL_ADMIN_PASSWORD": password}
    return subprocess.run([PYTHON, "-I", str(APPLIER)], env=env, capture_output=True, text=True, timeout=120,
                          check=False, stdin=subprocess.DEVNULL)


def edit(state_file: Path, change: Any) -> None:
    state = json.loads(state_file.read_text())
    change(state)
    state_file.write_text(json.dumps(state))


def http_top(state_file: Path) -> str:
    return (state_file.parent / "data" / "nginx" / "custom" / "http_top.conf").read_text()


def test_first_run_creates_the_access_list_and_hosts(emulator: NpmEmulator, api: str, state_file: Path) -> None:
    emulator.not_ready_for = 2  # NPM still starting: the applier waits for its API
    handmade = emulator.add_host(domain_names=["other.example.org"], forward_host="10.99.0.50", forward_port=80,
                                 forward_scheme="http")
    result = apply(api, state_file)
    assert result.returncode == 0, result.stderr
    assert sorted(emulator.writes()) == sorted([("POST", "/api/nginx/access-lists")]
                                               + [("POST", "/api/nginx/proxy-hosts")] * 3)
    (access_list,) = emulator.access_lists.values()
    assert access_list["name"] == "homelab: lan+vpn"
    assert access_list["clients"][-1] == {"address": "all", "directive": "deny"}
    grafana, media = emulator.host("grafana.example.org"), emulator.host("media.example.org")
    assert grafana["access_list_id"] == access_list["id"]
    assert media["access_list_id"] == 0
    assert (media["forward_host"], media["forward_port"]) == ("10.99.0.101", 8096)
    assert "limit_req zone=homelab_media_example_org burst=40 nodelay;" in media["advanced_config"]
    assert "zone=homelab_media_example_org:10m rate=20r/s;" in http_top(state_file)
    assert emulator.proxy_hosts[handmade["id"]] == handmade, "a host it did not make is never touched"
    assert "created proxy host media.example.org" in result.stdout


def test_second_run_writes_nothing_and_says_so(emulator: NpmEmulator, api: str, state_file: Path) -> None:
    assert apply(api, state_file).returncode == 0
    before = len(emulator.writes())
    result = apply(api, state_file)
    assert result.returncode == 0, result.stderr
    assert emulator.writes()[before:] == []
    assert "nothing to change (3 proxy hosts, 1 access lists already as declared)" in result.stdout


def test_a_changed_timeout_is_exactly_one_put(emulator: NpmEmulator, api: str, state_file: Path) -> None:
    assert apply(api, state_file).returncode == 0
    before = len(emulator.writes())

    def longer_grafana_timeout(state: dict[str, Any]) -> None:
        host = next(h for h in state["proxy_hosts"] if h["payload"]["domain_names"] == ["grafana.example.org"])
        host["payload"]["advanced_config"] = host["payload"]["advanced_config"].replace(" 60s;", " 300s;")

    edit(state_file, longer_grafana_timeout)
    result = apply(api, state_file)
    assert result.returncode == 0, result.stderr
    grafana = emulator.host("grafana.example.org")
    assert emulator.writes()[before:] == [("PUT", f"/api/nginx/proxy-hosts/{grafana['id']}")]
    assert "proxy_read_timeout 300s;" in grafana["advanced_config"]
    assert grafana["meta"]["homelab_managed"] is True
    assert "updated proxy host grafana.example.org: advanced_config" in result.stdout


def test_a_wrong_password_fails_with_one_line(emulator: NpmEmulator, api: str, state_file: Path) -> None:
    result = apply(api, state_file, password="not-the-password")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"npm-apply: NPM refused the login of {EMAIL} (Invalid email or password)")
    assert emulator.writes() == []


def test_only_its_own_hosts_and_lists_are_deleted(emulator: NpmEmulator, api: str, state_file: Path) -> None:
    handmade = emulator.add_host(domain_names=["other.example.org"], forward_host="10.99.0.50", forward_port=80)
    assert apply(api, state_file).returncode == 0
    grafana = emulator.host("grafana.example.org")
    list_id = grafana["access_list_id"]
    before = len(emulator.writes())

    def drop_grafana(state: dict[str, Any]) -> None:
        state["proxy_hosts"] = [h for h in state["proxy_hosts"] if h["access_list"] is None]
        state["access_lists"] = []

    edit(state_file, drop_grafana)
    result = apply(api, state_file)
    assert result.returncode == 0, result.stderr
    assert emulator.writes()[before:] == [("DELETE", f"/api/nginx/proxy-hosts/{grafana['id']}"),
                                          ("DELETE", f"/api/nginx/access-lists/{list_id}")]
    assert handmade["id"] in emulator.proxy_hosts


def test_a_ui_host_for_a_declared_domain_is_taken_over(emulator: NpmEmulator, api: str, state_file: Path) -> None:
    """NPM allows one host per domain: the declared one wins, by an update of the UI's host."""
    handmade = emulator.add_host(domain_names=["media.example.org"], forward_host="10.99.0.7", forward_port=1)
    result = apply(api, state_file)
    assert result.returncode == 0, result.stderr
    assert ("PUT", f"/api/nginx/proxy-hosts/{handmade['id']}") in emulator.writes()
    assert emulator.host("media.example.org")["forward_port"] == 8096
    assert "taken over from NPM's UI" in result.stdout
    assert apply(api, state_file).stdout.startswith("npm-apply: nothing to change")


def test_a_dropped_rate_zone_stays_declared_until_its_host_is_updated(
    emulator: NpmEmulator, api: str, state_file: Path
) -> None:
    """photos is saved while media still names the zone being dropped: NPM's nginx test covers every host, so the
    zone must still be declared then (else photos goes offline); the exact file is written at the end."""
    assert apply(api, state_file).returncode == 0

    def drop_media_rate_limit_change_photos(state: dict[str, Any]) -> None:
        media = next(h for h in state["proxy_hosts"] if h["payload"]["domain_names"] == ["media.example.org"])
        media["payload"]["advanced_config"] = "".join(
            line + "\n" for line in media["payload"]["advanced_config"].splitlines() if not line.startswith("limit_req")
        )
        state["proxy_hosts"].remove(media)
        state["proxy_hosts"].append(media)  # media is saved last
        photos = next(h for h in state["proxy_hosts"] if h["payload"]["domain_names"] == ["photos.example.org"])
        photos["payload"]["advanced_config"] = photos["payload"]["advanced_config"].replace(" 3600s;", " 7200s;")
        state["http_top"] = state["http_top"].splitlines()[0] + "\n"

    edit(state_file, drop_media_rate_limit_change_photos)
    result = apply(api, state_file)
    assert result.returncode == 0, result.stderr
    assert emulator.host("photos.example.org")["meta"]["nginx_online"] is True
    assert "limit_req" not in emulator.host("media.example.org")["advanced_config"]
    assert "limit_req_zone" not in http_top(state_file)
    assert "dropped unused rate zones" in result.stdout


def test_a_host_nginx_refuses_fails_the_run_and_is_saved_again(
    emulator: NpmEmulator, api: str, state_file: Path
) -> None:
    """A state whose host names an undeclared zone: NPM keeps the host offline, the run fails naming it; once the
    state is right, the next run saves it again although no field differs."""
    good = state_file.read_text()
    edit(state_file, lambda state: state.update(http_top="# no zones\n"))
    result = apply(api, state_file)
    assert result.returncode == 1
    assert result.stderr.strip() == ('npm-apply: media.example.org: NPM could not load it into nginx: '
                                     'nginx: [emerg] zone "homelab_media_example_org" is unknown')
    state_file.write_text(good)
    before = len(emulator.writes())
    result = apply(api, state_file)
    assert result.returncode == 0, result.stderr
    media = emulator.host("media.example.org")
    assert emulator.writes()[before:] == [("PUT", f"/api/nginx/proxy-hosts/{media['id']}")]
    assert "updated proxy host media.example.org: offline in NPM" in result.stdout
    assert media["meta"]["nginx_online"] is True


def _request(api: str, method: str, path: str, body: Any, token: str | None = None) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(api + path, data=json.dumps(body).encode(), method=method,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"domain_names": ["a.example.org"], "forward_scheme": "http", "forward_host": "10.0.0.1",
          "forward_port": 80, "ssl_key_type": "ecdsa"}, "Additional properties are not allowed"),
        ({"domain_names": ["a.example.org"], "forward_scheme": "http", "forward_host": "10.0.0.1"},
         "'forward_port' is a required property"),
        ({"domain_names": ["a.example.org"], "forward_scheme": "http", "forward_host": "10.0.0.1",
          "forward_port": 80, "block_exploits": "yes"}, "'yes' is not of type 'boolean'"),
    ],
)
def test_the_emulator_refuses_what_npm_refuses(emulator: NpmEmulator, api: str, body: dict[str, Any],
                                              message: str) -> None:
    """The emulator's checks are live: a body NPM's schema refuses is a 400 here too."""
    status, answer = _request(api, "POST", "/tokens", {"identity": EMAIL, "secret": PASSWORD})
    assert status == 200
    status, answer = _request(api, "POST", "/nginx/proxy-hosts", body, answer["token"])
    assert status == 400
    assert message in answer["error"]["message"]
    assert emulator.proxy_hosts == {}
