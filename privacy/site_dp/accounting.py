"""Hospital-level privacy of the distributed discrete Gaussian over rounds: plan and ε.

Mechanism (one round): each of the s surviving sampled sites sends an integer vector of L2
norm ≤ Δ₂ (its clipped, scaled, rotated, conditionally rounded delta, encoding.py) plus its own
N_Z(0, σ²) noise; secure aggregation reveals only the sum. Adjacency: ONE SITE's data replaced
by nothing — its update zeroed in every round, while it still takes part and adds its noise
share ("zero-out", the hospital-level notion of DP-FedAvg, McMahan et al. 2018, for a federation
whose membership is public: secure aggregation tells the server who took part anyway). For a
fixed cohort the two sums differ by one site's vector of norm ≤ Δ₂ over the same noise shares,
which is exactly what the bound below covers.

Per-round Rényi DP, Kairouz, Liu, Steinke 2021 ("The Distributed Discrete Gaussian Mechanism
for Federated Learning with Secure Aggregation", ICML; arXiv:2102.06387), Theorem 1 and
Proposition 14, with l₂ = Δ₂/√(sσ²), l₁ = Δ₁/√(sσ²), τ = 10·Σ_{k=1}^{s−1} e^{−2π²σ²·k/(k+1)}:

    ε(α) = min( α·l₂²/2 + τ·d,  α/2·(l₂² + 2·l₁·τ + τ²·d),  α/2·(l₂ + √d·τ)² )

τ is the price of the sum of s discrete Gaussians not being exactly discrete Gaussian; it
vanishes fast once σ ≳ 1 (integer units), and with τ = 0 the bound is the continuous Gaussian's
α·l₂²/2. Δ₂ is the norm after conditional randomized rounding (the paper's Theorem 1 /
Proposition 22: √(c² + d/4 + √(2·ln(1/β))·(c + √d/2)), or c + √d unconditionally, c the scaled
clip); Δ₁ ≤ Δ₂·min(√d, Δ₂) for integer vectors.

Sampling of sites. ``amplification="none"`` (default): no amplification. Valid against every
party, the server included, and for any data-independent choice of the cohort (fixed-size
sampling too): given the cohort, a round is the bound below, or identical when the site was not
chosen; by quasi-convexity the mixture over cohorts is no worse. ``"poisson"``: the paper's own
accounting (Zhu & Wang 2019, "Poisson Subsampled Rényi Differential Privacy", Theorem 5, with
q = sites_per_round / num_sites, min'ed with the unamplified curve). Amplification needs the
sample to be HIDDEN from the adversary, which the server that samples and runs secure
aggregation never is; and with distributed noise a zeroed site still adds its share, so the two
sides are both mixtures, outside the theorem's add/remove form. Use it only to compare with the
paper or for observers of the published model under an honest, Poisson-sampling server.
RDP composes additively over rounds; (ε, δ) from RDP by Canonne, Kamath, Steinke 2020 /
Balle et al. 2020: ε = ε(α) + ln((α−1)/α) − (ln δ + ln α)/(α−1), minimised over integer α.

Dropouts: the plan sets each site's σ² so that the THRESHOLD t of survivors (the fewest whose
sum secure aggregation can unmask) already gives the target; every extra survivor only adds
noise. A worst case over s ∈ [t, n] is bounded by taking l₂, l₁ at s = t and τ at s = n (every
term increases in each of them). :func:`epsilon` charges each round at its actual survivors.

Why not a library accountant: Opacus's RDP covers the Poisson-sampled continuous Gaussian only;
dp-accounting 0.6.0's RDP accountant composes a ZCDpEvent but amplifies by sampling only
Gaussian events, and its PLD discrete Gaussian is one-dimensional — neither covers the sum of
discrete Gaussians in d dimensions. Tests check this module against the paper's accounting code
(google-research/federated, distributed_dp/accounting_utils.py) and Opacus's Gaussian RDP.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import special

from privacy.site_dp.discrete_gaussian import MAX_SIGMA_SQUARED, DiscreteGaussian

RDP_ORDERS = np.array([*range(2, 129), 256], dtype=np.int64)
DEFAULT_BETA = math.exp(-0.5)  # the paper's choice for conditional rounding
AMPLIFICATIONS = ("poisson", "none")
RING_BITS_MAX = 32  # the secure-aggregation ring is Z_2^32 (privacy/secagg/quantize.py)


# ---------------------------------------------------------------- norm bounds after rounding

def rounded_l2_norm_bound(scaled_clip: float, beta: float, dim: int) -> float:
    """Δ₂: the L2 norm a site's rounded integer vector is allowed (and forced) to stay under.

    ``scaled_clip`` = clip·scale (integer units). β = 0 means unconditional rounding
    (‖round(x)‖ ≤ ‖x‖ + √d always); β ∈ (0, 1) conditional rounding that redraws until the
    norm is under the paper's bound, which a single draw meets with probability ≥ 1 − β."""
    _check_positive("scaled_clip", scaled_clip)
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    _check_count("dim", dim)
    unconditional = scaled_clip + math.sqrt(dim)
    if beta == 0:
        return unconditional
    squared = (scaled_clip**2 + dim / 4.0
               + math.sqrt(2.0 * math.log(1.0 / beta)) * (scaled_clip + math.sqrt(dim) / 2.0))
    return min(unconditional, math.sqrt(squared))


