"""Compose stacks, driven by tests/fixtures/compose/<case>/: compose.yaml (+ images.lock.json, baked files) and
expected.json, which holds {"ok": true} or {"error": "<substring of the one-line error>"}, and optionally "role"
(default intranet), "site" (a file in tests/fixtures/site, default test-site.yaml) and "secrets" (a file in the
case, default tests/fixtures/compose/secrets.yaml). Every case is checked against tests/fixtures/compose/
definition.yaml, pointed at the case's directory.

The real stacks in compose/ are checked with tests/fixtures/compose/real-stack-lock/<role>.json, whose digests
are synthetic (sha256 of the image names; valid in form only, fine in a test fixture, never a real lock) and
the throwaway secrets in tests/fixtures/compose/real-stack-secrets.yaml.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.compose import (
    ENV_FILES,
    PROMETHEUS_TARGETS,
    RUNTIME_VARIABLES,
    SECRET_RULES,
    check_stack,
    env_files,
    interpolated,
    prometheus_node_targets,
    required_secrets,
    role_env_files,
    secret_problem,
    stack_env_files,
)
from builder.definition import ImageDefinition, known_roles, load_definition, load_role
from builder.errors import DefinitionError
from builder.lock import LOCK_NAME, image_problem, images_in_compose, load_lock
from builder.site import Site, load_secrets, load_site
from tests.conftest import FIXTURES, PROJECT

CASES = FIXTURES / "compose"
SITE = FIXTURES / "site" / "test-site.yaml"
REAL_LOCKS = CASES / "real-stack-lock"
REAL_SECRETS = CASES / "real-stack-secrets.yaml"


def _cases() -> list[Path]:
    return sorted(p for p in CASES.iterdir() if (p / "compose.yaml").is_file())


def _expected(case: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((case / "expected.json").read_text())
    return data


def _definition(case: Path, role: str) -> ImageDefinition:
    base = load_definition(CASES / "definition.yaml", CASES)
    return ImageDefinition(role=role, path=base.path, values={**base.values, "compose": case.name})


def _check_case(case: Path) -> None:
    expected = _expected(case)
    role = expected.get("role", "intranet")
    site = load_site(FIXTURES / "site" / expected.get("site", "test-site.yaml"))
    secrets = load_secrets(case / expected["secrets"] if "secrets" in expected else CASES / "secrets.yaml")
    check_stack(CASES, _definition(case, role), site, secrets)


@pytest.mark.parametrize("case", _cases(), ids=lambda p: p.name)
def test_compose_case(case: Path) -> None:
    expected = _expected(case)
    assert ("error" in expected) != ("ok" in expected), f"{case / 'expected.json'}: needs 'error' or 'ok'"
    if "ok" in expected:
        _check_case(case)
        return
    with pytest.raises(DefinitionError) as caught:
        _check_case(case)
    message = str(caught.value)
    assert expected["error"] in message
    assert "\n" not in message, "a stack error is one line"


def test_there_are_many_cases_and_each_says_why() -> None:
    cases = _cases()
    assert len(cases) >= 40
    for case in cases:
        first = (case / "compose.yaml").read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 10, f"{case.name}: compose.yaml starts with what it tests"


def test_compose_errors_name_the_file_line_and_key() -> None:
    for case in _cases():
        error = _expected(case).get("error", "")
        if error.startswith("compose.yaml:"):
            line, key = error[len("compose.yaml:") :].split(": ", 2)[:2]
            assert line.isdigit(), case.name
            assert key.startswith("services"), case.name


def test_secret_errors_never_show_the_secret() -> None:
    for name in ("db-password-short", "db-password-not-alphanumeric", "db-password-common-weak"):
        case = CASES / name
        secrets = load_secrets(case / "secrets.yaml")
        with pytest.raises(DefinitionError) as caught:
            _check_case(case)
        for section in secrets.values():
            for value in section.values():
                assert value not in str(caught.value)


# --- the real stacks ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site() -> Site:
    return load_site(SITE)


@pytest.fixture(scope="module")
def secrets() -> dict[str, dict[str, str]]:
    return load_secrets(REAL_SECRETS)


def _compose(role: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((PROJECT / "compose" / role / "compose.yaml").read_text())
    return data


@pytest.mark.parametrize("role", known_roles(PROJECT))
def test_real_stack_passes_with_the_test_lock_and_secrets(
    role: str, site: Site, secrets: dict[str, dict[str, str]]
) -> None:
    definition = load_role(PROJECT, role)
    lock = load_lock(REAL_LOCKS / f"{role}.json")
    check_stack(PROJECT, definition, site, secrets, lock)


@pytest.mark.parametrize("role", known_roles(PROJECT))
def test_real_stack_without_a_lock_file_says_how_to_make_one(
    role: str, site: Site, secrets: dict[str, dict[str, str]]
) -> None:
    if (PROJECT / "compose" / role / LOCK_NAME).exists():
        pytest.skip("the role has a lock file")
    with pytest.raises(DefinitionError) as caught:
        check_stack(PROJECT, load_role(PROJECT, role), site, secrets)
    assert str(caught.value) == f"compose/{role}: no lock file: run `homelab lock {role}`"


@pytest.mark.parametrize("role", known_roles(PROJECT))
def test_the_test_locks_are_synthetic_and_cover_exactly_the_real_images(role: str) -> None:
    images = images_in_compose(PROJECT / "compose" / role / "compose.yaml")
    lock = load_lock(REAL_LOCKS / f"{role}.json", images)
    assert sorted(lock.images) == images
    for image, entry in lock.images.items():
        assert entry.digest == "sha256:" + hashlib.sha256(f"manifest {image}".encode()).hexdigest()
        assert entry.config_digest == "sha256:" + hashlib.sha256(f"config {image}".encode()).hexdigest()


@pytest.mark.parametrize("role", known_roles(PROJECT))
def test_real_stack_with_the_weak_test_secrets_is_refused(role: str, site: Site) -> None:
    """weak-secrets.yaml: a DB password Immich refuses, the other roles' secrets missing."""
    secrets = load_secrets(FIXTURES / "compose" / "weak-secrets.yaml")
    lock = load_lock(REAL_LOCKS / f"{role}.json")
    with pytest.raises(DefinitionError, match=rf"^secrets file: {role}\.[A-Z_]+: "):
        check_stack(PROJECT, load_role(PROJECT, role), site, secrets, lock)


