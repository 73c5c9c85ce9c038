"""The empirical ε lower bound of a one-run audit (Steinke, Nasr, Jagielski, NeurIPS 2023).

m canaries, each included in training independently with probability ½; after training every
canary gets a score (higher = "looks included"). The auditor abstains on most canaries and guesses
"in" for the k₊ highest scores and "out" for the k₋ lowest: r = k₊ + k₋ guesses, v correct.
If training is (ε, δ)-DP, the number of correct guesses is stochastically dominated as in
Theorem 5.2 of the paper, which gives the p-value (their Algorithm 2 / Appendix D code):

    q = e^ε / (1 + e^ε)                      accuracy of ε-DP randomized response
    β = P[Bin(r, q) ≥ v]
    α = max_{1≤i≤v} P[v − i ≤ Bin(r, q) < v] / i
    p(ε) = β + 2·m·δ·α

ε_lb is the largest ε with p(ε) ≤ 1 − confidence, found by bisection (p grows with ε: a
looser guarantee makes v correct guesses less surprising).
Reference values (δ = 1e-5, 95 %): every guess right gives m = 100 → 3.49, m = 1000 → 5.78;
the idealized Gaussian mechanism with m = 10⁵ gives σ = 1 → ≈ 2.6–2.7, σ = 2 → ≈ 1.3.

Choosing the number of guesses. The paper reports, per experiment, the best bound over a sweep of
k₊ (= k₋ here). A maximum over several k is a multiple test: taken at face value its confidence is
below the nominal one. :func:`audit_epsilon` therefore sweeps a grid of guess counts and, by
tests each at confidence 1 − (1 − confidence)/len(grid) (Bonferroni), so the reported ε_lb is a
valid bound at the stated confidence; the paper's convention (best point, each at the nominal
confidence) is returned beside it as ``epsilon_lb_best_uncorrected``. The correction costs a lot
when 2·m·δ is not small (m = 10⁵, σ = 1, 10 points: 2.72 → 1.89), so pass a one-point grid when
the number of guesses is fixed in advance (e.g. from a pilot run or the idealized model).

The binomial terms are computed in log space with ``torch.lgamma`` (float64), so this module needs
no dependency beyond the project's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

DEFAULT_CONFIDENCE = 0.95
_BISECTION_STEPS = 40  # ε to ~1e-11 relative on [0, 64]: far below any sampling error


def _log_binomial_pmf(r: int, q: float) -> np.ndarray:
    """log P[Bin(r, q) = j] for j = 0..r (float64, exact up to rounding)."""
    j = torch.arange(r + 1, dtype=torch.float64)
    log_choose = torch.lgamma(torch.tensor(r + 1.0, dtype=torch.float64)) - torch.lgamma(j + 1) \
        - torch.lgamma(r - j + 1)
    # q and 1 − q from the logistic function directly, so large ε keeps full precision
    return (log_choose + j * math.log(q) + (r - j) * math.log1p(-q)).numpy()


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """p-value of observing ≥ v correct out of r guesses on m canaries if training is (ε, δ)-DP.

    Theorem 5.2 of Steinke et al. (2023); the same function as their Appendix D code.
    """
    _check_counts(m, r, v)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
    if r == 0:
        return 1.0
    log_q = -math.log1p(math.exp(-epsilon))  # q = e^ε/(1+e^ε)
    q = math.exp(log_q)
    log_pmf = _log_binomial_pmf(r, q)
    top = log_pmf[v:]
    peak = top.max()
    beta = float(np.exp(peak) * np.exp(top - peak).sum())
    alpha = 0.0
    if v > 0 and delta > 0:
        # P[v − i ≤ Bin < v] for i = 1..v: a cumulative sum of pmf(v−1), pmf(v−2), …, pmf(0)
        below = np.cumsum(np.exp(log_pmf[v - 1::-1]))
        alpha = float((below / np.arange(1, v + 1)).max())
    return min(1.0, beta + 2.0 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float,
                        confidence: float = DEFAULT_CONFIDENCE) -> float:
    """Largest ε whose p-value is still ≤ 1 − confidence (0 when even ε = 0 is not rejected)."""
    _check_counts(m, r, v)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    alpha_level = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) > alpha_level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) <= alpha_level:  # the bound is finite: p(∞) ≥ 2mδα > 0
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no finite ε rejects (m={m}, r={r}, v={v}, delta={delta}); "
                             "delta must be > 0")
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) <= alpha_level:
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class AuditResult:
    """One ε lower bound with everything needed to re-check it."""

    epsilon_lb: float   # valid at ``confidence`` (Bonferroni over the grid when it has > 1 point)
    m: int              # canaries
    guesses: int        # r = k₊ + k₋ at the best grid point (abstained on the rest)
    correct: int        # v at that point
    delta: float
    confidence: float
    grid: tuple[int, ...]     # guess counts tried
    bounds: tuple[float, ...]  # ε_lb at every grid point, each at the corrected confidence
    # The paper's convention: the best grid point, each tested at the nominal confidence. Not a
    # valid bound at ``confidence`` when the grid has > 1 point (a maximum over several tests);
    # shown beside epsilon_lb for comparison with published numbers.
    epsilon_lb_best_uncorrected: float

    def to_dict(self) -> dict:
        return asdict(self)


def guess_counts(scores: Sequence[float] | np.ndarray, included: Sequence[bool] | np.ndarray,
                 guesses: int) -> tuple[int, int]:
    """(r, v): guess "in" for the guesses/2 highest scores, "out" for the guesses/2 lowest."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.ndim != 1 or scores.shape != included.shape:
        raise ValueError(f"scores and included must be 1-D of the same length, got "
                         f"{scores.shape} and {included.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite (a NaN or inf score cannot be ranked)")
    if not 0 < guesses <= len(scores) or guesses % 2:
        raise ValueError(f"guesses must be even and in [2, m={len(scores)}], got {guesses}")
    k = guesses // 2
    # stable sort on (score, index): ties are broken the same way every run
    order = np.argsort(scores, kind="stable")
    correct = int(included[order[-k:]].sum() + (~included[order[:k]]).sum())
    return guesses, correct