def rounded_l1_norm_bound(l2_bound: float, dim: int) -> float:
    """Δ₁ ≤ min(√d·Δ₂, Δ₂²): an integer vector's L1 norm is at most its squared L2 norm."""
    return l2_bound * min(math.sqrt(dim), l2_bound)


# ---------------------------------------------------------------- RDP of one round

def ddg_tau(sigma_squared: float, num_summed: int) -> float:
    """τ = 10·Σ_{k=1}^{s−1} exp(−2π²σ²·k/(k+1)) (Kairouz et al. 2021, Theorem 1)."""
    _check_count("num_summed", num_summed)
    k = np.arange(1, num_summed, dtype=np.float64)
    return float(10.0 * np.exp(-2.0 * math.pi**2 * sigma_squared * k / (k + 1.0)).sum())


def ddg_rdp(orders: np.ndarray, l2_scale: float, l1_scale: float, tau: float,
            dim: int) -> np.ndarray:
    """ε(α) of one release of the distributed discrete Gaussian (Proposition 14), per order."""
    alpha = np.asarray(orders, dtype=np.float64)
    term_1 = alpha / 2.0 * l2_scale**2 + tau * dim
    term_2 = alpha / 2.0 * (l2_scale**2 + 2.0 * l1_scale * tau + tau**2 * dim)
    term_3 = alpha / 2.0 * (l2_scale + math.sqrt(dim) * tau) ** 2
    return np.minimum(np.minimum(term_1, term_2), term_3)


def poisson_subsampled_rdp(orders: np.ndarray, rate: float, rdp_of_order) -> np.ndarray:
    """RDP of a mechanism run on a Poisson sample of rate ``rate`` (Zhu & Wang 2019, Thm 5),
    min'ed with the unamplified RDP. ``rdp_of_order(int array) -> array`` is the base curve."""
    orders = np.asarray(orders, dtype=np.int64)
    if not 0 < rate <= 1:
        raise ValueError(f"the sampling rate must be in (0, 1], got {rate!r}")
    base = np.asarray(rdp_of_order(orders), dtype=np.float64)
    if rate == 1:
        return base
    top = int(orders.max())
    ells = np.arange(2, top + 1)
    eps_ell = np.asarray(rdp_of_order(ells), dtype=np.float64)  # ε(ℓ) for ℓ = 2..max α
    log_q, log_1mq = math.log(rate), math.log1p(-rate)
    alpha = orders.astype(np.float64)[:, None]
    ell = ells[1:].astype(np.float64)[None, :]  # ℓ = 3..max α, one column each
    with np.errstate(invalid="ignore"):
        log_comb = (special.gammaln(alpha + 1) - special.gammaln(ell + 1)
                    - special.gammaln(alpha - ell + 1))
        rest = (math.log(3.0) + log_comb + (alpha - ell) * log_1mq + ell * log_q
                + (ell - 1) * eps_ell[None, 1:])
    rest = np.where(ell <= alpha, rest, -np.inf)  # only ℓ ≤ α enter the sum
    first = (alpha[:, 0] - 1) * log_1mq + np.log(alpha[:, 0] * rate - rate + 1)
    second = (np.log(special.comb(alpha[:, 0], 2)) + 2 * log_q + (alpha[:, 0] - 2) * log_1mq
              + eps_ell[0])
    terms = np.concatenate([first[:, None], second[:, None], rest], axis=1)
    amplified = special.logsumexp(terms, axis=1) / (alpha[:, 0] - 1)
    return np.minimum(amplified, base)


