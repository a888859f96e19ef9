"""The soak's own judgement (bench/soak_faults.py, bench/soak_resources.py), on made-up samples:
when faults come, and what counts as growth."""

from __future__ import annotations

from typing import Any

import pytest

from bench.soak_faults import KINDS, RESTARTS, Injector
from bench.soak_resources import ProcessFigures, Sample, slopes


def _schedule(seed: int, minutes: float, every: tuple[float, float]) -> list[tuple[float, str]]:
    injector: Any = object.__new__(Injector)
    injector.seed, injector.kinds, injector.every = seed, KINDS, every
    end = minutes * 60
    following = injector.schedule(0.0, end - 15, restarts_until=end / 3)
    drawn = []
    while (nxt := following()) is not None:
        drawn.append(nxt)
    return drawn


@pytest.mark.parametrize("seed", [3, 7, 11, 12])
def test_the_controller_restarts_come_in_the_first_third_and_each_comes(seed: int) -> None:
    drawn = _schedule(seed, 30, (60.0, 180.0))
    restarts = [(at, kind) for at, kind in drawn if kind in RESTARTS]
    assert {kind for _, kind in restarts} == set(RESTARTS)
    assert all(at < 600 for at, _ in restarts)
    assert {kind for _, kind in drawn} == set(KINDS)  # the others keep coming


def _sample(t: float, controller: tuple[int, float], guardians: list[float]) -> Sample:
    pid, rss = controller
    c = ProcessFigures(processes=1, rss_mb=rss, threads=30, fds=30, pids=[pid])
    g = ProcessFigures(processes=len(guardians), rss_mb=sum(guardians), threads=len(guardians))
    listener = ProcessFigures(processes=1, rss_mb=90, threads=1, fds=9, pids=[pid + 1])
    return Sample(t, {"controller": c, "listener": listener, "guardians": g}, pid, None, None)


def _fit(samples: list[Sample], role: str, figure: str) -> float | None:
    found = {(s.role, s.figure): s for s in slopes(samples, duration=1800, faults=[])}
    return found[(role, figure)].per_10_min


def test_a_process_warm_up_is_not_growth_but_growth_after_it_is() -> None:
    # One controller from minute 8: 1 MB a minute for five minutes, then flat.
    flat = [_sample(t, (100, 140 + min(t - 480, 300) / 60), [31.7]) for t in range(480, 1800, 10)]
    assert abs(_fit(flat, "controller", "rss_mb") or 0) < 0.01
    # The same, still growing by 0.3 MB a minute after its warm-up: 3 MB per 10 minutes.
    growing = [_sample(t, (100, 140 + (t - 480) * 0.3 / 60), [31.7]) for t in range(480, 1800, 10)]
    assert _fit(growing, "controller", "rss_mb") == pytest.approx(3.0, abs=0.05)


def test_guardians_are_judged_each_and_by_their_number() -> None:
    # One guardian alive now and then (none in between): not growth.
    coming_and_going = [
        _sample(t, (100, 140), [31.7] if (t // 60) % 2 else []) for t in range(0, 1800, 10)
    ]
    assert _fit(coming_and_going, "guardians", "rss_mb") == pytest.approx(0.0, abs=0.01)
    assert abs(_fit(coming_and_going, "guardians", "processes") or 0) < 1
    # Guardians that never leave: one more every 3 minutes.
    piling = [_sample(t, (100, 140), [31.7] * (1 + t // 180)) for t in range(0, 1800, 10)]
    assert (_fit(piling, "guardians", "processes") or 0) > 3
    assert _fit(piling, "guardians", "rss_mb") == pytest.approx(0.0, abs=0.01)
