"""The exact discrete Gaussian sampler and its ChaCha20 randomness (privacy/site_dp)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from privacy.site_dp import discrete_gaussian as dg
from privacy.site_dp.discrete_gaussian import DiscreteGaussian, bernoulli_exp
from privacy.site_dp.randomness import KeyStream


def stream(label: int = 0) -> KeyStream:
    return KeyStream(label.to_bytes(32, "little"))


def chi_square_p(counts: np.ndarray, probabilities: np.ndarray) -> float:
    expected = probabilities / probabilities.sum() * counts.sum()
    return float(stats.chisquare(counts, expected).pvalue)


def discrete_gaussian_pmf(sigma_squared: float, support: np.ndarray) -> np.ndarray:
    weights = np.exp(-support.astype(np.float64) ** 2 / (2 * sigma_squared))
    half_width = 60 * int(math.sqrt(sigma_squared) + 1)
    wide = np.arange(-half_width, half_width + 1)
    return weights / np.exp(-wide**2 / (2 * sigma_squared)).sum()


# -- randomness -----------------------------------------------------------------------------

def test_uniform_below_is_uniform_for_bounds_that_are_not_powers_of_two():
    draws = stream(1).uniform_below_scalar(60_000, 6)
    assert draws.min() == 0 and draws.max() == 5
    assert chi_square_p(np.bincount(draws, minlength=6), np.ones(6)) > 1e-4
    assert (stream(2).uniform_below_scalar(100, 1) == 0).all()
    top = stream(2).uniform_below_scalar(1000, 2**62)
    assert top.max() > 2**61 and top.min() >= 0  # the top half of a 2⁶² range is reached
    # 3·2⁶⁰ rejects a quarter of the 63-bit words: the redrawn lanes must stay uniform
    thirds = stream(3).uniform_below_scalar(30_000, 3 * 2**60) // 2**60
    assert chi_square_p(np.bincount(thirds, minlength=3), np.ones(3)) > 1e-4
    with pytest.raises(ValueError, match="bound"):
        stream().uniform_below_scalar(3, 0)


def test_big_python_integer_bounds_are_uniform_too():
    s = stream(3)
    draws = np.array([s.uniform_below_int(5) for _ in range(20_000)])
    assert chi_square_p(np.bincount(draws, minlength=5), np.ones(5)) > 1e-4
    big = 3 * 2**100 + 1
    assert all(0 <= s.uniform_below_int(big) < big for _ in range(100))


def test_a_keystream_needs_a_32_byte_key_and_never_shows_it():
    with pytest.raises(ValueError, match="32 bytes"):
        KeyStream(b"short")
    key = bytes(range(32))
    assert key.hex() not in repr(KeyStream(key))
    assert KeyStream(key).read(64) == KeyStream(key).read(64)
    assert KeyStream().read(32) != KeyStream().read(32)  # fresh os.urandom keys


def test_public_streams_agree_for_the_same_seed_and_label_only():
    a = KeyStream.public(b"round-7", "rotation").read(32)
    assert a == KeyStream.public(b"round-7", "rotation").read(32)
    assert a != KeyStream.public(b"round-8", "rotation").read(32)
    assert a != KeyStream.public(b"round-7", "other").read(32)
    with pytest.raises(ValueError, match="seed"):
        KeyStream.public(b"", "rotation")


# -- Bernoulli(exp(−γ)) --------------------------------------------------------------------

@pytest.mark.parametrize(("num", "den"), [(0, 1), (3, 10), (1, 1), (5, 2), (7, 3)])
def test_bernoulli_exp_has_probability_exp_minus_gamma(num, den):
    n = 40_000
    hits = bernoulli_exp(np.full(n, num, np.int64), den, stream(4))
    p = math.exp(-num / den)
    assert abs(hits.mean() - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_the_python_integer_path_gives_the_same_probability(monkeypatch):
    # force every lane past the int64 guard: the walk must continue exactly, not restart
    monkeypatch.setattr(dg, "_INT64_SAFE", 4)
    n = 4_000
    hits = bernoulli_exp(np.full(n, 3, np.int64), 10, stream(5))
    p = math.exp(-0.3)
    assert abs(hits.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)


# -- the discrete Gaussian ------------------------------------------------------------------

@pytest.mark.parametrize("sigma_squared", [1, 2, 10])
def test_small_sigma_samples_follow_the_discrete_gaussian_pmf(sigma_squared):
    """Exactness where it shows: at σ² ≤ 10 the discrete Gaussian differs visibly from a
    rounded continuous one (σ² = 1: p(0) = 0.4269 vs 0.3829)."""
    noise = DiscreteGaussian.at_least(sigma_squared)
    assert noise.sigma_squared == sigma_squared
    draws = noise.sample(60_000, stream(6))
    support = np.arange(-5 * int(math.sqrt(sigma_squared) + 1),
                        5 * int(math.sqrt(sigma_squared) + 1) + 1)
    pmf = discrete_gaussian_pmf(sigma_squared, support)
    counts = np.array([(draws == y).sum() for y in support])
    keep = pmf * draws.size > 5
    tail_count = draws.size - counts[keep].sum()
    tail_p = 1 - pmf[keep].sum()
    p = chi_square_p(np.append(counts[keep], tail_count), np.append(pmf[keep], tail_p))
    assert p > 1e-4, (sigma_squared, p)


def test_a_rounded_continuous_gaussian_fails_the_same_check():
    # the check above can fail: round(N(0, 1)) is not N_Z(0, 1)
    draws = np.rint(np.random.default_rng(0).normal(size=60_000)).astype(int)
    support = np.arange(-5, 6)
    pmf = discrete_gaussian_pmf(1, support)
    counts = np.array([(draws == y).sum() for y in support])
    keep = pmf * draws.size > 5
    assert chi_square_p(np.append(counts[keep], draws.size - counts[keep].sum()),
                        np.append(pmf[keep], 1 - pmf[keep].sum())) < 1e-6


@pytest.mark.parametrize("sigma_squared", [1e6 + 3, 2.0**50])
def test_large_sigma_samples_have_mean_zero_and_variance_sigma_squared(sigma_squared):
    noise = DiscreteGaussian.at_least(sigma_squared)
    assert 0 <= noise.sigma_squared / sigma_squared - 1 <= 2 / math.sqrt(sigma_squared)
    n = 200_000
    draws = noise.sample(n, stream(7)).astype(np.float64)
    sigma = math.sqrt(noise.sigma_squared)
    assert abs(draws.mean()) < 5 * sigma / math.sqrt(n)
    assert abs(draws.var() / noise.variance() - 1) < 5 * math.sqrt(2 / n)
    # symmetric tails: as many beyond +2σ as below −2σ, and Gaussian-sized
    above, below = (draws > 2 * sigma).mean(), (draws < -2 * sigma).mean()
    assert abs(above - below) < 0.004 and abs(above - stats.norm.sf(2)) < 0.003


def test_the_same_key_gives_the_same_noise():
    noise = DiscreteGaussian.at_least(1e8)
    assert np.array_equal(noise.sample(1000, stream(8)), noise.sample(1000, stream(8)))
    assert not np.array_equal(noise.sample(1000, stream(8)), noise.sample(1000, stream(9)))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "3", True])
def test_a_bad_noise_level_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="sigma_squared"):
        DiscreteGaussian.at_least(bad)


def test_bad_parameters_are_refused_by_name():
    with pytest.raises(ValueError, match="DiscreteGaussian.t"):
        DiscreteGaussian(0, 5)
    with pytest.raises(ValueError, match="2\\*\\*56"):
        DiscreteGaussian(2**31, 2**31)
    with pytest.raises(ValueError, match="size"):
        DiscreteGaussian(2, 2).sample(-1, stream())
