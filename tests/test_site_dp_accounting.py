"""Hospital-level accounting of the distributed discrete Gaussian (privacy/site_dp)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from privacy.site_dp import accounting as A
from privacy.site_dp.discrete_gaussian import DiscreteGaussian

BETA = math.exp(-0.5)

# ε of the paper's own accounting code, google-research/federated distributed_dp/
# accounting_utils.py ddgauss_epsilon (commit 5e27a86), run with tf-privacy's RDP → (ε, δ)
# conversion: (γ, local std, n clients, clip, β, d, q, rounds, δ) → ε. Rows 1–3 have τ > 0
# (σ of 1–1.2 integer levels): without the τ term row 2 would give 6.158, not 6.206.
REFERENCE = [
    (0.125, 0.15, 100, 1.0, BETA, 256, 0.1, 10, 1e-05, 4.25203632928487),
    (0.125, 0.125, 100, 1.0, BETA, 256, 0.1, 10, 1e-05, 6.206234825612574),
    (0.125, 0.125, 100, 1.0, BETA, 256, 1.0, 1, 1e-05, 5.892361169525797),
    (2**-12, 0.01, 100, 0.03, BETA, 65536, 100 / 3400, 1500, 1 / 3400, 2.420820596471664),
    (0.001, 0.25, 20, 1.0, BETA, 1048576, 0.2, 5, 1e-05, 5.737580347283535),
    (2**-10, 0.1, 50, 1.0, 0.0, 4096, 0.05, 200, 1e-06, 16.66511526248151),
]


def reference_epsilon(gamma, local_std, n, clip, beta, dim, q, rounds, delta, tau_n=None):
    scale = 1 / gamma
    l2 = A.rounded_l2_norm_bound(clip * scale, beta, dim)
    rdp = A.distributed_dg_rdp(sigma_squared=(local_std * scale) ** 2, survivors=n,
                               l2_sensitivity=l2, l1_sensitivity=A.rounded_l1_norm_bound(l2, dim),
                               dim=dim, sampling_rate=q, tau_survivors=tau_n)
    return A.rdp_to_epsilon(A.RDP_ORDERS, rounds * rdp, delta)[0]


@pytest.mark.parametrize("row", REFERENCE)
def test_epsilon_matches_the_papers_accounting_code(row):
    *params, expected = row
    assert reference_epsilon(*params) == pytest.approx(expected, rel=1e-9)


def test_the_tau_term_is_what_moves_the_small_sigma_rows():
    *params, expected = REFERENCE[1]
    without_tau = reference_epsilon(*params, tau_n=1)  # one summand: τ = 0
    assert without_tau < expected - 0.04


def gaussian_epsilon_opacus(q: float, z: float, rounds: int, delta: float) -> float:
    orders = A.RDP_ORDERS.astype(float)
    rdp = compute_rdp(q=q, noise_multiplier=z, steps=rounds, orders=orders)
    return get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 1), (2.0, 50), (0.7, 10)])
def test_without_sampling_huge_noise_gives_exactly_the_continuous_gaussian(z, rounds):
    """σ → ∞ in integer units: τ → 0 and rounding vanishes; the bound is the Gaussian's."""
    sigma2 = 1e14
    n = 10
    sensitivity = math.sqrt(n * sigma2) / z  # noise multiplier z of the central sum
    rdp = A.distributed_dg_rdp(sigma_squared=sigma2, survivors=n, l2_sensitivity=sensitivity,
                               l1_sensitivity=sensitivity * 100, dim=1024, sampling_rate=1.0)
    ours = A.rdp_to_epsilon(A.RDP_ORDERS, rounds * rdp, 1e-5)[0]
    assert ours == pytest.approx(gaussian_epsilon_opacus(1.0, z, rounds, 1e-5), rel=1e-9)


@pytest.mark.parametrize(("q", "z", "rounds"), [(0.01, 1.1, 1000), (0.2, 1.0, 5),
                                                (0.02, 0.8, 100)])
def test_sampled_rounds_are_bounded_above_the_exact_gaussian_and_close_to_it(q, z, rounds):
    """Zhu-Wang's general bound (valid for the discrete mechanism) is never below the exact
    subsampled Gaussian (Mironov et al., Opacus) and costs at most ~25% more ε."""
    rdp = A.poisson_subsampled_rdp(A.RDP_ORDERS, q, lambda a: np.asarray(a, float) / (2 * z * z))
    ours = A.rdp_to_epsilon(A.RDP_ORDERS, rounds * rdp, 1e-5)[0]
    exact = gaussian_epsilon_opacus(q, z, rounds, 1e-5)
    assert exact <= ours <= 1.3 * exact


SETTINGS = dict(target_epsilon=2.0, delta=1e-5, clip=1.0, dim=5000, num_sites=100,
                sites_per_round=20, threshold=11, rounds=5, amplification="poisson")


@functools.cache
def _default_plan() -> A.SiteDPPlan:  # frozen: safe to share between tests
    return A.plan(**SETTINGS)


