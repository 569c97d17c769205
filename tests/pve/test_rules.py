"""Pure pieces: permission expressions, the multipart reader, fault matching, ACL lookup (no server)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from . import multipart
from .faults import Fault, Faults
from .permissions import Forbidden, check_expression
from .state import PveState


def privileges(table: dict[str, set[str]]):  # type: ignore[no-untyped-def]
    return lambda path: table.get(path, set())


def test_perm_all_and_any() -> None:
    have = privileges({"/vms/100": {"VM.Audit"}})
    check_expression(["perm", "/vms/{vmid}", ["VM.Audit"]], {"vmid": "100"}, have)
    with pytest.raises(Forbidden) as e:
        check_expression(["perm", "/vms/{vmid}", ["VM.Audit", "VM.Monitor"]], {"vmid": "100"}, have)
    assert e.value.status == 403 and e.value.message == "Permission check failed (/vms/100, VM.Monitor)"
    check_expression(["perm", "/vms/{vmid}", ["VM.Snapshot", "VM.Audit"], "any", 1], {"vmid": "100"}, have)


def test_and_or_and_unknown_forms() -> None:
    have = privileges({"/": {"Sys.Audit"}})
    check_expression(["or", ["perm", "/", ["Sys.Modify"]], ["perm", "/", ["Sys.Audit"]]], {}, have)
    with pytest.raises(Forbidden):
        check_expression(["and", ["perm", "/", ["Sys.Audit"]], ["perm", "/", ["Sys.Modify"]]], {}, have)
    check_expression(["userid-group", ["User.Modify"]], {}, have)  # not emulated: allowed, logged


def test_require_param() -> None:
    have = privileges({"/pool/x": {"VM.Allocate"}})
    expr = ["perm", "/pool/{pool}", ["VM.Allocate"], "require_param", "pool"]
    check_expression(expr, {"pool": "x"}, have)
    with pytest.raises(Forbidden):
        check_expression(expr, {}, have)


def test_acl_most_specific_path_wins() -> None:
    state = PveState()
    tokenid = next(iter(state.tokens))
    state.acl[tokenid] = {"/": {"Sys.Audit"}, "/vms": {"VM.Audit"}, "/vms/100": {"VM.PowerMgmt"}}
    assert state.privileges(tokenid, "/vms/100") == {"VM.PowerMgmt"}
    assert state.privileges(tokenid, "/vms/101") == {"VM.Audit"}
    assert state.privileges(tokenid, "/nodes/pve") == {"Sys.Audit"}
    assert state.privileges("nobody@pve!x", "/") == set()


def test_faults_fire_once_on_the_nth_match() -> None:
    faults = Faults()
    fault = faults.add(Fault("GET", r"/status$", "error", nth=2))
    assert faults.take("GET", "/nodes/pve/tasks/x/status") is None
    assert faults.take("POST", "/nodes/pve/tasks/x/status") is None
    assert faults.take("GET", "/nodes/pve/tasks/x/status") is fault
    assert faults.take("GET", "/nodes/pve/tasks/x/status") is None


# File blocks smaller than, equal to and just above the delimiter (7 bytes): it spans two reads at every offset.
@pytest.mark.parametrize("file_block", [1, 2, 5, 6, 7, 8, 13, 4096])
def test_multipart_streams_the_file_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  file_block: int) -> None:
    monkeypatch.setattr(multipart, "CHUNK", 7)
    monkeypatch.setattr(multipart, "FILE_BLOCK", file_block)
    data = bytes(range(256)) * 40 + b"\r\n--almost-boundary\r\n"
    body = (
        b"--XyZ\r\nContent-Disposition: form-data; name=\"content\"\r\n\r\nimport\r\n"
        b"--XyZ\r\nContent-Disposition: form-data; name=\"filename\"; filename=\"a.qcow2\"\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n--XyZ--\r\n"
    )
    form = multipart.read_form(io.BytesIO(body), len(body), "multipart/form-data; boundary=XyZ", tmp_path)
    assert form.fields == {"content": ["import"]}
    assert (form.file_field, form.filename, form.size) == ("filename", "a.qcow2", len(data))
    assert form.path is not None and form.path.read_bytes() == data


def test_multipart_truncated(tmp_path: Path) -> None:
    body = b"--XyZ\r\nContent-Disposition: form-data; name=\"content\"\r\n\r\nimport"
    with pytest.raises(multipart.MultipartError):
        multipart.read_form(io.BytesIO(body), len(body), "multipart/form-data; boundary=XyZ", tmp_path)
