"""A site's privacy ledger: what DP-SGD has spent on this hospital's records, across all rounds.

The guarantee a site signs off on is "(ε, δ)-DP for each patient record over the whole
collaboration", so the accountant must see every local step of every round, not one round at a
time (a fresh Opacus ``PrivacyEngine`` per round under-reports ε by about the number of rounds).
This module keeps that state in a small JSON-safe ledger; the accounting is Opacus's (its PRV
and RDP accountants, :mod:`opacus.accountants`), fed with the ledger's history of
``(σ, q, steps)`` and recomputed here from Opacus's own pieces, cached, so that ε after 100
rounds costs tens of milliseconds (Opacus: ~0.3-0.6 s) and a repeated history or σ plan
microseconds; see "accounting math" below.

Invariants the ledger protects:

- σ and q are fixed per site for the whole run (σ from :func:`noise_multiplier_for`, computed
  once from the planned total steps), so the history stays ONE DP-SGD entry (after the count
  release). PRV cost grows with distinct entries: each brings its own RDP series and
  discretisation (here ≈0.1 s for 1 entry, 1.1 s for 10, 24 s for 100; Opacus 0.24 s, 1.8 s,
  105 s).
- The ε after round r equals what one continuous Opacus accountant gives for all steps so far:
  the history is merged exactly as ``IAccountant.step`` merges it.
- A round is declined BEFORE training, from :meth:`PrivacyLedger.epsilon_after`; the value it
  predicts is memoised and is exactly what :meth:`PrivacyLedger.record_round` then records, so
  the PRV cost is paid once per round (and once per process for sites with the same history).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from privacy.files import write_atomically

# Opacus is imported inside the functions that account, not here: the site's policy (which
# reads ACCOUNTANTS) also runs in processes that never train (a SuperNode starts one per
# message, secure-aggregation stages and refusals included), and Opacus takes most of a second.
if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

ACCOUNTANTS = ("prv", "rdp")
LEDGER_FORMAT = "medsilo.privacy_ledger"
LEDGER_VERSION = 1

# History entry exactly as Opacus stores it: (noise_multiplier, sample_rate, steps).
HistoryEntry = tuple[float, float, int]


class LedgerFileError(ValueError):
    """A ledger file that cannot be read back (truncated, corrupted, or not a ledger)."""


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return accountant


def _check_delta(delta: float) -> float:
    if not (isinstance(delta, int | float) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_sample_rate(sample_rate: float) -> float:
    if not (isinstance(sample_rate, int | float) and 0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return float(sample_rate)


# --------------------------------------------------------------------- accounting math
# Opacus's own accountants, recomputed so that a federation can afford them. Where Opacus's
# ``PRVAccountant.get_epsilon`` spends its time (q = 1/13, 1500 steps after the count release,
# a grid of 359 406 points; ≈0.3 s on an idle core): sizing the grid with three RDP
# evaluations (a per-order series in Python), discretising each entry's PRV (its CDF at both
# edges of every bin, its mean by ~600 scalar quadrature calls of an array CDF), composing (an
# FFT per entry, then a linear convolution per pair of entries), reading ε off the result.
# Here, step for step the same numbers: the same grid, with RDP of one step cached per (σ, q)
# (Opacus computes k steps as k times one); each entry's PMF bit for bit, evaluated only on the
# bins its CDF does not saturate, and its mean by the same quadrature over a scalar CDF; all
# entries composed by ONE product of their spectra's powers, on Opacus's FFT length; the same
# read-out on t ≥ 0. ε agrees with Opacus to ~1e-11 relative (rounding only). Results are
# memoised per process by (accountant, history, δ): ε is a pure function of them, so a cache
# hit returns exactly what a recomputation would.

PRV_EPS_ERROR = 0.01  # Opacus's get_epsilon defaults: eps_error=0.01, delta_error=δ/1000
CACHE_SIZE = 1024  # ε, σ plans and one-step RDP vectors kept per process (a few bytes each)


def epsilon_spent(accountant: str, history: list[HistoryEntry] | tuple[HistoryEntry, ...],
                  delta: float) -> float:
    """ε of an Opacus accountant (``"prv"``: its upper bound; ``"rdp"``) holding ``history``
    at ``delta``, with Opacus's default precision; memoised per process."""
    if not history:
        return 0.0
    key = tuple((float(sigma), float(q), int(steps)) for sigma, q, steps in history)
    return _memoised_epsilon(_check_accountant(accountant), key, _check_delta(delta))


