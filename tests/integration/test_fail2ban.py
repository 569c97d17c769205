"""The extranet's fail2ban files, run by the real fail2ban (marked `host`: local programs, no VM).

The files are laid out as the image bakes them (images/extranet.yaml `files` under /etc/fail2ban), then:

- fail2ban-regex with the npm-proxy filter over NPM's log lines (tests/fixtures/fail2ban/*.log) finds exactly the
  addresses listed beside them (*.expected): 401/403/404 answers, never 2xx/3xx/5xx, never a "404" or "[Client"
  inside a path, user agent or referer;
- fail2ban-client's config dump shows both jails with the homelab-nft action, sshd on the journal;
- the homelab-nft action, run by fail2ban's own action code inside a throwaway network namespace (the host's
  firewall is never touched), adds the address to `inet homelab` set `banned` with the ban's timeout, removes it
  on unban (also when the kernel dropped it first), and refuses to start, creating nothing, without the set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from builder.definition import load_role
from builder.runner import run
from tests.conftest import FIXTURES, PROJECT

pytestmark = pytest.mark.host

CASES = FIXTURES / "fail2ban"
HELPER = Path(__file__).resolve().parent / "fail2ban_action.py"
ACTION = "homelab-nft"
# The firewall's table as homelab-firewall.service loads it, reduced to the set the action uses.
FIREWALL = "table inet homelab {\n  set banned {\n    type ipv4_addr\n    flags timeout\n  }\n}\n"


def _tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} is not installed: run ./setup.sh")
    return path


@pytest.fixture(scope="module")
def confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """/etc/fail2ban as in the extranet image: Debian's package defaults, then the definition's baked files."""
    _tool("fail2ban-client")
    root = tmp_path_factory.mktemp("fail2ban")
    shutil.copytree("/etc/fail2ban", root, dirs_exist_ok=True)
    baked = 0
    for entry in load_role(PROJECT, "extranet")["files"]:
        if entry["dest"].startswith("/etc/fail2ban/"):
            target = root / entry["dest"].removeprefix("/etc/fail2ban/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(PROJECT / entry["src"], target)
            baked += 1
    assert baked == 3, "jail, filter and action are baked under /etc/fail2ban"
    return root


def _interpreter() -> str:
    """The Python fail2ban is installed for: the one its own scripts run with."""
    first = Path(_tool("fail2ban-client")).read_text(encoding="utf-8").splitlines()[0]
    return first.removeprefix("#!").split()[0]


# --- the filter --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log", sorted(CASES.glob("*.log")), ids=lambda p: p.stem)
def test_filter_finds_exactly_the_expected_addresses(confdir: Path, log: Path) -> None:
    result = run([_tool("fail2ban-regex"), "--out", "ip", log, confdir / "filter.d" / "npm-proxy.conf"])
    expected = log.with_suffix(".expected").read_text(encoding="utf-8").split()
    assert result.stdout.split() == expected


# --- the jails ---------------------------------------------------------------------------------------------------


def test_both_jails_ban_through_the_firewall_set(confdir: Path) -> None:
    # The commands the client would send the server, one Python list per line (no log file needed).
    out = run([_tool("fail2ban-client"), "--conf", confdir, "--dump"]).stdout
    for jail in ("sshd", "npm"):
        assert f"['add', '{jail}', " in out, jail
        assert f"['set', '{jail}', 'addaction', '{ACTION}']" in out, jail
    assert "['add', 'sshd', 'systemd']" in out, "sshd reads the journal: Debian 13 has no auth.log"
    assert "['add', 'npm', 'polling']" in out
    assert "'addaction', 'nftables'" not in out, "no jail keeps Debian's own nftables action"
    assert "['set', 'npm', 'addignoreip', '127.0.0.0/8', '::1', '172.16.0.0/12']" in out, "Docker's bridges"


# --- the action, in a network namespace --------------------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"homelab-f2b-{os.getpid()}"
    run([_tool("ip"), "netns", "add", name])
    try:
        yield name
    finally:
        run([_tool("ip"), "netns", "delete", name], check=False)


def _nft(netns: str, *args: str, input_text: str | None = None) -> str:
    return run([_tool("ip"), "netns", "exec", netns, _tool("nft"), *args], input_text=input_text).stdout


def _banned(netns: str) -> dict[str, int]:
    """Address -> timeout (s) of each element of the set."""
    data = json.loads(_nft(netns, "-j", "list", "set", "inet", "homelab", "banned"))
    elements = next(item["set"] for item in data["nftables"] if "set" in item).get("elem", [])
    return {e["elem"]["val"]: e["elem"]["timeout"] for e in elements}


class Fail2banAction:
    """fail2ban's own action object for homelab-nft, in a process inside the namespace, one operation per call."""

    def __init__(self, confdir: Path, netns: str, log: IO[str]) -> None:
        argv = [_tool("ip"), "netns", "exec", netns, _interpreter(), HELPER, confdir, ACTION]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)

    def __call__(self, *words: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(" ".join(words) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture
def action(confdir: Path, netns: str, tmp_path: Path) -> Iterator[Fail2banAction]:
    with open(tmp_path / "fail2ban.log", "w", encoding="utf-8") as log:
        running = Fail2banAction(confdir, netns, log)
        try:
            yield running
        finally:
            running.close()


def test_ban_adds_the_address_with_the_ban_time_and_unban_removes_it(netns: str, action: Fail2banAction) -> None:
    _nft(netns, "-f", "-", input_text=FIREWALL)
    assert action("start") == "ok"
    assert action("ban", "203.0.113.7", "600") == "ok"
    assert _banned(netns) == {"203.0.113.7": 600}
    assert action("ban", "203.0.113.8", "3600") == "ok"
    assert _banned(netns) == {"203.0.113.7": 600, "203.0.113.8": 3600}
    assert action("unban", "203.0.113.7") == "ok"
    assert _banned(netns) == {"203.0.113.8": 3600}


def test_unban_after_the_kernel_dropped_the_element_is_no_error(netns: str, action: Fail2banAction) -> None:
    _nft(netns, "-f", "-", input_text=FIREWALL)
    assert action("ban", "203.0.113.9", "600") == "ok"
    _nft(netns, "delete", "element", "inet", "homelab", "banned", "{ 203.0.113.9 }")  # as if its timeout ended
    assert action("unban", "203.0.113.9") == "ok"
    assert _banned(netns) == {}


def test_an_ipv6_address_is_not_put_in_the_ipv4_set(netns: str, action: Fail2banAction) -> None:
    _nft(netns, "-f", "-", input_text=FIREWALL)
    assert action("ban", "2001:db8::7", "600") == "ok"
    assert _banned(netns) == {}


def test_without_the_firewall_the_action_fails_and_creates_nothing(netns: str, action: Fail2banAction) -> None:
    assert action("start").startswith("error:")
    assert action("ban", "203.0.113.7", "600").startswith("error:")
    assert _nft(netns, "list", "ruleset").strip() == ""