def test_every_real_image_is_pinned_and_never_pulled() -> None:
    for role in known_roles(PROJECT):
        for name, service in _compose(role)["services"].items():
            assert image_problem(service["image"]) is None, (role, name)
            assert service["pull_policy"] == "never", (role, name)
            assert service["restart"] == "unless-stopped", (role, name)
            assert service["healthcheck"]["test"], (role, name)


def _published(service: dict[str, Any]) -> list[str]:
    return [str(p) for p in service.get("ports", [])]


def test_intranet_stack_fixes_the_original_defects() -> None:
    services = _compose("intranet")["services"]
    assert set(services) == {"jellyfin", "immich-server", "database", "valkey", "prometheus", "grafana"}
    # 1: Immich listens on 2283 inside the container.
    assert _published(services["immich-server"]) == ["2283:2283"]
    # 2: Immich's own VectorChord Postgres, with shm_size, data checksums and a healthcheck.
    database = services["database"]
    assert database["image"].startswith("ghcr.io/immich-app/postgres:")
    assert "vectorchord" in database["image"]
    assert database["shm_size"]
    assert database["environment"]["POSTGRES_INITDB_ARGS"] == "--data-checksums"
    assert database["volumes"] == ["/srv/postgres/data:/var/lib/postgresql/data"]
    # 3: nothing but what users open is published; Postgres and Valkey nowhere.
    assert "ports" not in database and "ports" not in services["valkey"]
    published = {p for s in services.values() for p in _published(s)}
    assert published == {"8096:8096", "2283:2283", "9090:9090", "3000:3000"}
    # 4: server and database read one env file.
    assert services["immich-server"]["env_file"] == database["env_file"] == ["/etc/homelab/immich.env"]
    # 5: Valkey, as Immich ships it.
    assert services["valkey"]["image"].startswith("docker.io/valkey/valkey:")
    # 7: machine learning off, and no container for it.
    assert services["immich-server"]["environment"]["IMMICH_MACHINE_LEARNING_ENABLED"] == "false"
    assert not any("machine-learning" in s["image"] for s in services.values())
    # 11: VAAPI wiring: the render node and the render group's GID resolved on the VM.
    jellyfin = services["jellyfin"]
    assert jellyfin["devices"] == ["/dev/dri/renderD128:/dev/dri/renderD128"]
    assert jellyfin["group_add"] == ["${RENDER_GID:?}"]
    assert "/srv/media:/media:ro" in jellyfin["volumes"]