@functools.lru_cache(maxsize=CACHE_SIZE)
def _memoised_epsilon(accountant: str, history: tuple[HistoryEntry, ...], delta: float) -> float:
    if accountant == "rdp":
        return _rdp_epsilon(history, delta)
    return _prv_epsilon(history, delta)


def _caches() -> dict[str, Any]:
    return {"epsilon": _memoised_epsilon, "noise_multiplier": _memoised_noise_multiplier,
            "rdp_of_one_step": _rdp_of_one_step}


def clear_accounting_caches(*names: str) -> None:
    """Forget this process's memoised ε (``"epsilon"``), σ plans (``"noise_multiplier"``) and
    one-step RDP vectors (``"rdp_of_one_step"``); all of them without ``names`` (benchmarks,
    tests: the values never depend on what is cached)."""
    caches = _caches()
    for name in names or tuple(caches):
        caches[name].cache_clear()


def accounting_cache_info() -> dict[str, dict[str, int]]:
    """Hits, misses, size and bound (``maxsize``) of each accounting cache in this process."""
    return {name: cached.cache_info()._asdict() for name, cached in _caches().items()}


@functools.lru_cache(maxsize=CACHE_SIZE)
def _rdp_of_one_step(sigma: float, q: float) -> np.ndarray:
    """RDP of one subsampled-Gaussian step at Opacus's default orders (read-only)."""
    from opacus.accountants.analysis.rdp import compute_rdp
    from opacus.accountants.rdp import RDPAccountant

    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp.flags.writeable = False
    return rdp


def _rdp_epsilon(history: tuple[HistoryEntry, ...], delta: float) -> float:
    """``RDPAccountant.get_epsilon``: the same sum, in the same order, of k · RDP(one step)."""
    from opacus.accountants.analysis.rdp import get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    rdp = sum([_rdp_of_one_step(sigma, q) * steps for sigma, q, steps in history])
    epsilon, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(epsilon)


def _prv_domain(history: tuple[HistoryEntry, ...], eps_error: float, delta_error: float) -> Any:
    """``PRVAccountant._get_domain``: the grid the whole history's PRV fits on."""
    from opacus.accountants.analysis.prv import Domain

    total_steps = sum(steps for _, _, steps in history)
    half_width = _rdp_epsilon(history, delta_error / 4)
    for sigma, q, _ in history:
        half_width = max(half_width, _rdp_epsilon(((sigma, q, 1),),
                                                  delta_error / (8 * total_steps)))
    half_width = max(half_width, eps_error) + 3
    mesh = eps_error / np.sqrt(total_steps * np.log(12 / delta_error) / 2)
    return Domain.create_aligned(-half_width, half_width, mesh)


# Where the CDF of one step's PRV (Gopi et al. 2021, prop. B4, as Opacus writes it) is exactly
# 0 or exactly 1 in floating point, so that a grid bin there has mass exactly 0:
# 1 − q·erfc(a)/2 − (1 − q)·erfc(b)/2 with a, b = (2zσ² ∓ 1)/(2√2σ), z = log((eᵗ + q − 1)/q).
# erfc(x) < 2e-29 for x ≥ 8 (the sum rounds to 1) and erfc(x) rounds to 2 for x ≤ −8;
# below log(1 − q) Opacus returns 0 outright.
_ERFC_SATURATED = 8.0


