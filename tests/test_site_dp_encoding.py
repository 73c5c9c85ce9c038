"""A site's delta → its noised share of the secure sum, and the server's decoding
(privacy/site_dp/encoding.py), alone and through privacy/secagg's real protocol."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from scipy import stats

from privacy.secagg import messages as m
from privacy.secagg.crypto import expand_mask
from privacy.secagg.loopback import run_round
from privacy.secagg.server import setup
from privacy.site_dp import accounting as A
from privacy.site_dp import encoding as E
from privacy.site_dp.randomness import KeyStream

SEED = b"round-3-rotation"


def key(label: int) -> KeyStream:
    return KeyStream(label.to_bytes(32, "little"))


@functools.cache
def make_plan(dim: int = 3000, target_epsilon: float = 2.0, bits: int = 32,
              sites: int = 20, threshold: int = 11) -> A.SiteDPPlan:
    return A.plan(target_epsilon=target_epsilon, delta=1e-5, clip=1.0, dim=dim, num_sites=100,
                  sites_per_round=sites, threshold=threshold, rounds=5, bits=bits)


def ring_sum(vectors) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for vector in vectors:
        total += vector  # uint32 wraps mod 2**32, as the unmasked SecAgg sum does
    return total


def clipped(delta: np.ndarray, clip: float) -> np.ndarray:
    norm = np.linalg.norm(delta)
    return delta * min(1.0, clip / norm)


# -- the rotation ---------------------------------------------------------------------------

def test_the_rotation_is_orthogonal_and_spreads_a_spike_over_every_coordinate():
    rng = np.random.default_rng(0)
    x = rng.normal(size=1024)
    signs = E.rademacher_signs(SEED, 1024)
    y = E.rotate(x, signs)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    assert np.allclose(E.unrotate(y, signs), x, atol=1e-12)
    spike = np.zeros(1024)
    spike[5] = 32.0
    assert np.allclose(np.abs(E.rotate(spike, signs)), 1.0)  # 32/√1024 in every coordinate
    assert np.allclose(E.walsh_hadamard(E.walsh_hadamard(x)), 1024 * x)
    with pytest.raises(ValueError, match="power-of-two"):
        E.walsh_hadamard(np.ones(1000))


def test_every_party_derives_the_same_signs_from_the_round_seed():
    assert np.array_equal(E.rademacher_signs(SEED, 64), E.rademacher_signs(SEED, 64))
    assert not np.array_equal(E.rademacher_signs(SEED, 64), E.rademacher_signs(b"other", 64))
    assert set(np.unique(E.rademacher_signs(SEED, 64))) == {-1.0, 1.0}


# -- encoding -------------------------------------------------------------------------------

def test_the_encoding_lives_in_the_ring_and_is_reproducible_only_with_the_same_key():
    plan = make_plan(bits=20)
    delta = np.random.default_rng(1).normal(size=plan.dim)
    encoded = E.encode_site_delta(delta, plan, rotation_seed=SEED, noise_stream=key(1))
    assert encoded.vector.dtype == np.uint32 and encoded.vector.shape == (plan.padded_dim,)
    assert int(encoded.vector.max()) < 2**20
    assert encoded.clipped and encoded.norm == pytest.approx(np.linalg.norm(delta))
    again = E.encode_site_delta(delta, plan, rotation_seed=SEED, noise_stream=key(1))
    assert np.array_equal(encoded.vector, again.vector)
    fresh = E.encode_site_delta(delta, plan, rotation_seed=SEED)  # os.urandom key
    assert not np.array_equal(encoded.vector, fresh.vector)


def test_a_delta_given_as_model_arrays_encodes_like_its_flat_vector():
    plan = make_plan()
    rng = np.random.default_rng(2)
    arrays = [rng.normal(size=(50, 40)).astype(np.float32), rng.normal(size=1000)]
    flat = np.concatenate([a.ravel().astype(np.float64) for a in arrays])
    a = E.encode_site_delta(arrays, plan, rotation_seed=SEED, noise_stream=key(2))
    b = E.encode_site_delta(flat, plan, rotation_seed=SEED, noise_stream=key(2))
    assert np.array_equal(a.vector, b.vector)


def test_conditional_rounding_redraws_until_the_norm_bound_holds():
    plan = make_plan(dim=1024, bits=12)  # coarse: ~40 levels per clip, rounding is visible
    values = E.rotate(np.full(plan.padded_dim, plan.clip * plan.scale / 32.0),
                      E.rademacher_signs(SEED, plan.padded_dim))
    unconditional = float(np.linalg.norm(values)) + 0.0
    # a bound at the MEAN squared norm after rounding (‖v‖² + Σ p(1 − p)): about half the
    # single draws exceed it
    fraction = values - np.floor(values)
    tight = math.sqrt(unconditional**2 + float(np.sum(fraction * (1 - fraction))))
    tight_plan = A.SiteDPPlan(**{**A._fields(plan), "l2_sensitivity": tight})
    attempts = []
    for label in range(20):
        rounded, tries = E._conditional_rounding(values, tight_plan, key(label))
        assert np.linalg.norm(rounded) <= tight
        assert np.all(np.abs(rounded - values) < 1)  # each coordinate rounded to a neighbour
        attempts.append(tries)
    assert max(attempts) > 1
    impossible = A.SiteDPPlan(**{**A._fields(plan), "l2_sensitivity": unconditional * 0.5})
    with pytest.raises(RuntimeError, match="norm bound"):
        E._conditional_rounding(values, impossible, key(0))


def test_the_summed_noise_of_n_sites_has_the_planned_variance():
    """n sites with zero deltas: what the server decodes is pure noise, whose variance per
    coordinate must be n·σ²/scale² (the rotation keeps i.i.d. noise i.i.d.)."""
    plan = make_plan(dim=8192)
    n = plan.sites_per_round
    zero = np.zeros(plan.dim)
    vectors = [E.encode_site_delta(zero, plan, rotation_seed=SEED, noise_stream=key(i)).vector
               for i in range(n)]
    noise = E.decode_sum(ring_sum(vectors), plan, rotation_seed=SEED)
    expected = n * plan.noise.variance() / plan.scale**2
    assert abs(noise.mean()) < 5 * math.sqrt(expected / noise.size)
    ratio = noise.var() / expected
    assert abs(ratio - 1) < 5 * math.sqrt(2 / noise.size)  # ±7.8% for 8192 coordinates
    assert abs(ratio * n / plan.threshold - 1) > 0.5  # t's variance would be told apart
    # and it is the threshold's plan: t survivors alone carry the planned std
    assert plan.central_std(plan.threshold) ** 2 == pytest.approx(
        plan.threshold * plan.noise.sigma_squared / plan.scale**2)


def test_decoding_recovers_the_mean_of_the_clipped_deltas_within_the_noise():
    # a nearly non-private ε, so that one round's signal stands above the noise in 4096 dims
    plan = make_plan(dim=4096, target_epsilon=1000.0)
    survivors = 13
    rng = np.random.default_rng(3)
    direction = rng.normal(size=plan.dim)
    deltas = [direction / np.linalg.norm(direction) * rng.uniform(1.5, 4.0)
              + 0.01 * rng.normal(size=plan.dim) for _ in range(survivors)]
    vectors = [E.encode_site_delta(d, plan, rotation_seed=SEED, noise_stream=key(10 + i)).vector
               for i, d in enumerate(deltas)]
    mean = E.decode_mean(ring_sum(vectors), plan, rotation_seed=SEED, survivors=survivors)
    truth = np.mean([clipped(d, plan.clip) for d in deltas], axis=0)
    error = mean - truth
    predicted_std = math.sqrt(survivors * plan.noise.variance()) / plan.scale / survivors
    assert np.std(error) == pytest.approx(predicted_std, rel=0.06)
    assert abs(error.mean()) < 5 * predicted_std / math.sqrt(plan.dim)
    # the signal is there: the decoded mean points where the clipped deltas point
    cosine = mean @ truth / (np.linalg.norm(mean) * np.linalg.norm(truth))
    assert cosine > 0.9
    # the unclipped mean is NOT what comes back (clipping happened)
    assert np.linalg.norm(mean - np.mean(deltas, axis=0)) > 3 * np.linalg.norm(error)


def test_the_wrong_rotation_seed_decodes_to_garbage():
    plan = make_plan(dim=4096, target_epsilon=1000.0)
    delta = np.full(plan.dim, 1.0 / math.sqrt(plan.dim))
    vectors = [E.encode_site_delta(delta, plan, rotation_seed=SEED, noise_stream=key(i)).vector
               for i in range(plan.threshold)]
    total = ring_sum(vectors)
    good = E.decode_mean(total, plan, rotation_seed=SEED, survivors=plan.threshold)
    bad = E.decode_mean(total, plan, rotation_seed=b"not the round's seed",
                        survivors=plan.threshold)
    assert np.linalg.norm(good - delta) < 0.5 * np.linalg.norm(delta)
    assert np.linalg.norm(bad - delta) > 0.9 * np.linalg.norm(delta)


def test_a_narrow_ring_decodes_without_wrapping():
    """bits=16: sums of 20 sites fit the ring as planned (wrap bound ≤ 1e-9)."""
    plan = make_plan(dim=2048, bits=16, target_epsilon=8.0)
    rng = np.random.default_rng(4)
    deltas = [rng.normal(size=plan.dim) for _ in range(plan.sites_per_round)]
    vectors = [E.encode_site_delta(d, plan, rotation_seed=SEED, noise_stream=key(30 + i)).vector
               for i, d in enumerate(deltas)]
    assert max(int(v.max()) for v in vectors) < 2**16
    mean = E.decode_mean(ring_sum(vectors), plan, rotation_seed=SEED,
                         survivors=plan.sites_per_round)
    truth = np.mean([clipped(d, plan.clip) for d in deltas], axis=0)
    rounding = math.sqrt(plan.sites_per_round / 4) / plan.scale / plan.sites_per_round
    predicted = math.hypot(plan.central_std(plan.sites_per_round) / plan.sites_per_round,
                           rounding)
    assert np.std(mean - truth) < 1.1 * predicted  # a wrapped coordinate would be ~2^16/scale


# -- through secure aggregation -------------------------------------------------------------

def test_secure_aggregation_of_noised_shares_decodes_to_the_survivors_mean():
    """6 sites in a real SecAgg round (threshold 4), 2 drop after sharing keys: the unmasked
    sum of the 4 survivors decodes to their clipped mean, with the noise of 4 shares."""
    plan = make_plan(dim=1500, target_epsilon=20.0, sites=6, threshold=4)
    rng = np.random.default_rng(5)
    deltas = {i: rng.normal(size=plan.dim) * 0.02 for i in range(6)}
    vectors = {i: E.encode_site_delta(d, plan, rotation_seed=SEED,
                                      noise_stream=key(40 + i)).vector
               for i, d in deltas.items()}
    result = run_round(setup(6, threshold=4, session=b"site-dp-test"), vectors,
                       dropouts={m.STAGE_MASKED_INPUT: {1, 4}})
    assert result.survivors == {0, 2, 3, 5}
    mean = E.decode_mean(result.total, plan, rotation_seed=SEED, survivors=4)
    truth = np.mean([clipped(deltas[i], plan.clip) for i in sorted(result.survivors)], axis=0)
    predicted_std = plan.central_std(4) / 4
    assert np.std(mean - truth) == pytest.approx(predicted_std, rel=0.15)


def test_a_masked_noised_share_is_uniform_on_the_ring_even_from_a_narrow_encoding():
    """What the server receives from one site: encoding (< 2^16 here) + a ChaCha20 mask mod
    2^32. Every byte is uniform, the top two included: the narrow ring leaks nothing."""
    plan = make_plan(dim=16384, bits=16, target_epsilon=8.0)
    delta = np.linspace(-1, 1, plan.dim)
    share = E.encode_site_delta(delta, plan, rotation_seed=SEED, noise_stream=key(50)).vector
    masked = share + expand_mask(bytes(range(32)), share.size)
    for byte in range(4):
        counts = np.bincount((masked >> np.uint32(8 * byte)) & np.uint32(0xFF), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-3
    assert stats.kstest(masked / 2**32, "uniform").pvalue > 1e-3


# -- bad inputs -----------------------------------------------------------------------------

def test_bad_deltas_and_sums_are_refused_by_name():
    plan = make_plan()
    with pytest.raises(ValueError, match="3000"):
        E.encode_site_delta(np.zeros(10), plan, rotation_seed=SEED)
    with pytest.raises(ValueError, match="NaN"):
        E.encode_site_delta(np.full(plan.dim, np.nan), plan, rotation_seed=SEED)
    with pytest.raises(ValueError, match="real-valued"):
        E.encode_site_delta(np.array(["a"] * plan.dim), plan, rotation_seed=SEED)
    with pytest.raises(ValueError, match="no arrays"):
        E.encode_site_delta([], plan, rotation_seed=SEED)
    with pytest.raises(ValueError, match="uint32"):
        E.decode_sum(np.zeros(plan.padded_dim, dtype=np.int64), plan, rotation_seed=SEED)
    with pytest.raises(ValueError, match="padded dimension"):
        E.decode_sum(np.zeros(plan.dim, dtype=np.uint32), plan, rotation_seed=SEED)
    with pytest.raises(ValueError, match="survivors"):
        E.decode_mean(np.zeros(plan.padded_dim, dtype=np.uint32), plan, rotation_seed=SEED,
                      survivors=plan.threshold - 1)
