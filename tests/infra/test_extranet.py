"""VM-EXTRANET (the DMZ): Nginx Proxy Manager from baked images, healthy, on 80/443/81."""

from __future__ import annotations

from typing import Any

from testinfra.host import Host

from . import stack


def test_compose_config_is_valid(host: Host) -> None:
    stack.compose_config_is_valid(host)


def test_images_are_the_locked_ones(host: Host, expected: dict[str, Any]) -> None:
    stack.images_are_the_locked_ones(host, expected)


def test_every_service_is_running_and_healthy(host: Host) -> None:
    stack.every_service_is_running_and_healthy(host, {"npm"})


def test_published_ports_listen(host: Host) -> None:
    stack.listening(host, [80, 443, 81, 9100])


def test_env_files_are_private(host: Host) -> None:
    stack.env_files_are_private(host, ["/etc/homelab/npm.env"])


def test_nothing_is_pulled(host: Host, expected: dict[str, Any]) -> None:
    stack.nothing_is_pulled(host, expected)


# --- fail2ban: bans go into the firewall's set, which also covers what Docker forwards to NPM --------------------


def test_fail2ban_runs_both_jails(host: Host) -> None:
    service = host.service("fail2ban")
    assert service.is_enabled and service.is_running
    jails = host.check_output("sudo fail2ban-client status")
    assert "sshd" in jails and "npm" in jails, jails


def test_npm_jail_reads_npm_logs_on_the_logs_volume(host: Host) -> None:
    status = host.check_output("sudo fail2ban-client status npm")
    assert "/srv/logs/npm/fallback_http_access.log" in status, status
    assert host.service("homelab-fail2ban-npm.path").is_running


def test_jails_ban_with_the_homelab_action(host: Host) -> None:
    for jail in ("sshd", "npm"):
        assert host.check_output(f"sudo fail2ban-client get {jail} actions").split()[-1] == "homelab-nft", jail


def test_banned_set_is_there_for_the_action(host: Host) -> None:
    # What the action's actionstart checks: fail2ban's journal would otherwise show every ban failing.
    assert host.run("sudo nft list set inet homelab banned").rc == 0


# --- ddclient (OVH DynHost): the test site names a dynhost, so cloud-init wrote its config -----------------------


def test_ddclient_config_is_private_and_uses_usev4(host: Host) -> None:
    conf = host.file("/etc/ddclient.conf")
    assert conf.user == "root" and conf.group == "root" and conf.mode == 0o600
    lines = host.check_output("sudo cat /etc/ddclient.conf").splitlines()
    assert lines[0].startswith("# homelab: OVH DynHost"), "written by cloud-init, not Debian's debconf default"
    assert "protocol=ovh" in lines
    assert any(line.startswith("usev4=") for line in lines)
    assert not any(line.startswith("use=") for line in lines), "use= is deprecated since ddclient 3.11"


def test_ddclient_runs_on_that_config(host: Host) -> None:
    # The drop-in's ExecCondition passes only on the config cloud-init wrote (no internet in tests: updates fail).
    assert host.service("ddclient").is_enabled
    assert host.run("systemctl show -p ExecCondition ddclient.service").stdout.count("/etc/ddclient.conf") == 1