def _cdf_support(sigma: float, q: float) -> tuple[float, float]:
    """(lo, hi): the CDF is exactly 0 at t ≤ lo and exactly 1 at t ≥ hi."""
    z_edge = (2 * math.sqrt(2) * sigma * _ERFC_SATURATED + 1) / (2 * sigma**2)
    with np.errstate(divide="ignore"):  # q = 1: log(1 - q) = -inf
        log_rest = float(np.log(1 - q))
    lo = log_rest if q < 1 else -z_edge  # with q = 1, z = t
    hi = float(np.logaddexp(math.log(q) + z_edge, log_rest))  # t where z = z_edge
    return lo, hi


def _discretise(sigma: float, q: float, domain: Any) -> tuple[np.ndarray, float]:
    """Opacus's ``discretize`` of one step's PRV truncated to ``domain``: the same PMF, bit
    for bit (its CDF evaluated only on bins inside its support: a step's PRV covers a few
    percent of a grid sized for many steps), and the same mean shift up to rounding (~1e-16)."""
    from opacus.accountants.analysis.prv import (
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
    )

    with np.errstate(divide="ignore"):  # q = 1 (the count release): log(1 - q) = -inf
        step_prv = PoissonSubsampledGaussianPRV(q, sigma)
        truncated = TruncatedPrivacyRandomVariable(step_prv, domain.t_min, domain.t_max)
        centres = domain.ts
        left, right = centres - domain.dt / 2, centres + domain.dt / 2
        lo, hi = _cdf_support(sigma, q)
        # bins with both edges at or below lo, or both at or above hi, hold exactly 0
        first = int(np.searchsorted(right, lo, side="right"))
        last = int(np.searchsorted(left, hi, side="left"))
        pmf = np.zeros(domain.size)
        pmf[first:last] = truncated.cdf(right[first:last]) - truncated.cdf(left[first:last])
        mean_shift = _truncated_mean(step_prv, domain, (lo, hi)) - np.dot(centres, pmf)
    if np.abs(mean_shift) >= domain.dt / 2:  # as Opacus: the grid is too coarse for this PRV
        raise RuntimeError("Discrete mean differs significantly from continuous mean.")
    return pmf, float(mean_shift)


def _truncated_mean(step_prv: Any, domain: Any, support: tuple[float, float]) -> float:
    """``TruncatedPrivacyRandomVariable.mean`` of ``step_prv`` truncated to ``domain``: the
    same integration by parts, the same pieces and the same adaptive quadrature, with the CDF
    written for one float at a time (the quadrature calls it ~600 times; Opacus's array
    version costs ~30 µs a call)."""
    from scipy import integrate

    sigma, q = step_prv.noise_multiplier, step_prv.sample_rate
    t_min, t_max = domain.t_min, domain.t_max
    lo, hi = support
    cdf_min = step_prv.cdf(t_min)
    mass = float(step_prv.cdf(t_max) - cdf_min)  # what Opacus's truncation divides by
    cdf_min = float(cdf_min)
    sqrt2 = math.sqrt(2)

    def cdf(t: float) -> float:
        if t < t_min:
            return 0.0
        if t >= t_max:
            return 1.0
        if t <= lo or t >= hi:  # exactly 0 or 1 there (see _cdf_support)
            return ((0.0 if t <= lo else 1.0) - cdf_min) / mass
        try:
            z = math.log((math.exp(t) + q - 1) / q)
        except OverflowError:  # numpy's exp gives inf there, and Opacus's CDF 1
            return (1.0 - cdf_min) / mass
        return ((-q * math.erfc((2 * z * sigma**2 - 1) / (2 * sqrt2 * sigma)) / 2
                 - (1 - q) * math.erfc((2 * z * sigma**2 + 1) / (2 * sqrt2 * sigma)) / 2
                 + 1.0) - cdf_min) / mass

    points = np.concatenate([
        [t_min], -np.logspace(start=int(np.log10(np.abs(t_min))), stop=-5, num=10),
        [0], np.logspace(start=-5, stop=int(np.log10(t_max)), num=10), [t_max]])
    mean = 0.0
    for left, right in zip(points[:-1].tolist(), points[1:].tolist()):
        integral, _ = integrate.quad(cdf, left, right, limit=500)
        mean += right * cdf(right) - left * cdf(left) - integral
    return mean