def small_plan(**overrides) -> A.SiteDPPlan:
    return A.plan(**{**SETTINGS, **overrides}) if overrides else _default_plan()


def test_the_plan_meets_the_target_with_only_the_threshold_surviving():
    p = small_plan()
    assert 0.999 * p.target_epsilon <= p.planned_epsilon <= p.target_epsilon
    assert A.epsilon(p, [p.threshold] * p.rounds) <= p.target_epsilon
    assert p.padded_dim == 8192 and p.noise.sigma_squared > 1e12
    assert p.wrap_probability <= 1e-9


def test_dropouts_down_to_the_threshold_keep_epsilon_within_the_plan():
    p = small_plan()
    for survivors in range(p.threshold, p.sites_per_round + 1):
        assert A.epsilon(p, [survivors] * p.rounds) <= p.target_epsilon
    mixed = [20, 11, 15, 11, 19]
    assert A.epsilon(p, mixed) <= p.target_epsilon
    # fewer dropouts = more noise in the sum = smaller ε
    assert A.epsilon(p, [20] * 5) < A.epsilon(p, [11] * 5)


def test_noise_calibrated_for_all_n_would_break_the_plan_when_sites_drop():
    """Why the threshold: the same total noise split over n sites loses (n−t)/n of it when
    n − t sites drop, and ε then exceeds the target."""
    p = small_plan()
    naive = DiscreteGaussian.at_least(p.noise.sigma_squared * p.threshold / p.sites_per_round)
    fragile = A.SiteDPPlan(**{**A._fields(p), "noise": naive})
    assert A.epsilon(fragile, [p.sites_per_round] * p.rounds) <= p.target_epsilon * 1.001
    assert A.epsilon(fragile, [p.threshold] * p.rounds) > 1.2 * p.target_epsilon


def test_rounds_beyond_the_plan_spend_more_than_the_target():
    p = small_plan()
    assert A.epsilon(p, [p.threshold] * (2 * p.rounds)) > 1.3 * p.target_epsilon
    assert A.epsilon(p, [0] * 50) == 0.0  # aborted rounds release nothing


def test_a_round_below_the_threshold_cannot_be_accounted():
    p = small_plan()
    with pytest.raises(ValueError, match="below the threshold 11"):
        A.epsilon(p, [10])
    with pytest.raises(ValueError, match="sites_per_round=20"):
        A.epsilon(p, [21])


def test_without_amplification_the_same_noise_costs_more():
    p = small_plan()
    unamplified = A.SiteDPPlan(**{**A._fields(p), "amplification": "none"})
    assert unamplified.sampling_rate == 1.0
    assert A.worst_case_epsilon(unamplified) > 2 * p.planned_epsilon
    planned = small_plan(amplification="none")
    assert planned.central_std(11) > 2 * p.central_std(11)  # real units: much more noise
    assert planned.planned_epsilon <= planned.target_epsilon
    # the default is the guarantee that holds against the server (it sees the cohort)
    defaults = {k: v for k, v in SETTINGS.items() if k != "amplification"}
    assert A.plan(**defaults).amplification == "none"


def test_a_fine_ring_makes_rounding_negligible_and_a_narrow_one_costs_noise():
    wide = small_plan()
    assert wide.l2_sensitivity / (wide.clip * wide.scale) < 1 + 1e-6
    narrow = small_plan(bits=12)
    inflation = narrow.l2_sensitivity / (narrow.clip * narrow.scale)
    assert inflation > 1.03
    assert narrow.central_std(11) > wide.central_std(11)  # real units: more noise needed
    assert narrow.wrap_probability <= 1e-9


def test_the_noise_report_says_what_dropouts_removed():
    p = small_plan()
    report = A.noise_report(p, 15)
    assert report["planned_sum_std"] == pytest.approx(math.sqrt(11 * p.noise.sigma_squared)
                                                      / p.scale)
    planned_variance = report["planned_sum_std"] ** 2
    assert report["released_sum_std"] ** 2 == pytest.approx(15 / 11 * planned_variance)
    assert report["variance_removed_by_dropouts"] == pytest.approx(5 / 20)
    assert report["released_over_planned_variance"] == pytest.approx(15 / 11)


def test_planning_is_deterministic():
    assert A.plan(**SETTINGS) == small_plan()


@pytest.mark.parametrize(("override", "named"), [
    ({"target_epsilon": 0}, "target_epsilon"), ({"delta": 1.0}, "delta"),
    ({"clip": -1.0}, "clip"), ({"dim": 0}, "dim"), ({"threshold": 21}, "threshold"),
    ({"sites_per_round": 200}, "num_sites"), ({"rounds": 2.5}, "rounds"),
    ({"bits": 33}, "bits"), ({"amplification": "shuffle"}, "amplification"),
    ({"max_wrap_probability": 0.0}, "max_wrap_probability"),
])
def test_bad_plan_settings_are_refused_by_name(override, named):
    with pytest.raises(ValueError, match=named):
        small_plan(**override)


def test_a_ring_too_narrow_for_the_target_is_refused():
    with pytest.raises(ValueError, match="bits"):
        small_plan(bits=10)
