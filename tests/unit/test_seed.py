"""The NoCloud seed ISO: written atomically with pycdlib, read back the same."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pycdlib
import pytest

from builder.cloudinit import Seed, read_seed_iso, render_seed, write_seed_iso
from builder.errors import RenderError
from builder.site import load_secrets, load_site
from tests.conftest import FIXTURES, PROJECT


@pytest.fixture
def seed() -> Seed:
    site = load_site(FIXTURES / "site" / "test-site.yaml")
    secrets = load_secrets(FIXTURES / "site" / "test-secrets.yaml")
    return render_seed(PROJECT, "intranet", site, secrets)


def _iso_listing(path: Path) -> tuple[str, list[str], list[str]]:
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        volume = iso.pvd.volume_identifier.decode().strip()
        rock_ridge = sorted(c.rock_ridge.name().decode() for c in iso.list_children(rr_path="/") if c.rock_ridge)
        joliet = sorted(c.file_identifier().decode("utf-16-be") for c in iso.list_children(joliet_path="/"))
    finally:
        iso.close()
    return volume, rock_ridge, joliet


def test_round_trip(seed: Seed, tmp_path: Path) -> None:
    path = tmp_path / "seed.iso"
    write_seed_iso(seed, path)
    assert read_seed_iso(path) == seed
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"], "no temp file is left behind"


def test_volume_id_and_exact_names(seed: Seed, tmp_path: Path) -> None:
    path = tmp_path / "seed.iso"
    write_seed_iso(seed, path)
    volume, rock_ridge, joliet = _iso_listing(path)
    assert volume == "cidata"
    assert [n for n in rock_ridge if n not in (".", "..")] == ["meta-data", "network-config", "user-data"]
    assert [n for n in joliet if n.strip("\0.")] == ["meta-data", "network-config", "user-data"]


def test_the_seed_holds_secrets_so_only_the_owner_reads_it(seed: Seed, tmp_path: Path) -> None:
    path = tmp_path / "seed.iso"
    write_seed_iso(seed, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_rewriting_replaces_the_old_seed(seed: Seed, tmp_path: Path) -> None:
    path = tmp_path / "seed.iso"
    write_seed_iso(Seed("#cloud-config\n{}\n", "instance-id: old\n", "version: 2\n"), path)
    write_seed_iso(seed, path)
    assert read_seed_iso(path) == seed


def test_a_failed_write_leaves_nothing(seed: Seed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_written(self: Any, out: Any, *args: Any, **kwargs: Any) -> None:
        out.write(b"\0" * 4096)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pycdlib.PyCdlib, "write_fp", half_written)
    path = tmp_path / "seed.iso"
    with pytest.raises(OSError, match="No space left"):
        write_seed_iso(seed, path)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_previous_seed(seed: Seed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "seed.iso"
    write_seed_iso(seed, path)
    before = path.read_bytes()

    def fails(self: Any, out: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(pycdlib.PyCdlib, "write_fp", fails)
    with pytest.raises(OSError):
        write_seed_iso(Seed("#cloud-config\n{}\n", "instance-id: x\n", "version: 2\n"), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]


def test_reading_something_that_is_not_an_iso(tmp_path: Path) -> None:
    path = tmp_path / "seed.iso"
    path.write_bytes(b"not an iso")
    with pytest.raises(RenderError, match="not a readable ISO"):
        read_seed_iso(path)


def test_reading_an_iso_with_another_volume_id(tmp_path: Path) -> None:
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="OTHER")
    path = tmp_path / "other.iso"
    iso.write(str(path))
    iso.close()
    with pytest.raises(RenderError, match="volume id is 'OTHER', NoCloud needs 'cidata'"):
        read_seed_iso(path)
