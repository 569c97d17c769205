"""What a deploy hands the role's testinfra suite: its context, and an ssh_config pinned to the VM's host key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder import verify
from builder.errors import VerifyError

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq3b5V0Kc2yqE1b3mI7o6ZyN0QFJ5m1dD9x6c1ZyQ7a root@intranet\n"


def test_the_pinned_config_trusts_only_the_given_host_key(tmp_path: Path) -> None:
    config = verify.pinned_ssh_config(tmp_path, "10.99.0.101", "admin", KEY)
    assert (tmp_path / "known_hosts").read_text() == f"10.99.0.101 {' '.join(KEY.split()[:2])}\n"
    text = config.read_text()
    assert text.startswith("Host 10.99.0.101\n  User admin\n")
    assert f"  UserKnownHostsFile {tmp_path / 'known_hosts'}\n" in text
    assert "  StrictHostKeyChecking yes\n" in text and "  GlobalKnownHostsFile /dev/null\n" in text
    assert f"  ControlPath {tmp_path}/cm-%C\n" in text  # never a connection the owner shares, checked with another key
    assert text.endswith("Match all\nInclude ~/.ssh/config\n")  # the owner's keys and settings apply after ours


@pytest.mark.parametrize("answer", ["", "not a key", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXkt"])
def test_anything_but_a_public_host_key_is_refused(tmp_path: Path, answer: str) -> None:
    with pytest.raises(VerifyError, match=r"^10\.99\.0\.101: .* is not an ssh public host key$"):
        verify.pinned_ssh_config(tmp_path, "10.99.0.101", "admin", answer)
    assert not (tmp_path / "known_hosts").exists()


def test_the_deploy_context_reads_the_images_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "intranet-0123456789ab.manifest.json"
    manifest.write_text(json.dumps({"version": "0123456789ab", "baked_files": {"/etc/x": "00"}}))
    expect = {"role": "intranet", "hostname": "intranet", "address": "10.99.0.101/24", "user": "admin",
              "manifest": str(manifest)}
    context = verify.deploy_context(expect, tmp_path / "qga.sock")
    assert context == {**expect, "manifest": {"version": "0123456789ab", "baked_files": {"/etc/x": "00"}},
                       "qga_socket": str(tmp_path / "qga.sock")}
    assert verify.deploy_context(expect)["qga_socket"] is None


def test_an_unreadable_manifest_is_a_verify_error(tmp_path: Path) -> None:
    expect = {"role": "intranet", "manifest": str(tmp_path / "gone.manifest.json")}
    with pytest.raises(VerifyError, match=r"^cannot read the image manifest .*gone\.manifest\.json: "):
        verify.deploy_context(expect)


@pytest.mark.host
def test_openssh_reads_the_pinned_config_as_meant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ssh -G` resolves the configuration without connecting: the real client, not a parse of our own. The owner's
    own block for the address still applies where ours says nothing, and never overrides the pin."""
    import subprocess

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host 10.99.0.101\n  IdentityFile ~/.ssh/homelab_key\n"
                                              "  StrictHostKeyChecking no\n  User someone\n")
    config = verify.pinned_ssh_config(tmp_path, "10.99.0.101", "admin", KEY)
    resolved = subprocess.run(["ssh", "-G", "-F", str(config), "10.99.0.101"], capture_output=True,
                              text=True, check=True).stdout.splitlines()
    assert {"hostname 10.99.0.101", "user admin", "stricthostkeychecking true", "batchmode yes",
            f"userknownhostsfile {tmp_path / 'known_hosts'}", "globalknownhostsfile /dev/null",
            "identityfile ~/.ssh/homelab_key"} <= set(resolved)
    assert any(line.startswith(f"controlpath {tmp_path}/cm-") for line in resolved), resolved
    (tmp_path / ".ssh" / "config").unlink()  # no ~/.ssh/config at all: the Include must not break the file
    subprocess.run(["ssh", "-G", "-F", str(config), "10.99.0.101"], capture_output=True, check=True)