def rdp_to_epsilon(orders: np.ndarray, rdp: np.ndarray, delta: float) -> tuple[float, int]:
    """(ε, best order) from an RDP curve (Canonne-Kamath-Steinke 2020 / Balle et al. 2020)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    alpha = np.asarray(orders, dtype=np.float64)
    eps = (np.asarray(rdp) - (math.log(delta) + np.log(alpha)) / (alpha - 1)
           + np.log((alpha - 1) / alpha))
    eps = np.where(np.isnan(eps), np.inf, eps)
    # an order whose RDP is below −ln(1 − δ²) already gives ε = 0 (KL bound; as tf-privacy)
    eps = np.where(float(delta) ** 2 + np.expm1(-np.asarray(rdp, dtype=np.float64)) >= 0, 0.0,
                   eps)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), int(orders[best])


# ---------------------------------------------------------------- the plan

@dataclass(frozen=True)
class SiteDPPlan:
    """Everything a site needs to encode and the server to decode and account one run.

    Integer units: a real value x becomes ``x·scale`` before rounding; ``noise`` is each
    site's N_Z(0, σ²) in those units. Public: no field is secret."""

    num_sites: int  # N, sites in the federation
    sites_per_round: int  # n, the most sites summed in one round
    threshold: int  # t, the fewest survivors secure aggregation unmasks
    rounds: int
    target_epsilon: float
    delta: float
    clip: float  # C, L2 bound on a site's delta (real units)
    dim: int  # model coordinates
    padded_dim: int  # next power of two (Hadamard rotation)
    bits: int  # ring Z_2^bits the sum lives in
    beta: float  # conditional rounding parameter
    scale: float  # integer levels per real unit (1/γ in the paper)
    noise: DiscreteGaussian  # each site's share
    l2_sensitivity: float  # Δ₂ (integer units) after rounding
    l1_sensitivity: float  # Δ₁ (integer units)
    amplification: str
    planned_epsilon: float  # worst case over t..n survivors every round, all rounds
    wrap_probability: float  # bound on P[any coordinate of one round's sum wraps the ring]
    # Adaptive clipping (Andrew et al. 2021): integer levels per unit of the count of sites
    # under the clip, sent as one more coordinate (b − 1/2)·K; 0 = fixed clipping.
    count_scale: int = 0

    @property
    def adaptive(self) -> bool:
        return self.count_scale > 0

    @property
    def vector_length(self) -> int:
        """Coordinates a site sends: the rotated delta, plus the count for adaptive clipping."""
        return self.padded_dim + (1 if self.adaptive else 0)

    @property
    def joint_l2_sensitivity(self) -> float:
        """L2 norm bound of everything one site adds: Δ₂ and the count coordinate's K/2."""
        return math.hypot(self.l2_sensitivity, self.count_scale / 2)

    @property
    def joint_l1_sensitivity(self) -> float:
        return self.l1_sensitivity + self.count_scale / 2

    def count_std(self, survivors: int) -> float:
        """Std of the noise on the decoded count of unclipped sites (adaptive clipping)."""
        if not self.adaptive:
            raise ValueError("this plan has fixed clipping: no count is released")
        return math.sqrt(survivors * self.noise.sigma_squared) / self.count_scale

    @property
    def sampling_rate(self) -> float:
        return self.sites_per_round / self.num_sites if self.amplification == "poisson" else 1.0

    def central_std(self, survivors: int) -> float:
        """Std of the noise in the decoded SUM of ``survivors`` sites (real units)."""
        return math.sqrt(survivors * self.noise.sigma_squared) / self.scale

    def to_dict(self) -> dict:
        out = asdict(self)
        out["noise"] = {"t": self.noise.t, "m": self.noise.m,
                        "sigma_squared": self.noise.sigma_squared}
        return out


def distributed_dg_rdp(*, sigma_squared: float, survivors: int, l2_sensitivity: float,
                       l1_sensitivity: float, dim: int, sampling_rate: float,
                       tau_survivors: int | None = None) -> np.ndarray:
    """RDP curve (over :data:`RDP_ORDERS`) of one Poisson-sampled release of the sum of
    ``survivors`` sites' vectors, each with its own N_Z(0, ``sigma_squared``) (integer units).
    ``tau_survivors`` overrides the count in τ (the worst case of a range of survivors)."""
    central = math.sqrt(survivors * sigma_squared)
    tau = ddg_tau(sigma_squared, survivors if tau_survivors is None else tau_survivors)
    l2, l1 = l2_sensitivity / central, l1_sensitivity / central

    def base(orders):
        return ddg_rdp(orders, l2, l1, tau, dim)

    return poisson_subsampled_rdp(RDP_ORDERS, sampling_rate, base)


