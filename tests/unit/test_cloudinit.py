"""cloud-init rendering: every role in images/ with the test site and secrets (tests/fixtures/site/)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.cloudinit import (
    HostNetwork,
    instance_id,
    render_seed,
    validate_network_config,
    validate_user_data,
)
from builder.definition import known_roles
from builder.errors import DefinitionError, RenderError, UnknownRoleError
from builder.site import Site, load_secrets, load_site
from tests.conftest import FIXTURES, PROJECT

ROLES = known_roles(PROJECT)
# The test site's own key; another throwaway one stands for a local boot's key.
SITE_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEZ34vFY5e3UW2paPff94a7Uzy0jlyjar5xfwMs6s9ac tests@homelab"
LOCAL_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKTyw7qlTCQ0cVhxqVa20CkFDXdHJ6FdTZ+djApxheZ2 local-boot"
QEMU = HostNetwork(address="10.0.2.15/24", gateway="10.0.2.2", dns=["10.0.2.3"])
# Everything that would end or open something in YAML, plus a literal backslash-n and non-ASCII.
# The secrets the real stacks need (the test secrets file, throwaway values).
STACK_SECRETS = load_secrets(FIXTURES / "site" / "test-secrets.yaml")
NASTY = 'a"b: -c #d \'e\' {f: [g]} & *h !i |j >k %l @m `n` \\n \\" \u00e9\U0001f600 '


@pytest.fixture
def site() -> Site:
    return load_site(FIXTURES / "site" / "test-site.yaml")


@pytest.fixture
def secrets() -> dict[str, dict[str, str]]:
    return load_secrets(FIXTURES / "site" / "test-secrets.yaml")


def _user_data(text: str) -> dict[str, Any]:
    assert text.startswith("#cloud-config\n")
    data: dict[str, Any] = yaml.safe_load(text)
    return data


def _files(user_data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["path"]: entry for entry in user_data["write_files"]}


def test_roles_are_the_two_vms() -> None:
    assert ROLES == ["extranet", "intranet"]


@pytest.mark.parametrize("role", ROLES)
def test_user_data_of_each_role(role: str, site: Site, secrets: dict[str, dict[str, str]]) -> None:
    seed = render_seed(PROJECT, role, site, secrets)
    data = _user_data(seed.user_data)
    assert data["hostname"] == role
    assert data["fqdn"] == f"{role}.test.home.arpa"
    assert data["manage_etc_hosts"] is True
    assert data["preserve_hostname"] is False
    assert data["timezone"] == "Europe/Paris"
    assert data["ssh_pwauth"] is False
    assert data["disable_root"] is True
    assert data["package_update"] is False
    assert data["package_upgrade"] is False
    assert data["users"] == [
        {
            "name": "tester",
            "groups": ["sudo", "docker"],
            "sudo": "ALL=(ALL) NOPASSWD:ALL",
            "shell": "/bin/bash",
            "lock_passwd": True,
            "ssh_authorized_keys": [SITE_KEY],
        }
    ]
    host_json = _files(data)["/etc/homelab/host.json"]
    assert host_json["permissions"] == "0644"
    assert json.loads(host_json["content"]) == {
        "role": role,
        "hostname": role,
        "fqdn": f"{role}.test.home.arpa",
        "address": site.host(role).address,
        "interface": "eth0",  # the NIC whose link is the production identity (homelab-volumes `serving`)
    }
    validate_user_data(seed.user_data, role)


@pytest.mark.parametrize("role", ROLES)
def test_network_config_of_each_role(role: str, site: Site, secrets: dict[str, dict[str, str]]) -> None:
    seed = render_seed(PROJECT, role, site, secrets)
    assert yaml.safe_load(seed.network_config) == {
        "version": 2,
        "ethernets": {
            "eth0": {
                "dhcp4": False,
                "dhcp6": False,
                "addresses": [site.host(role).address],
                "routes": [{"to": "0.0.0.0/0", "via": "10.99.0.1"}],
                "nameservers": {"addresses": ["10.99.0.1", "10.99.0.2"], "search": ["test.home.arpa"]},
            }
        },
    }
    validate_network_config(seed.network_config, role)


@pytest.mark.parametrize("role", ROLES)
def test_meta_data_of_each_role(role: str, site: Site, secrets: dict[str, dict[str, str]]) -> None:
    seed = render_seed(PROJECT, role, site, secrets)
    digest = hashlib.sha256((seed.user_data + seed.network_config).encode()).hexdigest()[:12]
    assert yaml.safe_load(seed.meta_data) == {"instance-id": f"{role}-{digest}", "local-hostname": role}


def stack(extra: dict[str, dict[str, str]] | None = None) -> dict[str, dict[str, str]]:
    """The secrets the real stacks need (STACK_SECRETS), plus a test's own, which win."""
    merged = {section: dict(values) for section, values in STACK_SECRETS.items()}
    for section, values in (extra or {}).items():
        merged.setdefault(section, {}).update(values)
    return merged


