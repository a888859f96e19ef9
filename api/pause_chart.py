"""The dashboard's chart of guest pauses over recent jobs, laid out for an inline SVG.

Pauses are milliseconds and the budget tens of seconds, so the scale is logarithmic: on a linear
one every pause would sit on the floor under the budget line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from controller.services.dashboard import JobPauses

WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 18, 36
MIN_MS = 1.0


@dataclass(frozen=True)
class Dot:
    x: float
    y: float
    over: bool
    title: str


@dataclass(frozen=True)
class Column:
    x: float
    label: str
    dots: list[Dot]
    worst_y: float


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    left: int
    right: float
    top: int
    bottom: float
    grid: list[tuple[float, str]]  # y, label: one line per decade
    budget_y: float
    budget_label: str
    columns: list[Column]


def _label(ms: float) -> str:
    return f"{ms / 1000:g} s" if ms >= 1000 else f"{ms:g} ms"


def pause_chart(history: list[JobPauses], *, budget_seconds: float) -> Chart:
    budget_ms = budget_seconds * 1000
    values = [ms for job in history for ms in job.pauses_ms]
    low = 10 ** math.floor(math.log10(max(MIN_MS, min(values, default=MIN_MS))))
    high = 10 ** math.ceil(math.log10(max(budget_ms * 1.5, *values, MIN_MS * 10)))
    span = math.log10(high) - math.log10(low)
    plot_h = HEIGHT - TOP - BOTTOM
    plot_w = WIDTH - LEFT - RIGHT

    def y(ms: float) -> float:
        return round(TOP + plot_h * (1 - (math.log10(max(ms, low)) - math.log10(low)) / span), 1)

    grid = []
    decade = low
    while decade <= high:
        grid.append((y(decade), _label(decade)))
        decade *= 10
    step = plot_w / max(len(history), 1)
    columns = []
    for i, job in enumerate(history):
        center = LEFT + step * (i + 0.5)
        width = min(step * 0.6, 40)
        count = len(job.pauses_ms)
        dots = [
            Dot(
                x=round(center - width / 2 + width * (k + 0.5) / count, 1),
                y=y(ms),
                over=ms > job.pause_budget_seconds * 1000,
                title=f"job {job.job_id}: {ms:.1f} ms",
            )
            for k, ms in enumerate(job.pauses_ms)
        ]
        columns.append(Column(round(center, 1), f"#{job.job_id}", dots, y(max(job.pauses_ms))))
    return Chart(
        width=WIDTH,
        height=HEIGHT,
        left=LEFT,
        right=WIDTH - RIGHT,
        top=TOP,
        bottom=HEIGHT - BOTTOM,
        grid=grid,
        budget_y=y(budget_ms),
        budget_label=f"budget {_label(budget_ms)}",
        columns=columns,
    )
