"""Secrets never enter an image: every built image is scanned for every test secret, and none is found."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.build import latest_build
from builder.definition import known_roles
from builder.settings import Settings
from builder.site import load_secrets

from .conftest import TEST_SECRETS, homelab

pytestmark = pytest.mark.vm
CHUNK = 1 << 24


def occurrences(image: Path, needles: list[bytes]) -> set[bytes]:
    """Which needles appear anywhere in the file (chunks overlap so a needle across a boundary is found)."""
    longest = max(len(n) for n in needles)
    found: set[bytes] = set()
    tail = b""
    with image.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            window = tail + chunk
            found.update(n for n in needles if n in window)
            tail = window[-longest:]
    return found


@pytest.mark.parametrize("role", ["intranet", "extranet"])
def test_no_test_secret_is_in_the_image(role: str, settings: Settings, stack_project: Path) -> None:
    assert role in known_roles(stack_project)
    homelab("build", "image", role)
    manifest = latest_build(settings, role)
    assert manifest is not None
    image = Path(manifest["path"])
    secrets = load_secrets(TEST_SECRETS)
    # The roles' secrets (common holds TZ_NAME, a time zone name every tzdata carries).
    values = sorted({v.encode() for name, section in secrets.items() if name != "common" for v in section.values()})
    assert values
    # The scan sees file contents in this (uncompressed) qcow2: a string baked from the compose stack is found.
    assert occurrences(image, [b"pull_policy: never"]) == {b"pull_policy: never"}
    assert occurrences(image, values) == set()
