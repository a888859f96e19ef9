"""What one soak found (bench/soak.py): plain data, read by its report (bench/soak_report.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.soak_resources import Sample, Slope


@dataclass
class Submitted:
    n: int
    kind: str
    id: int | None = None
    state: str | None = None  # as the driver last saw it
    approved: bool = False  # by the soak, through the listener
    error: str | None = None
    outcome: str | None = None  # state (reason), read from the database at the end
    events: list[str] = field(default_factory=list)  # kept for every job but a plain success


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Pauses:
    count: int = 0
    within_budget: int = 0
    stretched: int = 0  # past the budget while a fault made resuming impossible, yet in time
    violations: list[str] = field(default_factory=list)
    longest_s: float = 0.0
    longest_within_budget_s: float = 0.0
    latest_after_fault_s: float | None = None  # running after the end of the fault stretching it


@dataclass
class Result:
    minutes: float
    seed: int
    guests: list[str]
    jobs: list[Submitted]
    outcomes: dict[str, dict[str, int]]  # job kind -> outcome -> count
    faults: list[dict[str, Any]]
    pauses: Pauses
    slopes: list[Slope]
    samples: list[Sample]
    checks: list[Check]
    settle_s: float

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)
