"""Fast privacy accounting is still Opacus's accounting: the ε a site reports equals what
Opacus's own PRV and RDP accountants give for the same history, memoised values are the values a
recomputation gives, the caches stay bounded, and σ is planned exactly as Opacus would."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from privacy.accounting import (
    CACHE_SIZE,
    PrivacyLedger,
    accounting_cache_info,
    clear_accounting_caches,
    count_release_entries,
    epsilon_spent,
    noise_multiplier_for,
)
from simulations.benchmarks import accounting as benchmark

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the",
                                        "ignore:divide by zero encountered in log")

DELTA = 1e-5
COUNT = tuple(count_release_entries(10.0))  # the noisy count release: (10, 1, 1)

HISTORIES = {
    "one entry": [(1.1, 0.01, 1000)],
    "a site after 10 rounds": [*COUNT, (1.953125, 1 / 13, 150)],
    "a site after 100 rounds": [*COUNT, (1.953125, 1 / 13, 1500)],
    "q changed mid-run": [*COUNT, (1.2, 1 / 37, 74), (1.2, 1 / 38, 38)],
    "three mechanisms": [(1.0, 0.05, 100), (1.5, 0.02, 300), (0.9, 0.1, 50)],
    "two single steps, a coarse grid": [(1.0, 0.05, 1), (1.5, 0.02, 1)],  # mean shifts count
    "low noise": [(0.5, 0.2, 100)],
}


def opacus_epsilon(accountant: str, history, delta: float = DELTA) -> float:
    """A fresh Opacus accountant holding ``history``: the reference."""
    reference = {"prv": PRVAccountant, "rdp": RDPAccountant}[accountant]()
    reference.history = list(history)
    return reference.get_epsilon(delta=delta)


@pytest.mark.parametrize("name", HISTORIES)
@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_equals_opacus_accountants(accountant, name):
    clear_accounting_caches()
    history = HISTORIES[name]
    # PRV: the same numbers summed in another order (rounding only); RDP: the same sums
    assert epsilon_spent(accountant, history, DELTA) == pytest.approx(
        opacus_epsilon(accountant, history), rel=1e-9 if accountant == "prv" else 1e-15)


def test_epsilon_at_another_delta_equals_opacus():
    history = HISTORIES["a site after 10 rounds"]
    for delta in (1e-6, 1e-3):
        assert epsilon_spent("prv", history, delta) == pytest.approx(
            opacus_epsilon("prv", history, delta), rel=1e-9)
    assert epsilon_spent("prv", history, 1e-6) > epsilon_spent("prv", history, 1e-3)


def test_a_ledger_reports_what_opacus_reports_round_after_round():
    ledger = PrivacyLedger(accountant="prv", delta=DELTA, noise_multiplier=1.953125,
                           sample_rate=1 / 13, count_noise=10.0, released_count=800)
    for _ in range(3):
        ledger.record_round(15)
    assert ledger.history == [*COUNT, (1.953125, 1 / 13, 45)]
    for rounds, epsilon in enumerate(ledger.epsilon_per_round, start=1):
        assert epsilon == pytest.approx(
            opacus_epsilon("prv", [*COUNT, (1.953125, 1 / 13, 15 * rounds)]), rel=1e-9)


def test_a_repeated_history_is_answered_from_the_cache_with_the_same_value():
    clear_accounting_caches()
    history = HISTORIES["a site after 10 rounds"]
    computed = epsilon_spent("prv", history, DELTA)
    assert accounting_cache_info()["epsilon"]["misses"] == 1
    # the same history as a list, a tuple, or from another ledger: one cache entry
    assert epsilon_spent("prv", tuple(history), DELTA) == computed
    assert epsilon_spent("prv", [list(entry) for entry in history], DELTA) == computed
    info = accounting_cache_info()["epsilon"]
    assert (info["hits"], info["misses"], info["currsize"]) == (2, 1, 1)
    # a different δ or accountant is a different key, never a stale value
    assert epsilon_spent("prv", history, 1e-6) != computed
    assert epsilon_spent("rdp", history, DELTA) != computed
    # what the cache returns is what a recomputation from scratch returns, bit for bit
    clear_accounting_caches()
    assert epsilon_spent("prv", history, DELTA) == computed


def test_the_caches_are_bounded():
    clear_accounting_caches()
    info = accounting_cache_info()
    assert {cache["maxsize"] for cache in info.values()} == {CACHE_SIZE}
    first = [(1.0, 0.01, 1)]
    for steps in range(1, CACHE_SIZE + 11):  # RDP: cheap, one (σ, q) for every history
        epsilon_spent("rdp", [(1.0, 0.01, steps)], DELTA)
    info = accounting_cache_info()
    assert info["epsilon"]["currsize"] == CACHE_SIZE
    assert info["rdp_of_one_step"]["currsize"] == 1
    misses = info["epsilon"]["misses"]
    epsilon_spent("rdp", first, DELTA)  # the oldest entry was evicted: computed again
    assert accounting_cache_info()["epsilon"]["misses"] == misses + 1


def _opacus_plan(target: float, q: float, steps: int, accountant: str, prefix=()) -> float:
    """How σ was planned with Opacus alone (privacy/accounting.py before the caches):
    ``get_noise_multiplier`` at 1 % tolerance, then the prefix loop on Opacus's ε."""
    def plain(goal: float) -> float:
        return float(get_noise_multiplier(target_epsilon=goal, target_delta=DELTA, sample_rate=q,
                                          steps=steps, accountant=accountant,
                                          epsilon_tolerance=0.01 * goal))

    sigma, goal = plain(target), target
    while prefix and opacus_epsilon(accountant, [*prefix, (sigma, q, steps)]) > target:
        goal -= opacus_epsilon(accountant, [*prefix, (sigma, q, steps)]) - target + 0.002 * target
        sigma = plain(goal)
    return sigma


