"""VM-EXTRANET (the DMZ): Nginx Proxy Manager from baked images, healthy, on 80/443/81; OpenVPN installed, running
when the secrets gave its keys and skipped (never failed) when they did not; forwarding on for its clients."""

from __future__ import annotations

from typing import Any

from testinfra.host import Host

from builder.vpn import KEY_PATH, PEM_SECRETS, SERVER_CONF, SITE_CONF

from . import stack

VPN_UNIT = "openvpn-server@homelab.service"


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
    timer = host.service("homelab-fail2ban-npm.timer")
    assert timer.is_enabled and timer.is_running


def test_a_new_proxy_host_log_is_picked_up_by_the_npm_jail(host: Host) -> None:
    # What the timer runs: a proxy host NPM creates later gets its log read without a reboot.
    log = "/srv/logs/npm/proxy-host-999_access.log"
    try:
        host.check_output(f"sudo touch {log}")
        out = host.check_output("sudo /usr/local/libexec/homelab/fail2ban-npm-logs")
        assert "reloading the npm jail" in out, out
        assert log in host.check_output("sudo fail2ban-client get npm logpath")
        # Nothing new the second time: no reload.
        assert host.check_output("sudo /usr/local/libexec/homelab/fail2ban-npm-logs") == ""
    finally:
        host.run(f"sudo rm -f {log}")
        host.run("sudo fail2ban-client reload npm")


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


def _unit(host: Host, unit: str) -> dict[str, str]:
    out = host.check_output(f"systemctl show -p LoadState,UnitFileState,ConditionResult,ActiveState,Result {unit}")
    return dict(line.split("=", 1) for line in out.splitlines())


def test_openvpn_is_installed_and_enabled(host: Host) -> None:
    assert host.package("openvpn").is_installed
    assert host.file(SERVER_CONF).exists
    unit = _unit(host, VPN_UNIT)
    assert (unit["LoadState"], unit["UnitFileState"]) == ("loaded", "enabled"), unit


def test_openvpn_runs_with_its_keys_or_is_skipped_without(host: Host) -> None:
    unit = _unit(host, VPN_UNIT)
    if not host.run(f"sudo test -e {KEY_PATH}").succeeded:
        # No VPN secrets (the VM tests' secrets have none): the drop-in's condition skips it, nothing fails.
        assert (unit["ConditionResult"], unit["ActiveState"], unit["Result"]) == ("no", "inactive", "success"), unit
        assert not host.file(SITE_CONF).exists
        return
    assert unit["ActiveState"] == "active", unit
    assert host.socket("udp://0.0.0.0:1194").is_listening
    assert host.interface("tun0").exists
    for secret in PEM_SECRETS:
        mode = host.check_output(f"sudo stat -c '%U:%G %a' {secret.path}")
        assert mode == "root:root 600", (secret.path, mode)


def test_ip_forwarding_is_on_for_the_vpn(host: Host) -> None:
    # Read from /proc: the image need not have procps; systemd-sysctl applies sysctl.d itself.
    assert host.file("/proc/sys/net/ipv4/ip_forward").content_string.strip() == "1"
    assert host.file("/etc/sysctl.d/60-homelab-forward.conf").contains("^net.ipv4.ip_forward = 1$")


def test_docker_left_the_forward_policy_alone(host: Host) -> None:
    # Forwarding was on before Docker started, so Docker did not set FORWARD to DROP (which would drop the VPN's
    # clients on their way to the LAN); the homelab table's forward chain is what filters.
    policy = host.check_output("sudo iptables -S FORWARD").splitlines()[0]
    assert policy == "-P FORWARD ACCEPT", policy


def test_proxy_hosts_unit_is_enabled_and_not_failed(host: Host) -> None:
    """homelab-npm-proxy-hosts.service is baked and enabled. The test site declares no proxy_hosts, so cloud-init
    writes no /etc/homelab/npm-proxy-hosts.json and the unit is skipped by its condition: never failed."""
    unit = "homelab-npm-proxy-hosts.service"
    assert host.service(unit).is_enabled
    assert host.file("/usr/local/libexec/homelab/npm-apply").mode == 0o755
    state = host.run(f"systemctl show --property=ActiveState,Result,ConditionResult {unit}").stdout
    assert "ActiveState=failed" not in state
    assert "Result=success" in state
    if not host.file("/etc/homelab/npm-proxy-hosts.json").exists:
        assert "ConditionResult=no" in state, state
