"""Checks of a role's compose stack, shared by the role suites (test_intranet.py, test_extranet.py)."""

from __future__ import annotations

import json
from typing import Any

from testinfra.host import Host

COMPOSE = ("sudo docker compose --project-name homelab --env-file /run/homelab/stack.env"
           " -f /opt/homelab/compose/compose.yaml")


def compose_config_is_valid(host: Host) -> None:
    host.check_output(f"{COMPOSE} config --quiet")


def containers(host: Host) -> list[dict[str, Any]]:
    out = host.check_output(f"{COMPOSE} ps --all --format json")
    # compose v2.26 prints one JSON object per line.
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def every_service_is_running_and_healthy(host: Host, services: set[str]) -> None:
    state = {c["Service"]: (c["State"], c.get("Health", "")) for c in containers(host)}
    assert set(state) == services, state
    unhealthy = {name: s for name, s in state.items() if s != ("running", "healthy")}
    assert not unhealthy, unhealthy


def images_are_the_locked_ones(host: Host, expected: dict[str, Any]) -> None:
    locked: dict[str, dict[str, str]] = expected["manifest"]["container_images"]
    assert locked, "the manifest lists no container images"
    for image, entry in locked.items():
        assert host.check_output(f"sudo docker image inspect --format '{{{{.Id}}}}' {image}") == entry["config_digest"]
    assert host.file("/var/lib/homelab/images-loaded").exists


def listening(host: Host, ports: list[int]) -> None:
    for port in ports:
        assert host.socket(f"tcp://0.0.0.0:{port}").is_listening or host.socket(f"tcp://:::{port}").is_listening, port


def env_files_are_private(host: Host, paths: list[str]) -> None:
    for path in paths:
        env_file = host.file(path)
        assert env_file.exists, path
        assert (env_file.user, env_file.group, env_file.mode) == ("root", "root", 0o600), path


def nothing_is_pulled(host: Host, expected: dict[str, Any]) -> None:
    # A pulled image records the registry digest it came from; one `docker load`ed from the image has none.
    for image in expected["manifest"]["container_images"]:
        digests = host.check_output(f"sudo docker image inspect --format '{{{{json .RepoDigests}}}}' {image}")
        assert json.loads(digests) in ([], None), (image, digests)