@pytest.mark.parametrize(("target", "q", "steps", "accountant", "prefix"), [
    (2.0, 0.01, 150, "rdp", COUNT),  # a second search, with the prefix's margin
    (3.0, 1 / 37, 222, "rdp", ()),
    (2.0, 0.01, 200, "prv", COUNT),
])
def test_planning_through_the_cache_equals_planning_with_opacus(target, q, steps, accountant,
                                                                 prefix):
    clear_accounting_caches()
    sigma = noise_multiplier_for(target, DELTA, q, steps, accountant=accountant, prefix=prefix)
    assert sigma == _opacus_plan(target, q, steps, accountant, prefix)
    hits = accounting_cache_info()["noise_multiplier"]["hits"]
    assert noise_multiplier_for(target, DELTA, q, steps, accountant=accountant,
                                prefix=prefix) == sigma
    assert accounting_cache_info()["noise_multiplier"]["hits"] == hits + 1
    assert 0.9 * target <= opacus_epsilon(accountant, [*prefix, (sigma, q, steps)]) <= target


def test_an_impossible_plan_is_refused_every_time():
    # the count release alone (σ = 0.5) spends more than ε = 1: nothing to cache
    for _ in range(2):
        with pytest.raises(RuntimeError, match="they alone spend too much"):
            noise_multiplier_for(1.0, DELTA, 0.1, 10, accountant="rdp",
                                 prefix=((0.5, 1.0, 1),))


def test_the_benchmark_times_every_variant_and_judges_by_the_numbers():
    site = benchmark.Site(sample_rate=0.25, steps_per_round=2)
    row = benchmark.measure_epsilon(site, sigma=2.0, rounds=1, repeats=2)
    assert row["history"] == [*COUNT, (2.0, 0.25, 2)]
    assert set(row["timings"]) == set(benchmark.EPSILON_VARIANTS)
    assert row["epsilon"] == epsilon_spent("prv", row["history"], site.delta)
    assert row["epsilon_opacus_prv"] == opacus_epsilon("prv", row["history"])
    assert row["relative_difference"] < 1e-9 and row["cache_consistent"]
    for timing in row["timings"].values():
        assert 0 < timing["min_s"] <= timing["median_s"]
    assert benchmark.failures([row], warm_limit_s=math.inf) == []
    slow = {**row, "timings": {**row["timings"], "ours_warm": {"median_s": 0.2, "min_s": 0.2}}}
    assert benchmark.failures([slow]) == ["ε after 1 rounds, warm, took 0.2 s (> 0.1 s)"]
    off = {**row, "relative_difference": 0.02}
    assert benchmark.failures([off], warm_limit_s=math.inf) == [
        "ε after 1 rounds differs from Opacus's PRV by 2.00% (> 1%)"]
    stale = {**row, "cache_consistent": False}
    assert len(benchmark.failures([stale], warm_limit_s=math.inf)) == 1


def test_interleaving_rotates_the_order_and_runs_setups_untimed():
    calls = []
    timings, values = benchmark.interleaved(
        {"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, repeats=3,
        setups={"b": lambda: calls.append("setup b")})
    assert calls == ["a", "setup b", "b", "setup b", "b", "a", "a", "setup b", "b"]
    assert values == {"a": 1, "b": 2} and set(timings) == {"a", "b"}
