"""Downtime of a blue-green swap on the local provider vs an in-place restart of the same stack on the same VM
(issue 4's goal: swap <= 1.5x restart).

Both are measured from outside, as a user sees them: a client in the site's LAN zone (a network namespace on the
test bridge, tests/netlab.py) asks a service's own health endpoint every 0.5 s. The downtime of an operation is
the sum of its outages, each from the last answer before it failed to the first answer after (a swap can have
more than one: green joining the bridge, then the cutover). In one run:

1. build the role (stacks locked against stand-in images on loopback, as the VM tests do) and deploy it first;
2. restart in place: `docker compose down && docker compose up --detach --wait` of the stack on the live VM, over ssh;
3. build again with a changed motd (a new version) and swap to it (the same plan as `homelab deploy --swap`);
   with ROUNDS > 1, steps 2 and 3 again on the VM that serves (the in-place figure varies a lot between runs);
   the medians are compared.

    .venv/bin/python -m bench.swap_vs_restart [role] [ROUNDS]     (about 15 minutes a round under TCG on 2 cores)
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from bench._common import TEST_SECRETS, TEST_SITE, project_copy, report
from builder import localvm
from builder.build import execute_build, plan_build
from builder.localprovider import LocalProvider, deploy_local
from builder.runner import run
from builder.settings import Settings
from builder.site import load_site
from tests.netlab import ZoneNetwork

MEMORY_MB = 3072  # blue and green run side by side while green is verified
INTERVAL = 0.5
# A service of each role whose own health endpoint answers the LAN (the firewall matrix allows it).
HEALTH = {"intranet": (8096, "/health"), "extranet": (81, "/api/")}
COMPOSE = "sudo docker compose --project-name homelab --env-file /run/homelab/stack.env"
SERVING_TIMEOUT = 900.0
T = TypeVar("T")

# A probe waits this long for its answer: a slow answer is still an answer (not an outage). Probes start every
# INTERVAL whatever the earlier ones do, each in its own thread, so a hanging probe (no host on the address while
# the link moves) does not delay the next one.
PROBE_TIMEOUT = 5.0

# Runs inside the LAN client's namespace: one line per probe, "<monotonic start> ok|down", in the order answered.
PROBE_LOOP = """
import sys, threading, time, urllib.request
url, interval, timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
out = threading.Lock()  # print() writes the text and the newline apart: threads would interleave them
def probe(started):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            state = "ok" if answer.status == 200 else "down"
    except Exception:
        state = "down"
    with out:
        sys.stdout.write(f"{started:.3f} {state}\\n")
        sys.stdout.flush()
while True:
    started = time.monotonic()
    threading.Thread(target=probe, args=(started,), daemon=True).start()
    time.sleep(max(0.0, interval - (time.monotonic() - started)))
"""


@dataclass
class Prober:
    """The outside client's probes while an operation runs (CLOCK_MONOTONIC is shared with the namespace)."""

    namespace: str
    url: str
    samples: list[tuple[float, bool]] = field(default_factory=list)

    def __enter__(self) -> Prober:
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.namespace, "python3", "-c", PROBE_LOOP, self.url,
                                      str(INTERVAL), str(PROBE_TIMEOUT)], stdout=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            stamp, state = line.split()
            self.samples.append((float(stamp), state == "ok"))

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait()
        self.reader.join(timeout=5)

    def ordered(self) -> list[tuple[float, bool]]:
        """The probes answered so far, by the time each started (answers arrive out of order)."""
        return sorted(list(self.samples))

    def serving(self) -> bool:
        probes = self.ordered()
        return bool(probes) and probes[-1][1]

    def wait_serving(self, timeout: float = SERVING_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.serving():
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.url} did not answer within {timeout:.0f} s")
            time.sleep(INTERVAL)

    def outages(self, since: float) -> list[tuple[float, float]]:
        """Every outage after `since`: (last answer before it, first answer after it), in monotonic seconds."""
        probes = [s for s in self.ordered() if s[0] >= since]
        out: list[tuple[float, float]] = []
        last_up = probes[0][0] if probes else since
        down = False
        for stamp, ok in probes:
            if ok and down:
                out.append((last_up, stamp))
            if ok:
                last_up = stamp
            down = not ok
        if down:
            raise SystemExit(f"{self.url} did not answer again")
        return out

    def downtime(self, since: float) -> float:
        """All the time without an answer after `since` (a swap may have more than one outage: count them all)."""
        outages = self.outages(since)
        if not outages:
            raise SystemExit(f"{self.url} never stopped answering: nothing was measured")
        for start, end in outages:
            print(f"  outage of {end - start:.1f} s, {start - since:.1f} s after the operation started", flush=True)
        return round(sum(end - start for start, end in outages), 1)


