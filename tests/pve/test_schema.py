"""The schema checker on its own: path resolution and PVE's parameter verification, no server."""

from __future__ import annotations

import pytest

from .schema import MISSING, NOT_IN_SCHEMA, ApiError, ParamError, Schema, property_schema


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.load()


def errors(schema: Schema, method: str, path: str, **params: str | list[str]) -> dict[str, str]:
    endpoint = schema.resolve(method, path)
    given = {k: v if isinstance(v, list) else [v] for k, v in params.items()}
    try:
        schema.check(endpoint, given)
    except ParamError as e:
        assert e.status == 400 and e.message == "Parameter verification failed."
        return e.errors or {}
    return {}


def test_resolves_templated_segments(schema: Schema) -> None:
    endpoint = schema.resolve("POST", "/nodes/pve/qemu/100/move_disk")
    assert endpoint.template == "/nodes/{node}/qemu/{vmid}/move_disk"
    assert endpoint.path_params == {"node": "pve", "vmid": "100"}
    upid = "UPID:pve:00009C41:000FDE81:6B072F35:imgcopy::homelab@pve!deploy:"
    assert schema.resolve("GET", f"/nodes/pve/tasks/{upid}/status").path_params["upid"] == upid


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/x"), ("DELETE", "/version"), ("GET", "/nodes/pve/qemu/100/nope")]
)
def test_unknown_path_or_method_is_501_as_pve_says_it(schema: Schema, method: str, path: str) -> None:
    with pytest.raises(ApiError) as e:
        schema.resolve(method, path)
    assert e.value.status == 501
    assert e.value.message == f"Method '{method} {path}' not implemented"


def test_valid_create_passes_with_path_values(schema: Schema) -> None:
    endpoint = schema.resolve("POST", "/nodes/pve/qemu")
    checked = schema.check(endpoint, {
        "vmid": ["100"], "scsi0": ["local-zfs:0,import-from=local:import/intranet.qcow2"],
        "ide2": ["local-zfs:cloudinit"], "net0": ["virtio,bridge=vmbr0,link_down=1"], "agent": ["1"],
        "tags": ["homelab;intranet"], "virtiofs0": ["media"],
    })
    assert checked["node"] == "pve" and checked["vmid"] == "100"


def test_unknown_parameter_is_named(schema: Schema) -> None:
    assert errors(schema, "POST", "/nodes/pve/qemu", vmid="100", scsci0="local-zfs:4") == {"scsci0": NOT_IN_SCHEMA}


def test_missing_required_parameter(schema: Schema) -> None:
    assert errors(schema, "POST", "/nodes/pve/storage/local/upload", filename="x.iso") == {"content": MISSING}


@pytest.mark.parametrize(("value", "reason"), [
    ("abc", "type check ('integer') failed - got 'abc'"),
    ("99", "value must have a minimum value of 100"),
    ("1000000000", "value must have a maximum value of 999999999"),
])
def test_integer_type_and_range(schema: Schema, value: str, reason: str) -> None:
    assert errors(schema, "POST", "/nodes/pve/qemu", vmid=value) == {"vmid": reason}


def test_boolean_accepts_pve_words_only(schema: Schema) -> None:
    for word in ("0", "1", "true", "False", "yes", "off"):
        assert errors(schema, "POST", "/nodes/pve/qemu", vmid="100", start=word) == {}
    assert errors(schema, "POST", "/nodes/pve/qemu", vmid="100", start="2") == {
        "start": "type check ('boolean') failed - got '2'"}


def test_enum(schema: Schema) -> None:
    assert errors(schema, "POST", "/nodes/pve/storage/local/upload", content="images", filename="x") == {
        "content": "value 'images' does not have a value in the enumeration 'iso, vztmpl, import'"}


