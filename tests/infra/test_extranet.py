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