def test_secrets_env_is_common_then_role_and_private(site: Site, secrets: dict[str, dict[str, str]]) -> None:
    files = _files(_user_data(render_seed(PROJECT, "intranet", site, secrets).user_data))
    env = files["/etc/homelab/secrets.env"]
    assert env["content"] == (
        "TZ_NAME=Europe/Paris\nDB_PASSWORD=TestOnlyDbPassw0rd4Immich2026\n"
        "GRAFANA_ADMIN_PASSWORD=test only: grafana admin\nRESTIC_PASSWORD=test-only-restic-repository-key\n"
        "NOTE=p@ss: w0rd # not a comment\n"
    )
    assert env["permissions"] == "0600"
    assert env["owner"] == "root:root"


def test_a_role_value_replaces_the_common_one(site: Site) -> None:
    secrets = {"common": {"A": "1", "B": "2"}, "extranet": {"B": "3", "C": "4"}}
    files = _files(_user_data(render_seed(PROJECT, "extranet", site, stack(secrets)).user_data))
    content = files["/etc/homelab/secrets.env"]["content"]
    assert content.startswith("TZ_NAME=Europe/Paris\nA=1\nB=3\n") and content.endswith("C=4\n")


def test_a_stack_without_its_secrets_is_refused_naming_the_secret(site: Site) -> None:
    for secrets in ({}, {"intranet": {"ONLY": "intranet"}}):
        with pytest.raises(DefinitionError, match=r"extranet\.NPM_ADMIN_EMAIL: missing"):
            render_seed(PROJECT, "extranet", site, secrets)


def test_the_stacks_env_files_are_written_private(site: Site) -> None:
    files = _files(_user_data(render_seed(PROJECT, "extranet", site, stack()).user_data))
    npm = files["/etc/homelab/npm.env"]
    assert npm["permissions"] == "0600" and npm["owner"] == "root:root"
    assert "INITIAL_ADMIN_EMAIL='admin@test.home.arpa'" in npm["content"]


def test_the_backup_env_file_is_written_private_with_the_repository(site: Site) -> None:
    files = _files(_user_data(render_seed(PROJECT, "intranet", site, stack()).user_data))
    backup = files["/etc/homelab/backup.env"]
    assert backup["permissions"] == "0600" and backup["owner"] == "root:root"
    assert "RESTIC_REPOSITORY='/srv/backups/restic'\n" in backup["content"]
    assert "RESTIC_PASSWORD='test-only-restic-repository-key'\n" in backup["content"]


def test_the_intranet_without_a_strong_restic_password_is_refused(site: Site) -> None:
    # No container reads backup.env, so the stack check passes: the render itself must refuse.
    secrets = stack()
    del secrets["intranet"]["RESTIC_PASSWORD"]
    with pytest.raises(DefinitionError, match=r"intranet\.RESTIC_PASSWORD: missing: /etc/homelab/backup\.env"):
        render_seed(PROJECT, "intranet", site, secrets)
    with pytest.raises(DefinitionError, match=r"intranet\.RESTIC_PASSWORD: too weak: 6 characters, at least 20"):
        render_seed(PROJECT, "intranet", site, stack({"intranet": {"RESTIC_PASSWORD": "restic"}}))


def test_a_nasty_secret_round_trips_exactly(site: Site) -> None:
    seed = render_seed(PROJECT, "intranet", site, stack({"intranet": {"NASTY": NASTY}}))
    data = _user_data(seed.user_data)
    assert _files(data)["/etc/homelab/secrets.env"]["content"].endswith(f"\nNASTY={NASTY}\n")
    assert set(data) >= {"hostname", "users", "write_files"}
    assert seed.user_data.isascii(), "non-ASCII is escaped, so no encoding can change it"


def test_a_multi_line_secret_is_refused(site: Site) -> None:
    # Each secret is one KEY=value line: a newline would start another variable.
    with pytest.raises(RenderError, match="NASTY of intranet: must be a one-line string"):
        render_seed(PROJECT, "intranet", site, stack({"common": {"NASTY": 'x"\n: - y'}}))


def test_local_boot_network_and_key(site: Site, secrets: dict[str, dict[str, str]]) -> None:
    seed = render_seed(PROJECT, "intranet", site, secrets, networks=[QEMU], extra_ssh_keys=[LOCAL_KEY])
    eth0 = yaml.safe_load(seed.network_config)["ethernets"]["eth0"]
    assert eth0["addresses"] == ["10.0.2.15/24"]
    assert eth0["routes"] == [{"to": "0.0.0.0/0", "via": "10.0.2.2"}]
    assert eth0["nameservers"]["addresses"] == ["10.0.2.3"]
    data = _user_data(seed.user_data)
    assert data["users"][0]["ssh_authorized_keys"] == [SITE_KEY, LOCAL_KEY]
    assert json.loads(_files(data)["/etc/homelab/host.json"]["content"])["address"] == "10.0.2.15/24"


def test_a_bad_extra_key_is_refused(site: Site) -> None:
    with pytest.raises(RenderError, match="extra ssh key"):
        render_seed(PROJECT, "intranet", site, stack(), extra_ssh_keys=["ssh-ed25519 nope"])


