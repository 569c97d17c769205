"""Image definitions, driven by tests/fixtures/definitions/<case>.yaml + <case>.json.

A case's JSON holds either {"error": "<substring of the one-line error>"} or {"dib": {...}}: the elements and
packages disk-image-create gets (exactly), a subset of the DIB environment, and the image size. Source paths in
the cases are relative to the small project in tests/fixtures/project.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.definition import fields_help, known_roles, load_definition, load_role
from builder.errors import DefinitionError, UnknownRoleError
from tests.conftest import FIXTURES, PROJECT

CASES = FIXTURES / "definitions"
FIXTURE_PROJECT = FIXTURES / "project"


def _cases() -> list[Path]:
    return sorted(CASES.glob("*.yaml"))


def _expected(case: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(case.with_suffix(".json").read_text())
    return data


@pytest.mark.parametrize("case", _cases(), ids=lambda p: p.stem)
def test_definition_case(case: Path) -> None:
    expected = _expected(case)
    assert set(expected) in ({"error"}, {"dib"}), f"{case.with_suffix('.json')}: needs exactly 'error' or 'dib'"

    if "error" in expected:
        with pytest.raises(DefinitionError) as caught:
            load_definition(case, FIXTURE_PROJECT)
        message = str(caught.value)
        assert expected["error"] in message
        assert "\n" not in message, "a definition error is one line"
        return

    dib = load_definition(case, FIXTURE_PROJECT).dib_args()
    want = expected["dib"]
    assert dib.elements == want["elements"]
    assert dib.packages == want["packages"]
    assert {k: dib.env.get(k) for k in want["env"]} == want["env"]
    assert dib.image_size_gb == want["image_size_gb"]


def test_every_case_has_a_yaml_and_a_json() -> None:
    yamls = {p.stem for p in CASES.glob("*.yaml")}
    jsons = {p.stem for p in CASES.glob("*.json")}
    assert yamls == jsons
    assert len(yamls) >= 20


def test_error_cases_name_the_file_and_line_where_yaml_gives_one() -> None:
    without_line = {"empty", "top-level-list"}
    for case in _cases():
        expected = _expected(case)
        if "error" in expected and case.stem not in without_line:
            assert expected["error"].startswith(f"{case.name}:"), case.name
            line = expected["error"][len(case.name) + 1 :].split(":", 1)[0]
            assert line.isdigit(), f"{case.name}: expected error has no line"


def _dotted_keys(data: Any, prefix: str = "") -> set[str]:
    """Key names in a parsed definition, nested ones dotted like fields_help(): vm.cores, volumes[].kind."""
    keys: set[str] = set()
    if isinstance(data, dict):
        for key, value in data.items():
            name = f"{prefix}{key}"
            keys.add(name)
            keys |= _dotted_keys(value, name + ".")
    elif isinstance(data, list):
        for item in data:
            keys |= _dotted_keys(item, prefix.rstrip(".") + "[].")
    return keys


def test_the_full_case_sets_every_field() -> None:
    data = yaml.safe_load((CASES / "valid-full.yaml").read_text())
    assert _dotted_keys(data) == {row[0] for row in fields_help()}


def test_defaults_fill_what_a_minimal_definition_leaves_out() -> None:
    definition = load_definition(CASES / "valid-minimal.yaml", FIXTURE_PROJECT)
    assert definition.role == "valid-minimal"
    assert definition["kernel"] == "cloud"
    assert definition["packages"] == []
    assert definition["files"] == []
    assert definition["compose"] is None
    assert definition["vm"] == {"cores": 2, "memory_mb": 2048, "disk_gb": 4}


def test_nested_defaults_fill_each_entry() -> None:
    definition = load_role(FIXTURE_PROJECT, "web")
    assert definition["files"][0] == {"src": "images/files/motd", "dest": "/etc/motd", "mode": "0644"}
    assert definition["volumes"][0]["read_only"] is False
    assert definition["ports"][0]["proto"] == "tcp"


def test_a_missing_definition_file_is_a_definition_error() -> None:
    with pytest.raises(DefinitionError, match=r"nope\.yaml: file not found"):
        load_definition(CASES / "nope.yaml", FIXTURE_PROJECT)


@pytest.mark.parametrize("role", known_roles(PROJECT))
def test_every_real_role_loads(role: str) -> None:
    definition = load_role(PROJECT, role)
    assert definition.role == role
    dib = definition.dib_args()
    assert dib.elements[0] == "debian-minimal"
    assert "homelab-bake" in dib.elements


def test_the_intranet_installs_the_gpu_firmware_from_non_free_firmware() -> None:
    # Jellyfin's VAAPI on the HD 530: i915's GuC/HuC/DMC files are in Debian 13's non-free-firmware component.
    dib = load_role(PROJECT, "intranet").dib_args()
    assert "firmware-intel-graphics" in dib.packages
    assert dib.env["DIB_DEBIAN_COMPONENTS"].split(",") == ["main", "non-free-firmware"]


def test_known_roles_lists_the_real_roles() -> None:
    assert {"extranet", "intranet"} <= set(known_roles(PROJECT))


def test_known_roles_lists_every_definition_in_images_sorted() -> None:
    assert known_roles(FIXTURE_PROJECT) == ["minimal", "web"]


def test_unknown_role_message_lists_the_known_roles() -> None:
    with pytest.raises(UnknownRoleError) as caught:
        load_role(FIXTURE_PROJECT, "nope")
    assert str(caught.value) == "unknown role 'nope' (known roles: minimal, web)"


def test_unknown_role_in_a_project_without_roles_says_none(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(UnknownRoleError, match=r"\(known roles: none\)"):
        load_role(tmp_path, "web")


def test_fields_help_has_a_row_for_every_field_including_nested_ones() -> None:
    names = [row[0] for row in fields_help()]
    assert names == [
        "description",
        "base",
        "kernel",
        "packages",
        "elements",
        "files",
        "files[].src",
        "files[].dest",
        "files[].mode",
        "compose",
        "units",
        "volumes",
        "volumes[].name",
        "volumes[].kind",
        "volumes[].mount",
        "volumes[].read_only",
        "vm",
        "vm.cores",
        "vm.memory_mb",
        "vm.disk_gb",
        "ports",
        "ports[].port",
        "ports[].proto",
        "ports[].service",
        "ports[].from",
        "ports[].health",
        "vpn_gateway",
    ]


def test_fields_help_rows_give_type_and_help_and_mark_required_keys() -> None:
    rows = {name: (kind, text) for name, kind, text in fields_help()}
    assert all(kind and text for kind, text in rows.values())
    assert rows["base"][0] == "one of debian-13 (required)"
    assert rows["volumes[].kind"][0] == "one of disk, share (required)"
    assert rows["vm.cores"][0] == "an integer >= 1 <= 64"
    assert "(required)" not in rows["kernel"][0]