def default_guess_grid(m: int) -> tuple[int, ...]:
    """Guess counts r swept for m canaries: m itself and m/2, m/5, m/10, … down to ≥ 10."""
    grid = []
    for fraction in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000):
        r = (m // fraction) // 2 * 2
        if r >= 10 and r not in grid:
            grid.append(r)
    return tuple(grid) or ((m // 2) * 2,)


def audit_epsilon(scores: Sequence[float] | np.ndarray, included: Sequence[bool] | np.ndarray,
                  delta: float, *, confidence: float = DEFAULT_CONFIDENCE,
                  grid: Sequence[int] | None = None) -> AuditResult:
    """ε lower bound from canary scores and their true inclusion, best over a grid of guesses.

    Each grid point is tested at 1 − (1 − confidence)/len(grid), so ``epsilon_lb`` holds at
    ``confidence`` whichever point wins; a single-point grid needs no correction.
    """
    included = np.asarray(included, dtype=bool)
    m = len(included)
    if m < 2:
        raise ValueError(f"an audit needs at least 2 canaries, got {m}")
    grid = tuple(int(g) for g in grid) if grid is not None else default_guess_grid(m)
    if not grid:
        raise ValueError("grid of guess counts must not be empty")
    corrected = 1.0 - (1.0 - confidence) / len(grid)
    best = (-1.0, 0, 0)
    bounds, uncorrected = [], []
    for guesses in grid:
        r, v = guess_counts(scores, included, guesses)
        eps = epsilon_lower_bound(m, r, v, delta, corrected)
        bounds.append(eps)
        uncorrected.append(eps if len(grid) == 1 else epsilon_lower_bound(m, r, v, delta,
                                                                           confidence))
        if eps > best[0]:
            best = (eps, r, v)
    return AuditResult(epsilon_lb=best[0], m=m, guesses=best[1], correct=best[2], delta=delta,
                       confidence=confidence, grid=grid, bounds=tuple(bounds),
                       epsilon_lb_best_uncorrected=max(uncorrected))


def _check_counts(m: int, r: int, v: int) -> None:
    if not (isinstance(m, int | np.integer) and isinstance(r, int | np.integer)
            and isinstance(v, int | np.integer)):
        raise ValueError(f"m, r, v must be integers, got {m!r}, {r!r}, {v!r}")
    if not 0 <= v <= r <= m:
        raise ValueError(f"expected 0 <= correct v <= guesses r <= canaries m, got "
                         f"m={m}, r={r}, v={v}")
