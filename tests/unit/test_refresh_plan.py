"""Which paused guests are refreshed, in what batches, and which are not (and why)."""

from __future__ import annotations

from controller.decisions.refresh_plan import (
    GIB,
    MIB,
    Candidate,
    RefreshMode,
    image_bytes,
    plan_refresh,
    predicted_seconds,
)


def guest(name: str, mib: int, stale: bool | None = True) -> Candidate:
    return Candidate(f"uuid-{name}", name, mib * MIB, stale)


def plan(mode: RefreshMode, guests: list[Candidate], **kw):
    args = {"seconds_left": 30.0, "seconds_per_gib": 8.0, "parallel": 2, "free_bytes": 8 * GIB}
    return plan_refresh(mode, guests, **(args | kw))


def names(batches) -> list[list[str]]:
    return [[c.name for c in b] for b in batches]


def test_stale_refreshes_only_stale_guests_and_never_none():
    guests = [guest("a", 128), guest("b", 128, stale=False), guest("c", 128, stale=None)]
    assert names(plan(RefreshMode.STALE, guests).batches) == [["a"]]
    assert names(plan(RefreshMode.ALWAYS, guests).batches) == [["a", "b"], ["c"]]
    assert plan(RefreshMode.NEVER, guests).batches == []


def test_batches_hold_at_most_parallel_guests_smallest_first():
    guests = [guest("big", 1024), guest("s1", 128), guest("s2", 128), guest("m", 512)]
    p = plan(RefreshMode.ALWAYS, guests, parallel=3)
    assert names(p.batches) == [["s1", "s2", "m"], ["big"]]
    assert p.skipped == []


def test_images_of_every_refreshed_guest_must_fit_together():
    # Images stay until their guests run: 2 x (128 + 32) MiB fit in 350 MiB, a third does not.
    guests = [guest("g1", 128), guest("g2", 128), guest("g3", 128)]
    p = plan(RefreshMode.ALWAYS, guests, free_bytes=350 * MIB, parallel=1)
    assert names(p.batches) == [["g1"], ["g2"]]
    ((skipped, why),) = p.skipped
    assert skipped.name == "g3"
    assert "refresh_dir too small" in why and "160 MiB" in why and "30 MiB is free" in why


def test_a_guest_larger_than_the_directory_is_skipped_the_others_go_on():
    guests = [guest("huge", 4096), guest("small", 128)]
    p = plan(RefreshMode.ALWAYS, guests, free_bytes=1 * GIB)
    assert names(p.batches) == [["small"]]
    assert [c.name for c, _ in p.skipped] == ["huge"]


def test_guests_whose_turn_would_end_past_the_budget_are_skipped_with_the_prediction():
    # 8 s per GiB: 512 MiB is 4 s. Counted as if they took turns: 4 + 4 > 6.
    guests = [guest("a", 512), guest("b", 512)]
    p = plan(RefreshMode.STALE, guests, seconds_left=6.0)
    assert names(p.batches) == [["a"]]
    ((skipped, why),) = p.skipped
    assert skipped.name == "b"
    assert "512 MiB" in why and "4.0 s" in why and "2.0 s of the budget" in why
    assert p.predicted_s == {"uuid-a": 4.0, "uuid-b": 4.0}


def test_predictions_grow_with_memory_and_are_never_zero():
    assert predicted_seconds(GIB, 10.0) == 10.0
    assert predicted_seconds(256 * MIB, 10.0) == 2.5
    assert predicted_seconds(0, 10.0) > 0
    assert image_bytes(128 * MIB) == 160 * MIB


def test_a_save_limit_has_a_floor_for_small_guests_and_never_passes_the_budget() -> None:
    from controller.decisions.refresh_plan import SAVE_FLOOR_SECONDS, save_limit

    # A 128 MiB guest predicted at 0.4 s from a large guest's seconds per GiB: before, 1.2 s,
    # less than this machine's reaping alone; now the floor.
    assert save_limit(0.4, 25.0) == SAVE_FLOOR_SECONDS
    assert save_limit(4.0, 25.0) == 12.0  # three times its prediction
    assert save_limit(4.0, 7.5) == 7.5  # never past the budget
    assert save_limit(4.0, 0.2) == 1.0  # but a save, once begun, gets a second
