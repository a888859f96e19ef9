"""The soak's tables (Markdown, as docs/benchmarks.md shows them) and its plot (matplotlib)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from bench.soak_faults import KINDS
from bench.soak_resources import FIGURES, ROLES, ProcessFigures
from bench.soak_result import Result


def _table(heads: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def outcome_table(result: Result) -> str:
    kinds = [k for k in ("nap", "staged", "notice", "approved") if k in result.outcomes]
    outcomes = sorted({o for by_kind in result.outcomes.values() for o in by_kind})
    rows: list[list[object]] = [
        [
            o,
            *(result.outcomes[k].get(o, 0) for k in kinds),
            sum(result.outcomes[k].get(o, 0) for k in kinds),
        ]
        for o in outcomes
    ]
    totals = [sum(result.outcomes[k].values()) for k in kinds]
    rows.append(["**all**", *totals, sum(totals)])
    approved = sum(1 for j in result.jobs if j.approved)
    return _table(["outcome", *kinds, "all"], rows) + (
        f"\n\nThe soak's guest approved {approved} of the `approved` jobs through the metadata "
        "listener (answered 200; the guests' freeze hooks approve too, whichever comes first)."
    )


def fault_table(result: Result) -> str:
    by_kind: dict[str, list[dict[str, object]]] = {}
    for f in result.faults:
        by_kind.setdefault(str(f["kind"]), []).append(f)
    rows: list[list[object]] = []
    for kind in [k for k in KINDS if k in by_kind]:
        faults = by_kind[kind]
        seconds = [float(f["seconds"]) for f in faults if f["seconds"] is not None]  # type: ignore[arg-type]
        errors = [f["error"] for f in faults if f["error"]]
        rows.append(
            [
                kind,
                len(faults),
                ", ".join(f"{f['at_s']:.0f}" for f in faults),
                f"{min(seconds):.1f}-{max(seconds):.1f}" if seconds else "-",
                "; ".join(str(e) for e in errors) or "-",
            ]
        )
    rows.append(["**all**", len(result.faults), "", "", ""])
    return _table(["fault", "count", "at (s into the run)", "lasted (s)", "errors"], rows)


def pause_table(result: Result) -> str:
    p = result.pauses
    after = "-" if p.latest_after_fault_s is None else f"{p.latest_after_fault_s:.2f}"
    rows: list[list[object]] = [
        ["guest pauses seen by the witness", p.count],
        ["within the budget (8 s)", p.within_budget],
        ["past the budget while a fault made a resume impossible, running in time", p.stretched],
        ["violations", len(p.violations)],
        ["longest pause within the budget (s)", f"{p.longest_within_budget_s:.2f}"],
        ["longest pause (s)", f"{p.longest_s:.2f}"],
        ["latest running after the end of the fault that stretched it (s)", after],
    ]
    return _table(["guest pauses", ""], rows)


def slope_table(result: Result) -> str:
    rows: list[list[object]] = []
    for s in result.slopes:
        value = "-" if s.per_10_min is None else f"{s.per_10_min:+.3f}"
        rows.append([s.role, s.figure, value, f"< {s.limit:g}", s.points, "yes" if s.ok else "NO"])
    return _table(
        ["process", "figure", "slope per 10 min", "limit", "minutes fitted", "flat"], rows
    )


def check_table(result: Result) -> str:
    rows: list[list[object]] = [
        [c.name, "pass" if c.ok else "FAIL", c.detail] for c in result.checks
    ]
    return _table(["check", "result", "detail"], rows)


def report(result: Result, *, command: str) -> str:
    incarnations = len({s.controller_pid for s in result.samples if s.controller_pid})
    last = result.samples[-1]
    head = (
        f"`{command}`: {result.minutes:g} min, seed {result.seed}, {len(result.guests)} guests, "
        f"{len(result.jobs)} jobs, {len(result.faults)} faults, {incarnations} controller "
        f"processes, {len(result.samples)} samples; settled {result.settle_s:.1f} s after the "
        f"last job; database {last.db_mb or 0:.1f} MB, {last.events or 0} events"
    )
    return "\n\n".join(
        [
            head,
            outcome_table(result),
            fault_table(result),
            pause_table(result),
            slope_table(result),
            check_table(result),
        ]
    )


# --- the plot ------------------------------------------------------------------------------------

PANELS = (
    ("rss_mb", "RSS (MB)"),
    ("threads", "threads"),
    ("fds", "open file descriptors"),
    ("libvirt_conns", "libvirt connections"),
    ("db_mb", "database size (MB)"),
    ("events_per_min", "events per minute"),
)


def _each(figures: ProcessFigures, figure: str, role: str) -> float:
    """As judged: the guardians per guardian alive (none alive: no point)."""
    value = float(getattr(figures, figure))
    if role != "guardians":
        return value
    return value / figures.processes if figures.processes else float("nan")


def plot(result: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(3, 2, figsize=(13, 10), sharex=True)
    minutes = [s.t / 60 for s in result.samples]
    colours = {k: f"C{i}" for i, k in enumerate(KINDS)}
    slope_of = {(s.role, s.figure): s for s in result.slopes}
    for ax, (figure, title) in zip(axes.flat, PANELS, strict=True):
        if figure in FIGURES:
            for role in ROLES:
                ys = [_each(s.processes[role], figure, role) for s in result.samples]
                fit = slope_of[(role, figure)].per_10_min
                name = "a guardian" if role == "guardians" else role
                label = name if fit is None else f"{name} ({fit:+.2f} / 10 min)"
                ax.plot(minutes, ys, marker=".", markersize=3, linewidth=0.8, label=label)
            ax.legend(fontsize=7, loc="upper left")
        else:
            ys2 = [getattr(s, figure) for s in result.samples]
            ax.plot(
                minutes,
                [float("nan") if y is None else y for y in ys2],
                marker=".",
                markersize=3,
                linewidth=0.8,
            )
        ax.set_title(title, fontsize=10)
        ax.axvspan(result.minutes / 3, result.minutes, color="0.93", zorder=0)
        for f in result.faults:
            ax.axvline(
                float(f["at_s"]) / 60, color=colours[str(f["kind"])], linewidth=0.8, alpha=0.8
            )
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("minutes")
    seen = Counter(str(f["kind"]) for f in result.faults)
    handles = [Line2D([], [], color=colours[k], label=f"{k} ({seen[k]})") for k in KINDS if seen[k]]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, title="faults")
    fig.suptitle(
        f"maintctl soak: {result.minutes:g} min, seed {result.seed}, {len(result.guests)} guests, "
        f"{len(result.jobs)} jobs (shaded: the last two thirds, where slopes are fitted)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
