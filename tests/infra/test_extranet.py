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