def _prv_epsilon(history: tuple[HistoryEntry, ...], delta: float,
                 eps_error: float = PRV_EPS_ERROR) -> float:
    """``PRVAccountant.get_epsilon`` (its upper bound), composed in one pass in Fourier space."""
    from scipy.fft import irfft, next_fast_len, rfft

    delta_error = delta / 1000
    domain = _prv_domain(history, eps_error, delta_error)
    # The circular convolution runs at the next FFT-friendly length above Opacus's (the grid
    # size, often with a large prime factor: 359,406 = 2·3²·19,967 for 100 rounds, ~3× slower
    # to transform). Only what wraps around the ring differs, mass Opacus's domain already
    # treats as negligible: ε agrees to ~1e-9 relative (tests/test_accounting_speed.py).
    length = next_fast_len(domain.size, real=True)
    spectrum: Any = 1.0
    compositions, shift = 0, 0.0
    for sigma, q, steps in history:
        pmf, step_shift = _discretise(sigma, q, domain)
        spectrum = spectrum * _power(rfft(pmf, length), steps)
        compositions += steps
        shift += step_shift * steps
    pmf = irfft(spectrum, length)
    # grid index i is t = (i - a)·dt; a sum of k indices is off by (k - 1)·a: roll it back
    # (Opacus's roll in ``_compose_fourier``, written for any k) and keep the grid
    offset = domain.size // 2 - 1
    pmf = np.roll(pmf, -(compositions - 1) * offset % length)[:domain.size]
    return _epsilon_upper(pmf, domain, shift, delta, delta_error, eps_error)


def _power(spectrum: np.ndarray, steps: int) -> np.ndarray:
    """``spectrum ** steps``, computed only where it does not underflow: a component of modulus
    below e^(−750/k) has a k-th power below the smallest double, 0 in numpy too (most of a
    k-step spectrum: the composed PRV is smooth)."""
    if steps == 1:
        return spectrum
    powered = np.zeros_like(spectrum)
    alive = np.abs(spectrum) > math.exp(-750 / steps)
    powered[alive] = spectrum[alive] ** steps
    return powered


def _epsilon_upper(pmf: np.ndarray, domain: Any, shift: float, delta: float,
                   delta_error: float, eps_error: float) -> float:
    """``DiscretePRV.compute_epsilon``'s upper bound for ``pmf`` on ``domain`` shifted right by
    ``shift``, read on t ≥ 0 only: its tail sums run right to left, so they are the same
    sums; an ε below 0 (never for DP-SGD) goes to Opacus's own read-out."""
    from opacus.accountants.analysis.prv import DiscretePRV, Domain

    composed = DiscretePRV(pmf=pmf, domain=Domain(domain.t_min + shift, domain.t_max + shift,
                                                  domain.size, shifts=shift))
    if np.finfo(np.longdouble).eps * domain.size > delta - delta_error:
        return float(composed.compute_epsilon(delta, delta_error, eps_error)[2])  # it raises
    t = composed.domain.ts
    start = int(np.searchsorted(t, 0.0))
    t, p = t[start:], pmf[start:]
    d1 = np.flip(np.flip(p).cumsum())
    d2 = np.flip(np.flip(p * np.exp(-t)).cumsum())
    ndelta = np.exp(t) * d2 - d1
    i = int(np.searchsorted(ndelta, -(delta - delta_error), side="left"))
    if i <= 0:
        return float(composed.compute_epsilon(delta, delta_error, eps_error)[2])
    return float(np.log((d1[i] - (delta - delta_error)) / d2[i]) + eps_error)