def round_rdp(plan: SiteDPPlan, survivors: int, *, tau_survivors: int | None = None) -> np.ndarray:
    """RDP curve (over :data:`RDP_ORDERS`) of one round whose sum had ``survivors`` sites."""
    if not plan.threshold <= survivors <= plan.sites_per_round:
        raise ValueError(f"a released round has between threshold={plan.threshold} and "
                         f"sites_per_round={plan.sites_per_round} survivors, got {survivors}")
    return distributed_dg_rdp(
        sigma_squared=float(plan.noise.sigma_squared), survivors=survivors,
        l2_sensitivity=plan.joint_l2_sensitivity, l1_sensitivity=plan.joint_l1_sensitivity,
        dim=plan.vector_length, sampling_rate=plan.sampling_rate, tau_survivors=tau_survivors)


def epsilon(plan: SiteDPPlan, survivors_per_round: Sequence[int],
            delta: float | None = None) -> float:
    """Hospital-level ε after the rounds in ``survivors_per_round`` (one entry per round: how
    many sites' contributions were summed; 0 = the round released nothing)."""
    delta = plan.delta if delta is None else delta
    total = np.zeros(RDP_ORDERS.size)
    for survivors, count in Counter(int(s) for s in survivors_per_round).items():
        if survivors == 0:
            continue
        if survivors < plan.threshold:
            raise ValueError(f"a round with {survivors} survivors is below the threshold "
                             f"{plan.threshold}: secure aggregation cannot have released it "
                             "(record it as 0)")
        total += count * round_rdp(plan, survivors)
    return rdp_to_epsilon(RDP_ORDERS, total, delta)[0]


def worst_case_epsilon(plan: SiteDPPlan) -> float:
    """ε over ``plan.rounds`` rounds, each with ANY number of survivors in [t, n]."""
    rdp = round_rdp(plan, plan.threshold, tau_survivors=plan.sites_per_round)
    return rdp_to_epsilon(RDP_ORDERS, plan.rounds * rdp, plan.delta)[0]


def wrap_probability(*, scale: float, clip: float, padded_dim: int, sites: int,
                     sigma_squared: float, bits: int, count_scale: int = 0) -> float:
    """Union bound on P[some coordinate of the integer sum leaves [−2^(b−1), 2^(b−1))].

    Per coordinate the sum is (rotated signal) + (rounding errors, each in (−1, 1)) + noise.
    The rotated signal's coordinate is Σ_k ±y_k/√d over the shared random signs: Hoeffding-
    subgaussian with variance proxy ‖y‖²/d ≤ (n·C·scale)²/d; the sum of n discrete Gaussians
    is n·σ²-subgaussian (Canonne et al. 2020); rounding errors add at most n. So
    P ≤ 2d·exp(−(2^(b−1) − n)²/(2v)), v = (n·C·scale)²/d + n·σ². Assumes the sites' deltas do
    not depend on the round's rotation seed (draw it after training). Wrap-around hurts only
    accuracy, never privacy: the modular sum is a function of the noisy integer sum.
    Adaptive clipping's count coordinate adds |Σ ±K/2| ≤ n·K/2 plus the same noise."""
    room = 2.0 ** (bits - 1) - sites
    if room <= 0:
        return 1.0
    proxy = (sites * clip * scale) ** 2 / padded_dim + sites * sigma_squared
    bound = 2.0 * padded_dim * math.exp(-room**2 / (2.0 * proxy))
    if count_scale:
        count_room = 2.0 ** (bits - 1) - sites * count_scale / 2
        if count_room <= 0:
            return 1.0
        bound += 2.0 * math.exp(-count_room**2 / (2.0 * sites * sigma_squared))
    return min(1.0, bound)