def build(settings: Settings, role: str) -> None:
    execute_build(settings, plan_build(settings, role))


def deploy(settings: Settings, role: str, bridge: str, swap: bool) -> tuple[int, float | None]:
    started = time.monotonic()  # each step's line says when it started: where a swap's downtime goes
    outcome = deploy_local(settings, role, TEST_SITE, TEST_SECRETS, swap=swap, bridge=bridge, memory_mb=MEMORY_MB,
                           on_step=lambda line: print(f"  {time.monotonic() - started:6.1f} s  {line}", flush=True))
    return outcome.vmid, outcome.downtime_s


def restart_in_place(settings: Settings, role: str, vmid: int) -> float:
    """Restart the stack in place; the seconds until `up --wait` returned (every service healthy again)."""
    state = LocalProvider(settings, role).state(vmid)
    assert state is not None, f"local VM {vmid} is not running"
    command = f"cd /opt/homelab/compose && {COMPOSE} down && {COMPOSE} up --detach --wait"
    started = time.monotonic()
    run(localvm.ssh_argv(state, command), timeout=SERVING_TIMEOUT)
    return round(time.monotonic() - started, 1)


def change_motd(settings: Settings, round_number: int) -> None:
    motd = settings.project / "images" / "files" / "common" / "homelab-motd"
    motd.write_text(motd.read_text() + f"\nThe bench's build {round_number + 2}.\n")


def stop_all(settings: Settings, role: str) -> None:
    provider = LocalProvider(settings, role)
    for vm in provider.vms():
        provider.stop(vm.vmid)


def measure(prober: Prober, operation: Callable[[], T]) -> tuple[float, T]:
    """The operation's downtime as the prober saw it, and what the operation returned."""
    prober.wait_serving()
    since = time.monotonic()
    result = operation()
    prober.wait_serving()
    time.sleep(PROBE_TIMEOUT + INTERVAL)  # probes started before the last answer may still be waiting for theirs
    return prober.downtime(since), result


def main(role: str = "intranet", rounds: str = "1") -> None:
    port, path = HEALTH[role]
    address = str(load_site(TEST_SITE).host(role).address).split("/")[0]
    url = f"http://{address}:{port}{path}"
    restarts: list[float] = []
    restarts_healthy: list[float] = []  # down && up --wait, until it returned
    swaps: list[float] = []
    recorded: list[float] = []
    with project_copy() as settings, ZoneNetwork(without=("dmz",) if role == "extranet" else ()) as network:
        lan = next(c for c in network.clients if c.zone == "lan").namespace
        try:
            build(settings, role)
            live, _ = deploy(settings, role, network.bridge, swap=False)
            # Each round side by side on the VM that serves: an in-place restart, then a swap to a new build.
            for number in range(int(rounds)):
                with Prober(lan, url) as prober:
                    restart, healthy = measure(prober, partial(restart_in_place, settings, role, live))
                restarts.append(restart)
                restarts_healthy.append(healthy)
                print(f"round {number + 1}: in-place restart, {restart} s of downtime, every service healthy after "
                      f"{healthy} s", flush=True)
                change_motd(settings, number)
                build(settings, role)
                with Prober(lan, url) as prober:
                    swap, (live, journal_downtime) = measure(prober, partial(deploy, settings, role, network.bridge,
                                                                             True))
                swaps.append(swap)
                if journal_downtime is not None:  # a swap that never passed its gate has none: not a 0
                    recorded.append(journal_downtime)
                print(f"round {number + 1}: swap, {swaps[-1]} s of downtime seen, {journal_downtime} s recorded",
                      flush=True)
        finally:
            stop_all(settings, role)
    restart, swap = statistics.median(restarts), statistics.median(swaps)
    figures = [(f"{role}: in-place compose down && up --wait, downtime (median of {len(restarts)})", restart),
               (f"{role}: swap, downtime seen from the LAN (median of {len(swaps)})", swap)]
    # Until every service is healthy, not only the probed one: the in-place command's own time (it includes the
    # ssh login) and the swap's journal (blue's stack stopped -> green's health gate passed).
    figures.append((f"{role}: in-place, until up --wait returned (median of {len(restarts_healthy)})",
                    statistics.median(restarts_healthy)))
    if recorded:
        figures.append((f"{role}: swap, downtime the deploy journal recorded (median of {len(recorded)})",
                        statistics.median(recorded)))
    report(figures, "swap downtime / in-place restart downtime", swap, restart, "<= 1.5x")
    if recorded:
        print(f"until every service is healthy, journal / in-place up --wait: "
              f"{statistics.median(recorded) / statistics.median(restarts_healthy):.2f}x (no goal)")


if __name__ == "__main__":
    main(*sys.argv[1:])
