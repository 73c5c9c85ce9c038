"""Exact sampler for the discrete Gaussian N_Z(0, σ²) (Canonne, Kamath, Steinke, NeurIPS 2020).

N_Z(0, σ²) gives the integer y probability ∝ exp(−y²/(2σ²)). It is the noise of the
distributed discrete Gaussian mechanism (Kairouz, Liu, Steinke 2021): integer noise can be added
inside the secure-aggregation ring, where floats cannot.

Algorithm (CKS 2020, Algorithms 1–3), integers only, randomness from :class:`KeyStream`:

1. Bernoulli(exp(−a/b)), a ≤ b: K ← 1; while Bernoulli(a/(b·K)) (a uniform integer in
   [0, b·K) below a): K ← K + 1. Output [K odd]. For a > b: ⌊a/b⌋ Bernoulli(exp(−1)) then one
   Bernoulli(exp(−(a mod b)/b)).
2. Discrete Laplace with integer scale t: U uniform in [0, t), keep with Bernoulli(exp(−U/t)),
   V ~ Geometric (count of Bernoulli(exp(−1)) successes), X = U + t·V, a random sign, rejecting
   (−, 0) so zero is not counted twice.
3. Discrete Gaussian: propose Y ~ DLap(t), accept with Bernoulli(exp(−(|Y| − σ²/t)²/(2σ²))).

Parameterisation: σ² = t·m with integers t ≈ ⌊σ⌋ + 1 and m = ⌈σ²_min / t⌉
(:meth:`DiscreteGaussian.at_least`). CKS take t = ⌊σ⌋ + 1 for speed, but the rejection step is
exact for any integer t > 0; choosing σ² a multiple of t makes σ²/t = m an integer, so the
acceptance exponent is (|Y| − m)²/(2tm): a ratio of integers that fit int64 for |Y − m| < 2³¹,
and the sampler runs vectorised in numpy. Rounding σ² up to t·m only adds noise (relative
increase below t/σ² ≈ 1/σ).

Vectorisation keeps the algorithm exact: every lane runs the same attempts as the scalar
algorithm; failed attempts restart (each attempt is independent, so retrying only the failed
lanes changes nothing); the rare lane whose integers would overflow int64 finishes the SAME
attempt in Python integers (never a fresh draw, which would bias the tail).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from privacy.site_dp.randomness import KeyStream

# σ² = t·m ≤ 2⁵⁶ keeps 2tm·K ≤ 2⁶² on the int64 vector path up to K = 32 (a walk that long
# has probability below 1/31!; past it the lane continues in Python integers).
MAX_SIGMA_SQUARED = 2**56
_INT64_SAFE = 2**62
_SQUARE_SAFE = 2**31


@dataclass(frozen=True)
class DiscreteGaussian:
    """N_Z(0, σ²) with σ² = t·m (integers): ``t`` the Laplace scale, ``m`` = σ²/t."""

    t: int
    m: int

    def __post_init__(self) -> None:
        for name in ("t", "m"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"DiscreteGaussian.{name} must be an integer >= 1, got {value!r}")
        if self.t * self.m > MAX_SIGMA_SQUARED:
            raise ValueError(f"σ² = t·m = {self.t * self.m} exceeds the sampler's limit 2**56")

    @classmethod
    def at_least(cls, sigma_squared: float) -> DiscreteGaussian:
        """The smallest σ² = t·m ≥ ``sigma_squared`` over t in [max(σ/2, σ − 63), ⌊σ⌋ + 1]
        (near CKS's efficient t = ⌊σ⌋ + 1; ties go to the larger t). σ² becomes an integer;
        the increase is below t/σ² ≈ 1/σ (negligible for the σ² ≫ 1 of a real plan)."""
        if (isinstance(sigma_squared, bool) or not isinstance(sigma_squared, int | float)
                or not math.isfinite(sigma_squared) or sigma_squared <= 0):
            raise ValueError(f"sigma_squared must be a positive finite number, got "
                             f"{sigma_squared!r}")
        target = math.ceil(Fraction(sigma_squared))
        top = math.isqrt(target) + 1
        # t below ~σ/2 would make the Laplace proposal too narrow (acceptance falls like
        # exp(−(σ/t)²/2)); within [σ/2, σ + 1] the cost stays within a small constant.
        best = min(range(max(1, (top + 1) // 2, top - 64), top + 1),
                   key=lambda t: (t * -(-target // t), -t))
        return cls(best, -(-target // best))

    @property
    def sigma_squared(self) -> int:
        return self.t * self.m

    def variance(self) -> float:
        """The exact variance Σ y²·p(y) (slightly below σ² for σ < 1, equal to it within
        float precision for σ ≥ 2)."""
        sigma2 = float(self.sigma_squared)
        if sigma2 > 400:  # deviation from σ² is below σ²·e^(−2π²σ²)·(4π²σ²): far under 1 ulp
            return sigma2
        half_width = int(math.ceil(40 * math.sqrt(sigma2))) + 2
        ys = np.arange(-half_width, half_width + 1, dtype=np.float64)
        weights = np.exp(-ys**2 / (2 * sigma2))
        return float((ys**2 * weights).sum() / weights.sum())

    def sample(self, size: int, stream: KeyStream) -> np.ndarray:
        """``size`` independent draws (int64) with randomness from ``stream``."""
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 0:
            raise ValueError(f"size must be a non-negative integer, got {size!r}")
        out = np.empty(int(size), dtype=np.int64)
        pending = np.arange(int(size))
        t, m = int(self.t), int(self.m)
        while pending.size:
            values, accepted = _attempt(pending.size, t, m, stream)
            out[pending[accepted]] = values[accepted]
            pending = pending[~accepted]
        return out


def _attempt(count: int, t: int, m: int, stream: KeyStream) -> tuple[np.ndarray, np.ndarray]:
    """One attempt of CKS Algorithm 3 on ``count`` lanes: (values, accepted mask)."""
    # Algorithm 2: discrete Laplace with scale t
    u = stream.uniform_below_scalar(count, t)
    keep = bernoulli_exp(u, t, stream)
    v = np.zeros(count, dtype=np.int64)
    lanes = np.flatnonzero(keep)
    while lanes.size:  # V = number of Bernoulli(exp(−1)) successes before the first failure
        success = _bernoulli_exp_minus_one(lanes.size, stream)
        lanes = lanes[success]
        v[lanes] += 1
    magnitude = u + t * v  # V ≤ ~60 in practice; t·V stays far inside int64
    negative = stream.bits(count).astype(bool)
    keep &= ~(negative & (magnitude == 0))
    # Algorithm 3's acceptance: Bernoulli(exp(−(|Y| − m)²/(2tm)))
    accepted = np.zeros(count, dtype=bool)
    lanes = np.flatnonzero(keep)
    offset = magnitude[lanes] - m
    small = np.abs(offset) < _SQUARE_SAFE
    den = 2 * t * m
    accepted[lanes[small]] = bernoulli_exp(offset[small] ** 2, den, stream)
    for lane, off in zip(lanes[~small], offset[~small], strict=True):
        accepted[lane] = _bernoulli_exp_scalar(int(off) ** 2, den, stream)
    values = np.where(negative, -magnitude, magnitude)
    return values, accepted


def bernoulli_exp(num: np.ndarray, den: int, stream: KeyStream) -> np.ndarray:
    """Per lane, an exact Bernoulli(exp(−num/den)) (bool); int64 ``num >= 0`` per lane, one
    integer ``den >= 1`` for all lanes (every use in the sampler has a common denominator)."""
    num = np.asarray(num, dtype=np.int64)
    den = int(den)
    if den < 1 or den > 2**62:
        raise ValueError(f"den must be an integer in [1, 2**62], got {den}")
    whole = num // den
    result = np.ones(num.shape, dtype=bool)
    # ⌊γ⌋ independent Bernoulli(exp(−1)); any failure gives 0 (CKS Algorithm 1, γ > 1)
    lanes = np.flatnonzero(whole > 0)
    remaining = whole[lanes]
    while lanes.size:
        success = _bernoulli_exp_minus_one(lanes.size, stream)
        result[lanes[~success]] = False
        remaining = remaining - 1
        going = success & (remaining > 0)
        lanes, remaining = lanes[going], remaining[going]
    lanes = np.flatnonzero(result)
    result[lanes] = _bernoulli_exp_at_most_one(num[lanes] - whole[lanes] * den, den, stream)
    return result


def _bernoulli_exp_minus_one(count: int, stream: KeyStream) -> np.ndarray:
    """``count`` exact Bernoulli(exp(−1)): Algorithm 1 with γ = 1, whose first step
    (Bernoulli(1/1)) always succeeds, so the walk starts at K = 2."""
    odd = np.ones(count, dtype=bool)
    lanes = np.arange(count)
    k = 2
    while lanes.size:
        go_on = stream.uniform_below_scalar(lanes.size, k) == 0  # Bernoulli(1/K)
        if k % 2 == 0:
            odd[lanes[~go_on]] = False
        lanes = lanes[go_on]
        k += 1
    return odd


def _bernoulli_exp_at_most_one(a: np.ndarray, b: int, stream: KeyStream) -> np.ndarray:
    """Exact Bernoulli(exp(−a/b)) for 0 ≤ a ≤ b (CKS Algorithm 1, γ ≤ 1), vectorised.

    All live lanes share the same K (they start at 1 and step together; a lane leaves when its
    Bernoulli(a/(bK)) fails) and the same b, so each step draws uniforms below one bound."""
    odd = np.ones(a.shape, dtype=bool)
    lanes = np.arange(a.size)
    a_live = a
    k = 1
    while lanes.size:
        if b > _INT64_SAFE // k:  # b·K past 2⁶² (K ≳ 32 at the largest σ²): Python integers
            for lane, a_i in zip(lanes, a_live, strict=True):
                odd[lane] = _series_scalar(int(a_i), b, k, stream) % 2 == 1
            break
        go_on = stream.uniform_below_scalar(lanes.size, b * k) < a_live
        if k % 2 == 0:  # lanes stopping now end with an even K
            odd[lanes[~go_on]] = False
        lanes, a_live = lanes[go_on], a_live[go_on]
        k += 1
    return odd


def _series_scalar(a: int, b: int, k: int, stream: KeyStream) -> int:
    """The K loop of CKS Algorithm 1 continued from ``k`` in Python integers; the final K."""
    while stream.uniform_below_int(b * k) < a:
        k += 1
    return k


def _bernoulli_exp_scalar(num: int, den: int, stream: KeyStream) -> bool:
    """Bernoulli(exp(−num/den)) in Python integers (any size)."""
    for _ in range(num // den):
        if _series_scalar(1, 1, 1, stream) % 2 == 0:
            return False
    return _series_scalar(num % den, den, 1, stream) % 2 == 1