def plan(*, target_epsilon: float, delta: float, clip: float, dim: int, num_sites: int,
         sites_per_round: int, threshold: int, rounds: int, bits: int = RING_BITS_MAX,
         beta: float = DEFAULT_BETA, max_wrap_probability: float = 1e-9,
         amplification: str = "none", count_noise_std: float | None = None) -> SiteDPPlan:
    """Per-site noise and encoding for hospital-level (target_epsilon, delta)-DP over ``rounds``.

    Chooses the scale (granularity) as fine as the ring allows with a wrap-around probability
    per round ≤ ``max_wrap_probability``, then the smallest σ² meeting the target with only
    ``threshold`` survivors (any number up to ``sites_per_round`` stays within it).

    ``count_noise_std`` (σ_b) turns on adaptive clipping (Andrew et al. 2021, "Differentially
    Private Learning with Adaptive Clipping"): each site also sends whether its delta was within
    the clip, and the released count of such sites carries noise of std σ_b with t survivors
    (Andrew et al. suggest σ_b ≈ sites_per_round/20). Both go into one vector, so one DDG
    analysis covers them; as in their Theorem 1, the delta's share of the noise budget shrinks
    to z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2), which needs σ_b > z/2."""
    _check_positive("target_epsilon", target_epsilon)
    _check_positive("clip", clip)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    for name, value in (("dim", dim), ("num_sites", num_sites),
                        ("sites_per_round", sites_per_round), ("threshold", threshold),
                        ("rounds", rounds)):
        _check_count(name, value)
    if not threshold <= sites_per_round <= num_sites:
        raise ValueError(f"need threshold <= sites_per_round <= num_sites, got {threshold}, "
                         f"{sites_per_round}, {num_sites}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= RING_BITS_MAX:
        raise ValueError(f"bits must be an integer in [2, {RING_BITS_MAX}] (the secure-"
                         f"aggregation ring is Z_2^32), got {bits!r}")
    if not 0 < max_wrap_probability < 1:
        raise ValueError(f"max_wrap_probability must be in (0, 1), got {max_wrap_probability!r}")
    if amplification not in AMPLIFICATIONS:
        raise ValueError(f"amplification must be one of {AMPLIFICATIONS}, got {amplification!r}")
    if count_noise_std is not None:
        _check_positive("count_noise_std", count_noise_std)
    padded = 1 << (dim - 1).bit_length()
    room = 2.0 ** (bits - 1) - sites_per_round
    if room <= 0:
        raise ValueError(f"a {bits}-bit ring cannot hold the sum of {sites_per_round} sites")
    proxy_max = 0.999 * room**2 / (2.0 * math.log(2.0 * padded / max_wrap_probability))

    def count_scale_for(sigma2: float) -> int:
        """K (even, so (b − 1/2)·K is an integer) giving the count noise std σ_b at t."""
        if count_noise_std is None:
            return 0
        return 2 * max(1, round(math.sqrt(threshold * sigma2) / (2.0 * count_noise_std)))

    def draft(scale: float, sigma2: float, count_scale: int | None = None) -> SiteDPPlan:
        l2 = rounded_l2_norm_bound(clip * scale, beta, padded)
        noise = DiscreteGaussian.at_least(sigma2)
        if count_scale is None:
            count_scale = count_scale_for(noise.sigma_squared)
        return SiteDPPlan(
            num_sites=num_sites, sites_per_round=sites_per_round, threshold=threshold,
            rounds=rounds, target_epsilon=float(target_epsilon), delta=float(delta),
            clip=float(clip), dim=dim, padded_dim=padded, bits=bits, beta=float(beta),
            scale=float(scale), noise=noise, l2_sensitivity=l2,
            l1_sensitivity=rounded_l1_norm_bound(l2, padded), amplification=amplification,
            planned_epsilon=math.nan, wrap_probability=math.nan, count_scale=count_scale)

    def over_target(candidate: SiteDPPlan) -> bool:
        return worst_case_epsilon(candidate) > target_epsilon

    def noise_for(scale: float, low: float = 1e-2) -> float:
        """Smallest σ² (bisection in log space, full accounting with τ) at this scale."""
        high = max(low, 1e-2) * 4.0
        while over_target(draft(scale, high)):
            low, high = high, high * 4.0
            if high > MAX_SIGMA_SQUARED:
                raise ValueError("no noise level reaches the target ε within the sampler's "
                                 "range: raise target_epsilon or bits")
        while high / low > 1 + 1e-7:
            mid = math.sqrt(low * high)
            low, high = (mid, high) if over_target(draft(scale, mid)) else (low, mid)
        return high

    # Where σ ≫ 1 integer level (every realistic plan), τ = 0 to double precision and ε depends
    # on the noise only through z = √(t·σ²)/Δ₂, found once; then the two constraints meet at a
    # fixed point in closed form: a coarser scale inflates Δ₂ (rounding), which needs more
    # noise, which needs a coarser scale to fit the ring. Monotone: it converges downwards.
    z = _gaussian_multiplier(target_epsilon, delta, rounds,
                             sites_per_round / num_sites if amplification == "poisson" else 1.0)
    # adaptive clipping: the count takes (2σ_b)⁻² of the budget z⁻², the delta the rest
    share = 1.0
    if count_noise_std is not None:
        if count_noise_std <= z / 2:
            raise ValueError(f"count_noise_std={count_noise_std} must exceed z/2 = {z / 2:.4g} "
                             f"(z = {z:.4g} is the noise multiplier ε = {target_epsilon} allows): "
                             "the count alone would spend the whole budget")
        share = 1.0 - (z / (2.0 * count_noise_std)) ** 2
    scale = math.sqrt(proxy_max) * math.sqrt(padded) / (sites_per_round * clip)
    scale = min(scale, math.sqrt(MAX_SIGMA_SQUARED / 4.0))  # keep σ² in the sampler's range
    for _ in range(100_000):
        l2 = rounded_l2_norm_bound(clip * scale, beta, padded)
        real_variance = (z * l2 / scale) ** 2 / threshold / share
        fitted = math.sqrt(proxy_max / ((sites_per_round * clip) ** 2 / padded
                                        + sites_per_round * real_variance))
        if fitted >= scale * (1 - 1e-12):
            break
        scale = fitted
        if scale * clip < 1.0:
            raise ValueError(f"a {bits}-bit ring leaves less than one integer level per clip "
                             "once the noise fits: raise bits, target_epsilon or "
                             "max_wrap_probability")
    for _ in range(200):  # σ² rounds up to an integer t·m: step the scale down until it fits
        sigma2 = (z * rounded_l2_norm_bound(clip * scale, beta, padded)) ** 2 / threshold / share
        result = draft(scale, sigma2)
        if over_target(result):  # τ or the integer σ² mattered (σ near 1): full accounting
            result = draft(scale, noise_for(scale, low=sigma2))
        wrap = wrap_probability(scale=scale, clip=clip, padded_dim=padded,
                                sites=sites_per_round, sigma_squared=result.noise.sigma_squared,
                                bits=bits, count_scale=result.count_scale)
        if wrap <= max_wrap_probability or scale * clip < 1.0:
            break
        scale *= 0.995
    if wrap > max_wrap_probability:
        raise ValueError(f"the noise needed for ε = {target_epsilon} does not fit a {bits}-bit "
                         f"ring with wrap-around probability ≤ {max_wrap_probability:.3g} "
                         f"(it would be {wrap:.3g}): raise bits or target_epsilon")
    eps = worst_case_epsilon(result)
    return SiteDPPlan(**{**_fields(result), "planned_epsilon": eps, "wrap_probability": wrap})


def _gaussian_multiplier(target_epsilon: float, delta: float, rounds: int,
                         rate: float) -> float:
    """Smallest z with ε(rounds × subsampled RDP α/(2z²)) ≤ target: the DDG bound with τ = 0
    (bisection in log space, relative tolerance 1e-10)."""
    def eps(z: float) -> float:
        rdp = poisson_subsampled_rdp(RDP_ORDERS, rate,
                                     lambda orders: np.asarray(orders, float) / (2 * z * z))
        return rdp_to_epsilon(RDP_ORDERS, rounds * rdp, delta)[0]

    low, high = 1e-3, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2.0
        if high > 1e6:
            raise ValueError(f"target_epsilon={target_epsilon} needs a noise multiplier above "
                             "1e6: raise it")
    while high / low > 1 + 1e-10:
        mid = math.sqrt(low * high)
        low, high = (mid, high) if eps(mid) > target_epsilon else (low, mid)
    return high


def noise_report(plan: SiteDPPlan, survivors: int) -> dict[str, float]:
    """What one round's dropouts did to the noise: std of the decoded sum as planned (t
    survivors), as released (``survivors``) and had all n survived; the share of the full
    cohort's noise variance that the dropouts removed."""
    if not plan.threshold <= survivors <= plan.sites_per_round:
        raise ValueError(f"survivors must be in [{plan.threshold}, {plan.sites_per_round}], "
                         f"got {survivors}")
    full = plan.sites_per_round
    return {
        "survivors": survivors,
        "planned_sum_std": plan.central_std(plan.threshold),
        "released_sum_std": plan.central_std(survivors),
        "full_cohort_sum_std": plan.central_std(full),
        "variance_removed_by_dropouts": (full - survivors) / full,
        "released_over_planned_variance": survivors / plan.threshold,
    }


def _fields(plan_: SiteDPPlan) -> dict:
    return {name: getattr(plan_, name) for name in plan_.__dataclass_fields__}


def _check_positive(name: str, value: float) -> None:
    if (isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