def test_extranet_stack_is_nginx_proxy_manager_with_data_on_appdata() -> None:
    services = _compose("extranet")["services"]
    assert set(services) == {"npm"}
    npm = services["npm"]
    assert _published(npm) == ["80:80", "443:443", "81:81"]
    assert "/srv/appdata/npm/data:/data" in npm["volumes"]
    assert npm["healthcheck"]["test"] == ["CMD", "/usr/bin/check-health"]
    assert npm["env_file"] == ["/etc/homelab/npm.env"]


def test_prometheus_scrapes_itself_and_every_node_exporter() -> None:
    config = yaml.safe_load((PROJECT / "compose" / "intranet" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["prometheus"]["static_configs"][0]["targets"] == ["localhost:9090"]
    node = jobs["node"]
    assert node["static_configs"][0]["targets"] == ["host.docker.internal:9100"]
    assert node["file_sd_configs"][0]["files"] == ["/etc/prometheus/targets/*.json"]
    prometheus = _compose("intranet")["services"]["prometheus"]
    assert "host.docker.internal:host-gateway" in prometheus["extra_hosts"]
    assert "/etc/homelab/prometheus:/etc/prometheus/targets:ro" in prometheus["volumes"]


def test_grafana_is_provisioned_from_baked_files() -> None:
    root = PROJECT / "compose" / "intranet" / "grafana"
    datasources = yaml.safe_load((root / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    assert (source["type"], source["url"], source["uid"]) == ("prometheus", "http://prometheus:9090", "prometheus")
    providers = yaml.safe_load((root / "provisioning" / "dashboards" / "homelab.yaml").read_text())["providers"]
    assert providers[0]["options"]["path"] == "/etc/grafana/dashboards"
    dashboards = sorted((root / "dashboards").glob("*.json"))
    assert dashboards
    for path in dashboards:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and dashboard["panels"]
        for panel in dashboard["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, (path.name, panel["title"])
    grafana = _compose("intranet")["services"]["grafana"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./grafana/dashboards:/etc/grafana/dashboards:ro" in grafana["volumes"]
    assert grafana["environment"]["GF_PLUGINS_PREINSTALL_DISABLED"] == "true"


def test_data_dirs_are_on_data_volumes() -> None:
    for role in known_roles(PROJECT):
        path = PROJECT / "compose" / role / "data-dirs"
        if not path.exists():
            continue
        mounts = [v["mount"] for v in load_role(PROJECT, role)["volumes"]]
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                directory, uid, gid, mode = line.split()
                assert any(directory.startswith(m + "/") for m in mounts), directory
                assert uid.isdigit() and gid.isdigit() and mode.startswith("0")


# --- the firewall matrix in the definitions -----------------------------------------------------------------


def _matrix(role: str) -> dict[tuple[int, str], list[str]]:
    return {(p["port"], p["proto"]): p["from"] for p in load_role(PROJECT, role)["ports"]}


def test_the_firewall_matrix_is_the_issues() -> None:
    intranet, extranet = _matrix("intranet"), _matrix("extranet")
    for port in (8096, 2283, 3000):
        assert intranet[(port, "tcp")] == ["lan", "dmz"]
    assert intranet[(9090, "tcp")] == extranet[(9100, "tcp")] == intranet[(9100, "tcp")] == ["monitoring"]
    assert extranet[(81, "tcp")] == ["lan"]
    for port in ((80, "tcp"), (443, "tcp"), (1194, "udp")):
        assert extranet[port] == ["wan", "lan"]
    for closed in (5432, 6379):
        assert (closed, "tcp") not in intranet and (closed, "tcp") not in extranet


def test_every_zone_the_definitions_name_is_in_the_example_and_test_sites() -> None:
    for site_file in (PROJECT / "site.example.yaml", SITE):
        zones = load_site(site_file).zones
        for role in known_roles(PROJECT):
            for port in load_role(PROJECT, role)["ports"]:
                assert set(port["from"]) <= set(zones), (site_file.name, role, port)


# --- secrets table --------------------------------------------------------------------------------------------


def test_required_secrets_per_role() -> None:
    assert required_secrets("intranet") == ["DB_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "RESTIC_PASSWORD"]
    assert required_secrets("extranet") == ["NPM_ADMIN_EMAIL", "NPM_ADMIN_PASSWORD"]
    assert required_secrets("nope") == []


def test_every_secret_of_the_table_has_a_rule_and_every_file_is_under_etc_homelab() -> None:
    for env_file in ENV_FILES:
        assert env_file.path.startswith("/etc/homelab/") and env_file.path.endswith(".env")
        for secret in env_file.secrets.values():
            assert secret in SECRET_RULES


def test_env_files_the_real_stacks_read_are_those_of_the_table() -> None:
    for role in known_roles(PROJECT):
        read = {f for s in _compose(role)["services"].values() for f in s.get("env_file", [])}
        assert read == {f.path for f in ENV_FILES if f.role == role and f.stack}


def test_the_backup_env_file_is_the_units_not_the_stacks() -> None:
    assert set(env_files("intranet")) - set(stack_env_files("intranet")) == {"/etc/homelab/backup.env"}
    backup = env_files("intranet")["/etc/homelab/backup.env"]
    assert backup.constants["RESTIC_REPOSITORY"].startswith("/srv/backups/"), "on the backups volume"
    keep = {name: int(value) for name, value in backup.constants.items() if name.startswith("HOMELAB_BACKUP_KEEP_")}
    assert keep == {"HOMELAB_BACKUP_KEEP_DAILY": 7, "HOMELAB_BACKUP_KEEP_WEEKLY": 4, "HOMELAB_BACKUP_KEEP_MONTHLY": 6}


def test_role_env_files_are_what_cloud_init_must_write(secrets: dict[str, dict[str, str]]) -> None:
    files = role_env_files("intranet", secrets)
    password = secrets["intranet"]["DB_PASSWORD"]
    assert files["/etc/homelab/immich.env"] == (
        "DB_USERNAME='immich'\nDB_DATABASE_NAME='immich'\nPOSTGRES_USER='immich'\nPOSTGRES_DB='immich'\n"
        f"DB_PASSWORD='{password}'\nPOSTGRES_PASSWORD='{password}'\n"
    )
    assert files["/etc/homelab/grafana.env"] == (
        "GF_SECURITY_ADMIN_USER='admin'\nGF_SECURITY_ADMIN_PASSWORD='test only: grafana admin'\n"
    )
    assert files["/etc/homelab/backup.env"] == (
        "RESTIC_REPOSITORY='/srv/backups/restic'\nHOMELAB_BACKUP_KEEP_DAILY='7'\nHOMELAB_BACKUP_KEEP_WEEKLY='4'\n"
        "HOMELAB_BACKUP_KEEP_MONTHLY='6'\nRESTIC_PASSWORD='test-only-restic-repository-key'\n"
    )
    assert set(role_env_files("extranet", secrets)) == {"/etc/homelab/npm.env"}


def test_role_env_files_refuse_a_missing_or_weak_secret() -> None:
    with pytest.raises(DefinitionError, match=r"^secrets: intranet\.DB_PASSWORD: missing: /etc/homelab/immich\.env"):
        role_env_files("intranet", {"intranet": {"GRAFANA_ADMIN_PASSWORD": "x" * 12}})
    with pytest.raises(DefinitionError, match=r"^secrets: intranet\.DB_PASSWORD: too weak: 8 characters"):
        role_env_files("intranet", {"common": {"DB_PASSWORD": "postgres"}})


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("DB_PASSWORD", "a" * 20, None),
        ("DB_PASSWORD", "Ab1" * 10, None),
        ("DB_PASSWORD", "a" * 19, "too weak: 19 characters, at least 20"),
        ("DB_PASSWORD", "a" * 19 + "!", "A-Za-z0-9"),
        ("DB_PASSWORD", "a" * 19 + " ", "A-Za-z0-9"),
        ("GRAFANA_ADMIN_PASSWORD", "short", "too weak: 5 characters, at least 12"),
        ("GRAFANA_ADMIN_PASSWORD", "with 'quote' inside", "single quotes"),
        ("NPM_ADMIN_EMAIL", "admin@example.org", None),
        ("NPM_ADMIN_EMAIL", "admin", "email address"),
        ("RESTIC_PASSWORD", "x" * 20, None),
        ("RESTIC_PASSWORD", "x" * 19, "too weak: 19 characters, at least 20"),
        ("ANY_OTHER", "tab\there", "control characters"),
    ],
)
def test_secret_problem(name: str, value: str, problem: str | None) -> None:
    found = secret_problem(name, value)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
        assert value not in found


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("${RENDER_GID:?}", ["RENDER_GID"]),
        ("$$HOME and $${HOSTNAME}", []),
        ("$A-${B:-x}-${C?err}", ["A", "B", "C"]),
        ("100$", ["$"]),  # compose refuses a lone $ (invalid template)
        ("${", ["${"]),
    ],
)
def test_interpolated(text: str, names: list[str]) -> None:
    assert interpolated(text) == names


def test_runtime_variables_are_what_the_stack_unit_writes() -> None:
    script = (PROJECT / "images" / "files" / "common" / "homelab-stack-prepare").read_text()
    unit = (PROJECT / "images" / "files" / "common" / "homelab-stack.service").read_text()
    for name in RUNTIME_VARIABLES:
        assert f'echo "{name}=' in script
    assert "--env-file /run/homelab/stack.env up" in unit
    assert "ExecStartPre=/usr/local/libexec/homelab/stack-prepare" in unit
    for role in known_roles(PROJECT):
        baked = {f["dest"]: f for f in load_role(PROJECT, role)["files"]}
        assert baked["/usr/local/libexec/homelab/stack-prepare"]["mode"] == "0755"


def test_prometheus_node_targets_list_the_other_hosts_from_the_site(site: Site) -> None:
    assert json.loads(prometheus_node_targets(site)) == [
        {"targets": ["10.99.0.111:9100"], "labels": {"instance": "extranet", "role": "extranet"}}
    ]
    config = (PROJECT / "compose" / "intranet" / "prometheus" / "prometheus.yml").read_text()
    assert PROMETHEUS_TARGETS.startswith("/etc/homelab/prometheus/") and "/etc/prometheus/targets/*.json" in config


# --- what a build and a render check ---------------------------------------------------------------------------


@pytest.mark.parametrize("role", known_roles(PROJECT))
def test_a_build_checks_the_stack_without_secrets_or_site_but_needs_the_lock(role: str) -> None:
    definition = load_role(PROJECT, role)
    check_stack(PROJECT, definition, None, None, load_lock(REAL_LOCKS / f"{role}.json"))
    if not (PROJECT / "compose" / role / LOCK_NAME).exists():
        with pytest.raises(DefinitionError, match="no lock file"):
            check_stack(PROJECT, definition, None, None)


@pytest.mark.parametrize("role", known_roles(PROJECT))
def test_a_render_checks_secrets_and_zones_without_a_lock(
    role: str, site: Site, secrets: dict[str, dict[str, str]]
) -> None:
    definition = load_role(PROJECT, role)
    check_stack(PROJECT, definition, site, secrets, require_lock=False)
    with pytest.raises(DefinitionError, match=rf"^secrets file: {role}\.[A-Z_]+: missing: "):
        check_stack(PROJECT, definition, site, {}, require_lock=False)


def test_without_secrets_only_the_secret_checks_are_skipped() -> None:
    case = CASES / "secret-missing"
    check_stack(CASES, _definition(case, "intranet"), load_site(SITE), None)
    with pytest.raises(DefinitionError, match="is not written at boot"):
        check_stack(CASES, _definition(CASES / "env-file-unknown", "intranet"), load_site(SITE), None,
                    require_lock=False)