def _search_noise_multiplier(epsilon_at: Callable[[float], float], target_epsilon: float,
                             tolerance: float) -> float:
    """Opacus's ``get_noise_multiplier`` search, step for step, over ``epsilon_at(σ)``: double
    σ from 20 until ε ≤ target, then bisect until target − ε ≤ tolerance; the larger σ wins."""
    from opacus.accountants.utils import MAX_SIGMA

    eps_high = math.inf
    sigma_low, sigma_high = 0.0, 10.0
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = epsilon_at(sigma_high)
        if sigma_high > MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
    while target_epsilon - eps_high > tolerance:
        sigma = (sigma_low + sigma_high) / 2
        epsilon = epsilon_at(sigma)
        if epsilon < target_epsilon:
            sigma_high, eps_high = sigma, epsilon
        else:
            sigma_low = sigma
    return sigma_high


def _extend(history: list[HistoryEntry], noise_multiplier: float, sample_rate: float,
            steps: int) -> list[HistoryEntry]:
    """``history`` after ``steps`` more steps, merged exactly as ``IAccountant.step`` merges."""
    extended = list(history)
    if steps == 0:
        return extended
    if extended and extended[-1][0] == noise_multiplier and extended[-1][1] == sample_rate:
        sigma, q, done = extended.pop()
        extended.append((sigma, q, done + steps))
    else:
        extended.append((noise_multiplier, sample_rate, steps))
    return extended


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str = "prv",
    prefix: tuple[HistoryEntry, ...] = (),
) -> float:
    """σ for DP-SGD as :func:`_plain_noise_multiplier`; with ``prefix`` (mechanisms already
    charged to the ledger, e.g. the noisy count release), σ such that the WHOLE history
    ``prefix + [(σ, q, total_steps)]`` stays within ``target_epsilon`` (the same accountant
    composes them). The prefix costs little under PRV (σ=10 count: +0.013 at ε≈11).

    Memoised per process by all six arguments: the sites of a federation share a few
    (ε, δ, q, steps) between them, and a Ray worker plans for many of them.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    if not (isinstance(target_epsilon, int | float) and target_epsilon > 0
            and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon!r}")
    if int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    return _memoised_noise_multiplier(
        float(target_epsilon), float(delta), float(sample_rate), int(total_steps), accountant,
        tuple((float(sigma), float(q), int(steps)) for sigma, q, steps in prefix))


@functools.lru_cache(maxsize=CACHE_SIZE)
def _memoised_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float,
                               total_steps: int, accountant: str,
                               prefix: tuple[HistoryEntry, ...]) -> float:
    sigma = _plain_noise_multiplier(target_epsilon, delta, sample_rate, total_steps, accountant)
    if not prefix:
        return sigma
    goal = target_epsilon
    for _ in range(4):
        joint = epsilon_spent(accountant, (*prefix, (sigma, sample_rate, total_steps)), delta)
        if joint <= target_epsilon:
            return sigma
        goal -= (joint - target_epsilon) + 0.002 * target_epsilon
        if goal <= 0:
            break
        sigma = _plain_noise_multiplier(goal, delta, sample_rate, total_steps, accountant)
    raise RuntimeError(f"could not plan σ within ε={target_epsilon:.4g} after the mechanisms "
                       f"already charged ({list(prefix)}): they alone spend too much")


def _plain_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float,
                            total_steps: int, accountant: str) -> float:
    """σ such that ``total_steps`` steps at sample rate ``sample_rate`` spend ε ∈ [0.9·t, t].

    Call this ONCE per site for the whole planned run (``total_steps = rounds × local steps``);
    never per round (that is what ``make_private_with_epsilon`` would do, and it ignores what
    earlier rounds spent). The binary search is Opacus's ``get_noise_multiplier`` with a
    tolerance of 1 % of the target; the result is re-checked with the same accountant the
    ledger uses, so a ledger at ``total_steps`` reports exactly the checked ε. Every ε goes
    through the memo: a second search (a lower goal, after a prefix) starts on the same σs.
    """
    def epsilon_at(sigma: float) -> float:
        return epsilon_spent(accountant, ((sigma, sample_rate, total_steps),), delta)

    epsilon = math.inf
    sigma = math.nan
    for tolerance in (0.01 * target_epsilon, 0.001 * target_epsilon):
        try:
            sigma = _search_noise_multiplier(epsilon_at, target_epsilon, tolerance)
        except ValueError as error:  # Opacus: "The privacy budget is too low."
            raise RuntimeError(f"no noise multiplier reaches ε={target_epsilon:.4g} "
                               f"({accountant}, δ={delta}, q={sample_rate}, "
                               f"steps={total_steps}): {error}") from error
        epsilon = epsilon_at(sigma)
        if 0.9 * target_epsilon <= epsilon <= target_epsilon:
            return sigma
    raise RuntimeError(
        f"could not find a noise multiplier giving ε in [{0.9 * target_epsilon:.4g}, "
        f"{target_epsilon:.4g}] ({accountant}, δ={delta}, q={sample_rate}, steps={total_steps}); "
        f"last try σ={sigma:.6g} gave ε={epsilon:.6g}"
    )


def noisy_count(num_examples: int, count_noise: float, draw: float) -> int:
    """ñ = max(1, round(n + count_noise · draw)), ``draw`` a standard normal: the Gaussian
    mechanism on a count (sensitivity 1), charged as :func:`count_release_entries`."""
    return max(1, round(num_examples + count_noise * float(draw)))


def count_release_entries(count_noise: float | None) -> list[HistoryEntry]:
    """The count release as accountant history: one step of σ = count_noise at q = 1."""
    return [] if count_noise is None else [(float(count_noise), 1.0, 1)]


def default_delta(num_train_examples: int) -> float:
    """The δ a site uses when none is configured: ``min(1e-5, 10**-k)`` with ``10**-k ≤ 1/(10·n)``.

    Rule: the largest power of ten not above ``1/(10·n)`` for a site with ``n`` training
    records, and never looser than 1e-5. Why:

    - δ bounds the probability that the ε guarantee fails; over ``n`` records a union bound
      gives ``n·δ ≤ 0.1``, so δ is always well below 1/n (a δ near 1/n would allow a
      mechanism that publishes one random record in the clear).
    - 1e-5 is the conventional value in DP-SGD papers and Opacus examples, so small hospital
      sites (n < 10 000) report at the δ readers compare against, with ``n·δ ≤ 0.1`` anyway.
    - A power of ten reads plainly in a report and does not change when a site adds a few records.

    Examples: n=303 → 1e-5; n=10 000 → 1e-5; n=60 000 → 1e-6; n=100 001 → 1e-7.
    """
    if int(num_train_examples) != num_train_examples or num_train_examples < 1:
        raise ValueError(
            f"num_train_examples must be a positive integer, got {num_train_examples!r}")
    ten_n = 10 * int(num_train_examples)
    exponent = len(str(ten_n - 1))  # smallest k with 10**k >= 10·n, in exact integer arithmetic
    return min(1e-5, float(f"1e-{exponent}"))


@dataclass
class PrivacyLedger:
    """What one site has spent: Opacus history plus per-round bookkeeping for the report.

    ``history`` is exactly Opacus's ``accountant.history`` (list of ``(σ, q, steps)``);
    ``epsilon_per_round`` holds the cumulative ε after each TRAINED round (declined rounds
    spend nothing and add nothing). ``epsilon()`` of a ledger with no steps is 0.0: a DP-off
    run must be reported as "no differential privacy" by the caller, never as ε = 0.
    """

    accountant: str
    delta: float
    noise_multiplier: float
    sample_rate: float
    history: list[HistoryEntry] = field(default_factory=list)
    rounds_trained: int = 0
    rounds_declined: int = 0
    epsilon_per_round: list[float] = field(default_factory=list)
    max_epsilon: float | None = None
    # The site's size, released as a noisy count ñ = n + N(0, count_noise²) (sensitivity 1:
    # one patient more or less moves n by 1). ñ is drawn when the ledger is planned; the
    # Gaussian mechanism becomes the FIRST history entry (σ = count_noise, q = 1, one step) with
    # the first trained round, i.e. when ñ first leaves the site (as the update's weight), and is
    # composed with DP-SGD by the same accountant. Every number the site sends (weight, q,
    # steps, σ) derives from ñ, never n; before the charge the summary omits q and steps.
    count_noise: float | None = None
    released_count: int | None = None

    def __post_init__(self) -> None:
        _check_accountant(self.accountant)
        self.delta = _check_delta(self.delta)
        self.sample_rate = _check_sample_rate(self.sample_rate)
        if not (isinstance(self.noise_multiplier, int | float) and self.noise_multiplier > 0
                and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a positive finite number, "
                             f"got {self.noise_multiplier!r}")
        self.noise_multiplier = float(self.noise_multiplier)
        if self.max_epsilon is not None:
            if not (isinstance(self.max_epsilon, int | float) and self.max_epsilon > 0):
                raise ValueError(f"max_epsilon must be positive or None, got {self.max_epsilon!r}")
            self.max_epsilon = float(self.max_epsilon)
        self.history = [(float(s), float(q), int(n)) for s, q, n in self.history]
        if self.count_noise is not None:
            if not (isinstance(self.count_noise, int | float) and self.count_noise > 0
                    and math.isfinite(self.count_noise)):
                raise ValueError(f"count_noise must be a positive finite number or None, "
                                 f"got {self.count_noise!r}")
            self.count_noise = float(self.count_noise)
        self.epsilon_per_round = [float(e) for e in self.epsilon_per_round]

    # ----------------------------------------------------------------------------- accounting
    @property
    def steps(self) -> int:
        """Total DP-SGD steps taken at this site so far (every step, empty Poisson batches too)."""
        return sum(n for _, _, n in self.history) - self.count_charged

    @property
    def count_charged(self) -> bool:
        """Whether the noisy count has left the site (it is the history's first entry)."""
        return self.released_count is not None and bool(self.history)

    def count_entries(self) -> list[HistoryEntry]:
        """The count release as accountant history: ``[(count_noise, 1, 1)]``, or none."""
        return count_release_entries(self.count_noise)

    def _epsilon_of(self, history: list[HistoryEntry]) -> float:
        return epsilon_spent(self.accountant, history, self.delta)

    def epsilon(self) -> float:
        """Cumulative ε spent so far at this ledger's δ (0.0 before any step)."""
        return self._epsilon_of(self.history)

    def epsilon_after(self, steps: int) -> float:
        """The cumulative ε if ``steps`` more steps were taken at the ledger's σ and q.

        Used to decline a round BEFORE training; :meth:`record_round` with the same ``steps``
        records exactly this value (cached, so PRV is computed once per round).
        """
        return self._epsilon_of(self._history_after(steps))

    def exceeds_budget_after(self, steps: int) -> bool:
        """True when ``max_epsilon`` is set and ``steps`` more steps would go past it."""
        return self.max_epsilon is not None and self.epsilon_after(steps) > self.max_epsilon

    def record_round(self, steps: int) -> float:
        """Record a trained round of ``steps`` DP-SGD steps; returns the new cumulative ε."""
        self.history = self._history_after(steps)
        epsilon = self.epsilon()
        self.epsilon_per_round.append(epsilon)
        self.rounds_trained += 1
        return epsilon

    def record_declined(self) -> None:
        """Record a round this site declined (it trained nothing and spent nothing)."""
        self.rounds_declined += 1

    def _history_after(self, steps: int) -> list[HistoryEntry]:
        if int(steps) != steps or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        history = self.history
        if self.released_count is not None and not history and steps > 0:
            history = self.count_entries()  # the first trained round releases ñ
        return _extend(history, self.noise_multiplier, self.sample_rate, int(steps))

    def accountant_state_dict(self) -> dict[str, Any]:
        """The ledger as Opacus accountant state, for ``accountant.load_state_dict``."""
        return {"history": list(self.history), "mechanism": self.accountant}

    def opacus_accountant(self) -> IAccountant:
        """A fresh Opacus accountant holding this ledger's history (e.g. to cross-check ε)."""
        from opacus.accountants import create_accountant

        opacus_accountant = create_accountant(mechanism=self.accountant)
        opacus_accountant.load_state_dict(self.accountant_state_dict())
        return opacus_accountant

    def report(self) -> dict[str, Any]:
        """The ``privacy.<site>`` entry of report.json for a DP site."""
        # before ñ is charged, q (a function of ñ) does not leave the site
        hidden = self.released_count is not None and not self.count_charged
        return {
            "dp": True,
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": None if hidden else self.sample_rate,
            "steps": self.steps,
            "accountant": self.accountant,
            "max_epsilon": self.max_epsilon,
            "rounds_trained": self.rounds_trained,
            "rounds_declined": self.rounds_declined,
            "epsilon_per_round": list(self.epsilon_per_round),
            # the site's size is released noisy (count_noise) and accounted, or exactly (None)
            "count_noise": self.count_noise,
        }

    # ---------------------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe state (history entries become ``[σ, q, steps]`` lists)."""
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "accountant": self.accountant,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "history": [[s, q, n] for s, q, n in self.history],
            "rounds_trained": self.rounds_trained,
            "rounds_declined": self.rounds_declined,
            "epsilon_per_round": list(self.epsilon_per_round),
            "max_epsilon": self.max_epsilon,
            "count_noise": self.count_noise,
            "released_count": self.released_count,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> PrivacyLedger:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming what is wrong."""
        if not isinstance(state, dict):
            raise ValueError(f"a privacy ledger is a JSON object, got {type(state).__name__}")
        if state.get("format") != LEDGER_FORMAT:
            raise ValueError(f"not a privacy ledger (format={state.get('format')!r})")
        if state.get("version") != LEDGER_VERSION:
            raise ValueError(f"unsupported privacy ledger version {state.get('version')!r}")
        required = ("accountant", "delta", "noise_multiplier", "sample_rate", "history",
                    "rounds_trained", "rounds_declined", "epsilon_per_round", "max_epsilon")
        missing = [key for key in required if key not in state]
        if missing:
            raise ValueError(f"privacy ledger is missing {missing}")
        history = state["history"]
        if not isinstance(history, list) or not all(
                isinstance(e, list | tuple) and len(e) == 3 for e in history):
            raise ValueError("privacy ledger history must be a list of [sigma, q, steps] entries")
        for key in ("rounds_trained", "rounds_declined"):
            if not isinstance(state[key], int) or state[key] < 0:
                raise ValueError(f"privacy ledger {key} must be a non-negative integer")
        if not isinstance(state["epsilon_per_round"], list):
            raise ValueError("privacy ledger epsilon_per_round must be a list")
        return cls(
            accountant=state["accountant"],
            delta=state["delta"],
            noise_multiplier=state["noise_multiplier"],
            sample_rate=state["sample_rate"],
            history=[(float(s), float(q), int(n)) for s, q, n in history],
            rounds_trained=state["rounds_trained"],
            rounds_declined=state["rounds_declined"],
            epsilon_per_round=state["epsilon_per_round"],
            max_epsilon=state["max_epsilon"],
            count_noise=state.get("count_noise"),
            released_count=state.get("released_count"),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ledger atomically: a temp file in the same directory, then ``os.replace``.

        A crash (or a SuperNode restart) mid-save leaves either the old ledger or the new one,
        never a half-written file: losing spent budget would under-report ε.
        """
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        write_atomically(path, text.encode("utf-8"), mode=0o600)  # the site's alone

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Read a ledger written by :meth:`save`; :class:`LedgerFileError` names the file if bad.

        A missing file raises ``FileNotFoundError`` (a site that has not trained yet).
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError) as error:
            raise LedgerFileError(f"cannot read privacy ledger {path}: {error}") from error
        try:
            state = json.loads(text)
        except json.JSONDecodeError as error:
            raise LedgerFileError(
                f"privacy ledger {path} is not valid JSON (truncated or corrupted?): {error}"
            ) from error
        try:
            return cls.from_dict(state)
        except (ValueError, TypeError) as error:
            raise LedgerFileError(f"privacy ledger {path} is malformed: {error}") from error


