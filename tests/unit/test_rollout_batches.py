"""How one update domain splits into batches: max_parallel_hosts and availability sets."""

from dataclasses import dataclass

from controller.decisions.rollout import RolloutPolicy, update_domain_waves, wave_batches


@dataclass(frozen=True)
class H:
    name: str
    update_domain: int = 0


def names(batches):
    return [[h.name for h in b] for b in batches]


def test_by_default_a_whole_domain_is_one_batch():
    wave = [H("a"), H("b"), H("c")]
    assert names(wave_batches(wave, RolloutPolicy()).batches) == [["a", "b", "c"]]


def test_max_parallel_hosts_cuts_a_domain_in_order():
    wave = [H(n) for n in "abcde"]
    out = wave_batches(wave, RolloutPolicy(max_parallel_hosts=2))
    assert names(out.batches) == [["a", "b"], ["c", "d"], ["e"]]
    assert out.refused == {}


def test_the_availability_set_limit_counts_guests_across_the_hosts_of_a_batch():
    wave = [H("a"), H("b"), H("c"), H("d")]
    sets = {"a": {"web": 2}, "b": {"web": 1, "db": 1}, "c": {"db": 2}, "d": {}}
    out = wave_batches(wave, RolloutPolicy(max_paused_per_availability_set=2), sets)
    # a fills web; b cannot join (3 web); c joins (db 2); d has no set guests: joins the first.
    assert names(out.batches) == [["a", "c", "d"], ["b"]]
    for batch in out.batches:
        totals: dict[str, int] = {}
        for h in batch:
            for s, n in sets[h.name].items():
                totals[s] = totals.get(s, 0) + n
        assert max(totals.values(), default=0) <= 2


def test_both_limits_apply_together():
    wave = [H(n) for n in "abc"]
    sets = {"a": {"web": 1}, "b": {"web": 1}, "c": {"web": 1}}
    policy = RolloutPolicy(max_parallel_hosts=1, max_paused_per_availability_set=3)
    assert names(wave_batches(wave, policy, sets).batches) == [["a"], ["b"], ["c"]]


def test_a_host_over_the_limit_on_its_own_is_refused_not_split():
    wave = [H("a"), H("b")]
    sets = {"a": {"web": 3}, "b": {"web": 1}}
    out = wave_batches(wave, RolloutPolicy(max_paused_per_availability_set=2), sets)
    assert names(out.batches) == [["b"]]
    assert "3 guests of availability set 'web'" in out.refused["a"]


def test_sets_are_ignored_without_a_limit():
    wave = [H("a"), H("b")]
    out = wave_batches(wave, RolloutPolicy(), {"a": {"web": 50}, "b": {"web": 50}})
    assert names(out.batches) == [["a", "b"]] and out.refused == {}


def test_waves_never_mix_domains():
    hosts = [H("x", 1), H("a", 0), H("b", 1)]
    assert [[h.name for h in w] for w in update_domain_waves(hosts)] == [["a"], ["x", "b"][::-1]]
