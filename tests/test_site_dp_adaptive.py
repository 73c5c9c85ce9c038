"""Adaptive clipping inside the distributed-noise sum (Andrew et al. 2021; privacy/site_dp)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from privacy.site_dp import accounting as A
from privacy.site_dp import encoding as E
from privacy.site_dp.clipping import next_clip
from privacy.site_dp.randomness import KeyStream

SEED = b"adaptive-round"
SETTINGS = dict(delta=1e-5, clip=1.0, num_sites=100, sites_per_round=20, threshold=11, rounds=5)


@functools.cache
def make_plan(target_epsilon: float = 2.0, count_noise_std: float | None = 5.0,
              dim: int = 5000) -> A.SiteDPPlan:
    return A.plan(target_epsilon=target_epsilon, dim=dim, count_noise_std=count_noise_std,
                  **SETTINGS)


def key(label: int) -> KeyStream:
    return KeyStream(label.to_bytes(32, "little"))


def ring_sum(vectors) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for vector in vectors:
        total += vector
    return total


def test_the_count_gets_its_noise_and_the_delta_pays_for_it_as_in_andrew_et_al():
    fixed, adaptive = make_plan(count_noise_std=None), make_plan()
    assert adaptive.adaptive and not fixed.adaptive
    assert adaptive.count_std(11) == pytest.approx(5.0, rel=1e-6)
    assert 0.999 * 2.0 <= adaptive.planned_epsilon <= 2.0
    z = fixed.central_std(11) / fixed.clip  # the multiplier ε = 2 allows (rounding ≈ 0)
    share = 1 - (z / (2 * 5.0)) ** 2  # z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)
    assert adaptive.central_std(11) == pytest.approx(fixed.central_std(11) / math.sqrt(share),
                                                     rel=1e-4)
    # the count is accounted: without its coordinate the same noise would spend less ε
    no_count = A.SiteDPPlan(**{**A._fields(adaptive), "count_scale": 0})
    assert A.worst_case_epsilon(no_count) < 0.99 * adaptive.planned_epsilon
    assert adaptive.vector_length == adaptive.padded_dim + 1


def test_a_count_noise_the_budget_cannot_pay_for_is_refused_by_name():
    with pytest.raises(ValueError, match="count_noise_std=0.5 must exceed z/2"):
        make_plan(count_noise_std=0.5)
    with pytest.raises(ValueError, match="count_noise_std"):
        make_plan(count_noise_std=-1.0)


def test_a_round_clip_changes_what_is_clipped_and_the_count_reports_it():
    plan = make_plan(target_epsilon=1000.0, count_noise_std=0.5, dim=1024)
    round_clip = 1.5
    rng = np.random.default_rng(0)
    norms = np.linspace(0.5, 3.0, 13)  # 5 of 13 within 1.5
    deltas = [n * v / np.linalg.norm(v) for n, v in zip(norms, rng.normal(size=(13, plan.dim)),
                                                       strict=True)]
    encoded = [E.encode_site_delta(d, plan, rotation_seed=SEED, noise_stream=key(i),
                                   clip=round_clip) for i, d in enumerate(deltas)]
    assert [not e.clipped for e in encoded] == list(norms <= round_clip)
    total = ring_sum([e.vector for e in encoded])
    fraction = E.decode_unclipped_fraction(total, plan, survivors=13)
    truth = float(np.mean(norms <= round_clip))
    assert abs(fraction - truth) < 5 * plan.count_std(13) / 13
    mean = E.decode_mean(total, plan, rotation_seed=SEED, survivors=13, clip=round_clip)
    clipped_mean = np.mean([d * min(1, round_clip / np.linalg.norm(d)) for d in deltas], axis=0)
    noise = plan.central_std(13) / 13 * round_clip / plan.clip  # real-unit noise moves with C_r
    assert np.std(mean - clipped_mean) == pytest.approx(noise, rel=0.15)
    # decoding at the plan's clip instead of the round's is off by the ratio of scales
    wrong = E.decode_mean(total, plan, rotation_seed=SEED, survivors=13)
    assert np.linalg.norm(wrong - clipped_mean) > 0.3 * np.linalg.norm(clipped_mean)


def test_the_clip_moves_to_the_median_site_norm_over_rounds():
    """20 sites with norms log-spread over [0.1, 10] (median 1): starting at 0.3, the noisy
    geometric update brings the clip within a factor 1.5 of the median."""
    plan = make_plan(target_epsilon=50.0, count_noise_std=1.0, dim=16)
    norms = np.geomspace(0.1, 10.0, 20)
    rng = np.random.default_rng(1)
    clip = 0.3
    for round_index in range(20):
        directions = rng.normal(size=(20, plan.dim))
        vectors = [E.encode_site_delta(n * v / np.linalg.norm(v), plan, rotation_seed=SEED,
                                       noise_stream=key(1000 * round_index + i), clip=clip).vector
                   for i, (n, v) in enumerate(zip(norms, directions, strict=True))]
        fraction = E.decode_unclipped_fraction(ring_sum(vectors), plan, survivors=20)
        clip = next_clip(clip, fraction, target_quantile=0.5, learning_rate=0.5)
    assert 1 / 1.5 < clip / np.median(norms) < 1.5


def test_next_clip_follows_the_geometric_rule_and_refuses_bad_values():
    assert next_clip(1.0, 0.5) == 1.0
    assert next_clip(2.0, 1.0, learning_rate=0.2) == pytest.approx(2.0 * math.exp(-0.1))
    assert next_clip(2.0, 0.0, target_quantile=0.9) == pytest.approx(2.0 * math.exp(0.18))
    with pytest.raises(ValueError, match="clip"):
        next_clip(0.0, 0.5)
    with pytest.raises(ValueError, match="target_quantile"):
        next_clip(1.0, 0.5, target_quantile=1.0)
    with pytest.raises(ValueError, match="unclipped_fraction"):
        next_clip(1.0, float("nan"))


def test_a_round_clip_needs_an_adaptive_plan():
    fixed = make_plan(count_noise_std=None)
    with pytest.raises(ValueError, match="fixed clipping"):
        E.encode_site_delta(np.zeros(fixed.dim), fixed, rotation_seed=SEED, clip=2.0)
    with pytest.raises(ValueError, match="fixed clipping"):
        E.decode_unclipped_fraction(np.zeros(fixed.vector_length, np.uint32), fixed,
                                    survivors=11)
    adaptive = make_plan()
    with pytest.raises(ValueError, match="round clip"):
        E.encode_site_delta(np.zeros(adaptive.dim), adaptive, rotation_seed=SEED, clip=-1.0)