def test_a_gateway_outside_the_override_network_is_refused(site: Site) -> None:
    bad = HostNetwork(address="10.0.2.15/24", gateway="10.0.3.2", dns=["10.0.2.3"])
    with pytest.raises(RenderError, match=r"gateway 10\.0\.3\.2 is not in 10\.0\.2\.15/24"):
        render_seed(PROJECT, "intranet", site, stack(), networks=[bad])


def test_instance_id_follows_user_data_and_network_config(site: Site) -> None:
    one = render_seed(PROJECT, "intranet", site, stack())
    same = render_seed(PROJECT, "intranet", site, stack())
    other_secret = render_seed(PROJECT, "intranet", site, stack({"common": {"A": "1"}}))
    local = render_seed(PROJECT, "intranet", site, stack(), networks=[QEMU])
    assert one.meta_data == same.meta_data
    assert other_secret.meta_data != one.meta_data
    assert local.meta_data != one.meta_data
    assert instance_id("r", "a", "b") != instance_id("r", "a", "c")


def test_unknown_role(site: Site) -> None:
    with pytest.raises(UnknownRoleError, match="known roles: extranet, intranet"):
        render_seed(PROJECT, "backup", site, {})


def test_role_missing_from_the_site(site: Site, tmp_path: Path) -> None:
    text = (FIXTURES / "site" / "test-site.yaml").read_text().replace("  extranet: {", "  other: {")
    (tmp_path / "site.yaml").write_text(text)
    with pytest.raises(DefinitionError, match=r"site\.yaml has no hosts\.extranet"):
        render_seed(PROJECT, "extranet", load_site(tmp_path / "site.yaml"), stack())


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "#cloud-config\nusers:\n  - name: a\n    lock_passwd: 'yes'\n",
            "user-data (t): users.0.lock_passwd: 'yes' is not of type 'boolean'",
        ),
        (
            "#cloud-config\nwrite_files:\n  - path: /x\n    permissions: 0644\n",
            "user-data (t): write_files.0.permissions: 420 is not of type 'string'",
        ),
        ("#cloud-config\nbogus: 1\n", "user-data (t): bogus: Additional properties are not allowed"),
        ("#cloud-config\nusers:\n  - name: a\n    lock-passwd: true\n", "users.0.lock-passwd: deprecated:"),
        ("#cloud-config\n- a\n", "user-data (t): (top level): expected a mapping"),
        ("hostname: a\n", "user-data (t): does not start with '#cloud-config'"),
        ("#cloud-config\nhostname: [a\n", "user-data (t): invalid YAML"),
    ],
)
def test_user_data_schema_errors(text: str, error: str) -> None:
    with pytest.raises(RenderError) as caught:
        validate_user_data(text, "user-data (t)")
    assert error in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "version: 2\nethernets:\n  eth0:\n    dhcp4: maybe\n",
            "network-config (t): ethernets.eth0.dhcp4: 'maybe' is not one of",
        ),
        ("version: 1\n", "network-config (t): version: 1 is not one of [2]"),
        ("version: 2\nethernets:\n  eth0:\n    addresses: 10.0.0.1/24\n", "ethernets.eth0.addresses: '10.0.0.1/24'"),
        ("network:\n  version: 2\n", "network-config (t): network: write the v2 keys at the top level"),
    ],
)
def test_network_config_schema_errors(text: str, error: str) -> None:
    with pytest.raises(RenderError) as caught:
        validate_network_config(text, "network-config (t)")
    assert error in str(caught.value)


def test_a_template_that_breaks_the_schema_names_the_role_and_path(site: Site, tmp_path: Path) -> None:
    project = tmp_path / "project"
    for name in ("images", "compose"):
        shutil.copytree(PROJECT / name, project / name)
    (project / "cloudinit").mkdir()
    for name in ("meta-data", "network-config"):
        (project / "cloudinit" / f"{name}.j2").write_text((PROJECT / "cloudinit" / f"{name}.j2").read_text())
    user_data = (PROJECT / "cloudinit" / "user-data.j2").read_text().replace("lock_passwd: true", "lock_passwd: 1")
    (project / "cloudinit" / "user-data.j2").write_text(user_data)
    with pytest.raises(RenderError, match=r"^user-data \(intranet\): users\.0\.lock_passwd: 1 is not of type"):
        render_seed(project, "intranet", site, stack())


def test_a_template_using_an_undefined_name_fails(site: Site, tmp_path: Path) -> None:
    project = tmp_path / "project"
    for name in ("images", "compose"):
        shutil.copytree(PROJECT / name, project / name)
    (project / "cloudinit").mkdir()
    (project / "cloudinit" / "user-data.j2").write_text("#cloud-config\nhostname: {{ nope | yaml }}\n")
    with pytest.raises(RenderError, match=r"cloudinit/user-data\.j2: 'nope' is undefined"):
        render_seed(project, "intranet", site, stack())