def test_pattern_with_perl_syntax(schema: Schema) -> None:
    assert errors(schema, "GET", "/access/permissions", userid="homelab@pve!deploy") == {}
    assert errors(schema, "GET", "/access/permissions", userid="no realm") == {
        "userid": "value does not match the regex pattern"}


def test_max_length(schema: Schema) -> None:
    reason = errors(schema, "POST", "/nodes/pve/qemu/100/snapshot", snapname="s" * 41)
    assert reason == {"snapname": "value may only be 40 characters long"}


def test_requires_partner(schema: Schema) -> None:
    assert errors(schema, "POST", "/nodes/pve/storage/local/upload", content="iso", filename="a.iso",
                  checksum="ab") == {"checksum-algorithm": "missing property - 'checksum' requires this property"}


def test_numbered_keys_within_their_range(schema: Schema) -> None:
    props = schema.resolve("POST", "/nodes/pve/qemu").properties
    assert property_schema(props, "scsi30") is not None
    assert property_schema(props, "scsi31") is None
    assert property_schema(props, "ide3") is not None and property_schema(props, "ide4") is None
    assert property_schema(props, "net0") is not None and property_schema(props, "virtiofs0") is not None
    assert property_schema(props, "scsi") is None


def test_property_string_keys_are_checked(schema: Schema) -> None:
    reason = errors(schema, "POST", "/nodes/pve/qemu", vmid="100", scsi0="local-zfs:0,import_from=local:import/x.qcow2")
    assert reason == {"scsi0": f"invalid format - import_from: {NOT_IN_SCHEMA}"}
    reason = errors(schema, "POST", "/nodes/pve/qemu", vmid="100", net0="virtio,bridge=vmbr0,link_down=maybe")
    assert reason == {"net0": "invalid format - link_down: type check ('boolean') failed - got 'maybe'"}
    assert errors(schema, "POST", "/nodes/pve/qemu", vmid="100", net0="virtio=BC:24:11:00:00:01,bridge=vmbr0") == {}


def test_duplicate_scalar_but_array_repeats(schema: Schema) -> None:
    assert errors(schema, "POST", "/nodes/pve/qemu/100/agent/exec", command=["ls", "-l"]) == {}
    duplicate = {"vmid": "type check ('integer') failed - got ARRAY"}
    assert errors(schema, "POST", "/nodes/pve/qemu", vmid=["100", "101"]) == duplicate


def test_named_string_formats(schema: Schema) -> None:
    assert errors(schema, "POST", "/nodes/pve/qemu/100/snapshot", snapname="before upgrade") == {
        "snapname": "invalid format - invalid configuration ID 'before upgrade'"}
    assert errors(schema, "POST", "/nodes/pve/qemu", vmid="100", tags="homelab;intranet") == {}
    assert errors(schema, "POST", "/nodes/pve/qemu", vmid="100", tags="home lab!") == {
        "tags": "invalid format - invalid tag 'lab!'"}


def test_volume_ids_keep_their_slash(schema: Schema) -> None:
    endpoint = schema.resolve("DELETE", "/nodes/pve/storage/local/content/local:iso/debian.iso")
    assert endpoint.path_params["volume"] == "local:iso/debian.iso"
    encoded = schema.resolve("GET", "/nodes/pve/storage/local/content/local%3Aiso%2Fdebian.iso")
    assert encoded.path_params["volume"] == "local:iso/debian.iso"


def test_path_values_cannot_be_overridden(schema: Schema) -> None:
    reason = errors(schema, "GET", "/nodes/pve/qemu/100/config", vmid="101")
    assert reason == {"vmid": "duplicate parameter (already defined in URI)"}
    assert errors(schema, "GET", "/nodes/pve/qemu/100/config", vmid="100") == {}


def test_every_error_at_once(schema: Schema) -> None:
    reason = errors(schema, "POST", "/nodes/pve/qemu/100/move_disk", bogus="1", **{"target-vmid": "x"})
    assert set(reason) == {"bogus", "target-vmid", "disk"}
