"""builder/deploy.py's pure parts: tags, NIC strings, compose health, the plan's JSON round trip, the journal."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder import deploy
from builder.deploy import DataVolume, DeployPlan, Journal, Step
from builder.errors import DeployError


def test_tags_follow_pve_tag_syntax() -> None:
    tags = deploy.vm_tags("intranet", ("green",), "0123456789ab", "20261125-191500-000001")
    assert ";".join(tags) == "homelab;role-intranet;green;v-0123456789ab;d-20261125-191500-000001"
    with pytest.raises(DeployError, match="not a valid Proxmox VE tag"):
        deploy.vm_tags("intranet", ("green",), "1:2", "x")


def test_recolour_keeps_identity_tags() -> None:
    tags = deploy.parse_tags("homelab;role-intranet;green;v-1;d-2")
    assert deploy.recolour(tags, ("blue", "rollback")) == ("homelab", "d-2", "role-intranet", "v-1", "blue",
                                                            "rollback")


def test_net_strings_round_trip() -> None:
    model, mac, options = deploy.parse_net("virtio=BC:24:11:00:00:01,bridge=vmbr0,link_down=1")
    assert (model, mac, options) == ("virtio", "BC:24:11:00:00:01", {"bridge": "vmbr0", "link_down": "1"})
    assert deploy.render_net(model, mac, {"bridge": "vmbr0"}) == "virtio=BC:24:11:00:00:01,bridge=vmbr0"
    assert deploy.render_net("virtio", None, {"bridge": "vmbr0"}) == "virtio,bridge=vmbr0"


@pytest.mark.parametrize(("text", "bad"), [
    ('[{"Service":"a","State":"running","Health":"healthy"}]', []),
    ('{"Service":"a","State":"running","Health":""}\n{"Service":"b","State":"running","Health":"healthy"}', []),
    ('{"Service":"a","State":"running","Health":"starting"}', ["a: running/starting"]),
    ('{"Service":"a","State":"exited"}', ["a: exited"]),
    ("", ["no containers"]),
    ("[]", ["no containers"]),
    ("garbage", ["unreadable output 'garbage'"]),
])
def test_compose_health(text: str, bad: list[str]) -> None:
    assert deploy.compose_unhealthy(text) == bad


def test_a_plan_survives_the_journal(tmp_path: Path) -> None:
    disk = DataVolume("postgres", "disk", "scsi1", "/srv/postgres", False, volid="local-zfs:vm-101-disk-1")
    plan = DeployPlan("intranet", "swap", "d1", "v1", "/x.qcow2", "aa", "/s.iso", "bb", 102, 101, (disk,),
                      (Step("stop-blue-stack", "stop_stack", {"vmid": 101}, "stop"),), (),
                      (Step("start-blue", "start", {"vmid": 101}, "start"),), "stop-blue-stack")
    journal = Journal(tmp_path / "j.json")
    journal.record(plan)
    again = Journal(tmp_path / "j.json")
    assert DeployPlan.from_json(again.unfinished()["plan"]) == plan  # type: ignore[index]
    assert "-- cutover" in plan.describe()
    assert not list(tmp_path.glob(".journal-*")), "a temporary file was left"


def test_an_unreadable_journal_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "j.json").write_text("{")
    with pytest.raises(DeployError, match="not a readable journal"):
        Journal(tmp_path / "j.json")
