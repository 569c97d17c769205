"""bench/swap_vs_restart's outage arithmetic: probes answer out of order; every outage counts, a slow answer none."""

from __future__ import annotations

import pytest

from bench.swap_vs_restart import Prober


def prober(*samples: tuple[float, bool]) -> Prober:
    probe = Prober("lan", "http://10.99.0.101:8096/health")
    probe.samples.extend(samples)  # as the reader thread appends them: in the order they were answered
    return probe


def test_outages_follow_when_probes_started_not_when_they_answered() -> None:
    # 10.5 hung (no host while the link moved) and answered "down" after 11.0 and 11.5 had answered.
    probe = prober((10.0, True), (11.0, False), (11.5, False), (10.5, False), (12.0, True), (12.5, True))
    assert probe.outages(since=9.0) == [(10.0, 12.0)]
    assert probe.downtime(since=9.0) == 2.0
    assert probe.serving()


def test_every_outage_of_an_operation_is_summed() -> None:
    probe = prober((1.0, True), (1.5, False), (2.0, True), (5.0, True), (5.5, False), (6.0, False), (8.0, True))
    assert probe.outages(since=0.0) == [(1.0, 2.0), (5.0, 8.0)]
    assert probe.downtime(since=0.0) == 4.0


def test_a_service_still_down_at_the_end_is_no_figure() -> None:
    probe = prober((1.0, True), (1.5, False))
    assert not probe.serving()
    with pytest.raises(SystemExit, match="did not answer again"):
        probe.outages(since=0.0)


def test_a_service_that_never_stopped_is_no_figure() -> None:
    with pytest.raises(SystemExit, match="never stopped answering"):
        prober((1.0, True), (1.5, True)).downtime(since=0.0)


def test_the_probe_loop_is_valid_python() -> None:
    """It runs as `python3 -c` in the LAN namespace: a syntax error there only shows as a probe that never answers."""
    from bench.swap_vs_restart import PROBE_LOOP

    compile(PROBE_LOOP, "probe", "exec")
