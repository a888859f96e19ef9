"""The fleet benchmark at a small size: its rollout is real and its figures add up."""

from __future__ import annotations

import dataclasses

import libvirt

from bench import fleet


def test_the_fleet_bench_runs_a_real_rollout_and_reports_its_figures() -> None:
    real_open = libvirt.open
    (f,) = fleet.bench(["--hosts", "6", "--guests-per-host", "3", "--domains", "2"])

    assert f.ok, f.problems
    assert f.state == "succeeded"
    assert (f.guests_running, f.guests_total) == (18, 18)
    assert f.waves == 2
    assert 1 <= f.connections_peak <= 6
    assert f.connections_opened == 6  # one connection per host URI, each opened once
    assert f.connections_open_at_end == 0
    assert f.rollout_s is not None and f.rollout_s > 0
    assert f.wave_s_max is not None and f.wave_s_max <= f.rollout_s
    # A wave takes at least its slowest host's cycle; overhead is what the controller adds.
    assert f.overhead_s_median is not None and f.overhead_s_median >= 0
    assert f.rss_peak_mb is not None and f.rss_base_mb is not None
    assert f.rss_peak_mb >= f.rss_base_mb
    assert f.events_per_guest is not None and f.events_per_guest >= 3  # paused, resumed, synced
    assert set(f.phases_ms) >= {"claim_to_preflight", "runbook", "resumes"}
    assert libvirt.open is real_open  # the connection counter is uninstalled


def test_several_runs_get_a_row_with_the_range_of_each_figure() -> None:
    one = fleet.Figures(
        hosts=2, guests_per_host=1, domains=1, max_parallel_hosts=None, database="x"
    )
    runs = [dataclasses.replace(one, rollout_s=s) for s in (1.0, 2.5, 2.0)]
    last = fleet.table(runs).splitlines()[-1]
    assert last.startswith("| **range** |")
    assert "| 1.000-2.500 |" in last
