"""A site's model delta → its noised integer share in the secure-aggregation ring, and back.

Site side (:func:`encode_site_delta`), the distributed discrete Gaussian pipeline of Kairouz,
Liu, Steinke 2021 (§4; TensorFlow Federated's ``DistributedDpSumFactory`` does the same):

1. flatten and clip to L2 norm ``clip`` (the bound the hospital-level guarantee is about);
2. zero-pad to a power of two d and scale by ``scale`` (1/γ, integer levels per real unit);
3. rotate: y = H·D·x/√d, D random ±1 signs from the round's PUBLIC rotation seed, H the
   Walsh–Hadamard matrix. Rotation spreads the norm evenly over coordinates, so every
   coordinate of the sum is small and the ring can be narrow (accounting.wrap_probability);
4. conditional randomized rounding to integers: round each coordinate up with probability
   its fractional part, redraw the whole vector while ‖z‖₂ > Δ₂ (Proposition 22's bound,
   ``plan.l2_sensitivity``) — so the sensitivity the accountant uses holds for certain;
5. add this site's N_Z(0, σ²) noise, drawn exactly from a ChaCha20 keystream (never numpy);
6. reduce mod 2^bits → uint32, ready for secure aggregation's masks (privacy/secagg).

Adaptive clipping (``plan.adaptive``, Andrew et al. 2021): the round's clip C_r comes from the
server (clipping.next_clip); the site scales by ``plan.scale·plan.clip/C_r`` so that everything
in integer units — Δ₂, σ², hence the accounting — is the plan's, and the real-unit noise moves
with C_r. One more coordinate, NOT rotated, carries (b − 1/2)·K with b = [‖Δ‖ ≤ C_r] plus the
same discrete Gaussian noise; the server reads the noisy fraction of unclipped sites from it.

Server side (:func:`decode_mean`): the unmasked sum mod 2^bits read as a signed integer,
rotated back (x = D·H·y/√d), divided by ``scale`` and by the number of survivors; the padding is
dropped. The server only ever holds the sum, which already carries every survivor's noise.

The rotation seed is fresh for each round. Ideally it would also be unknown until the sites'
deltas are fixed: a delta crafted against known signs could concentrate its norm in one
coordinate and wrap the ring (a utility attack only: each site's noise is added after rotating,
so privacy does not depend on the seed). medsilo derives it from the run's seed and the round
(privacy/protocol.py ``site_dp_rotation_seed``), which keeps runs reproducible but is known in
advance; deriving it from the round's secure-aggregation session, after the deltas are
committed, would close that utility attack (not done).
The rounding randomness comes from the noise keystream too (via a seeded numpy generator: the
rounding need not be secret, the noise hides it, but it must not be predictable either).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from privacy.site_dp.accounting import SiteDPPlan
from privacy.site_dp.randomness import KeyStream

ROTATION_LABEL = "medsilo.site_dp.rotation.v1"
MAX_ROUNDING_ATTEMPTS = 1000  # each attempt passes with probability ≥ 1 − β ≈ 0.39


@dataclass(frozen=True)
class SiteEncoding:
    """What a site sends (``vector``) and what it may log about it locally."""

    vector: np.ndarray  # uint32, length plan.vector_length, values < 2**plan.bits
    norm: float  # L2 norm of the delta before clipping
    clipped: bool  # whether the clip scaled it down (b = not clipped, for adaptive clipping)
    rounding_attempts: int


def rademacher_signs(rotation_seed: bytes, padded_dim: int) -> np.ndarray:
    """The round's D: ±1.0 per coordinate, the same at every site and at the server."""
    bits = KeyStream.public(rotation_seed, ROTATION_LABEL).bits(padded_dim)
    return 1.0 - 2.0 * bits.astype(np.float64)


def walsh_hadamard(values: np.ndarray) -> np.ndarray:
    """H·v (unnormalised, H ∈ {±1}^{d×d}, H·H = d·I) for a float64 vector of length 2^k."""
    size = values.size
    if size & (size - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two length, got {size}")
    out = np.array(values, dtype=np.float64)
    half = 1
    while half < size:
        blocks = out.reshape(-1, 2, half)
        top = blocks[:, 0, :].copy()
        blocks[:, 0, :] += blocks[:, 1, :]
        np.subtract(top, blocks[:, 1, :], out=blocks[:, 1, :])
        half *= 2
    return out


def rotate(values: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """y = H·D·x/√d (orthogonal)."""
    return walsh_hadamard(values * signs) / math.sqrt(values.size)


def unrotate(values: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """x = D·H·y/√d, the inverse of :func:`rotate`."""
    return walsh_hadamard(values) * signs / math.sqrt(values.size)


def flatten_delta(delta: np.ndarray | Sequence[np.ndarray], dim: int) -> np.ndarray:
    """One float64 vector from a delta given as one array or a list of arrays (model order)."""
    parts = [delta] if isinstance(delta, np.ndarray) else list(delta)
    if not parts:
        raise ValueError("the model delta has no arrays")
    for part in parts:
        kind = np.asarray(part).dtype
        if not (np.issubdtype(kind, np.floating) or np.issubdtype(kind, np.integer)):
            raise ValueError(f"the model delta must be real-valued, got dtype {kind}")
    flat = np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in parts])
    if flat.size != dim:
        raise ValueError(f"the model delta has {flat.size} coordinates, the plan expects {dim}")
    if not np.isfinite(flat).all():
        raise ValueError("the model delta contains NaN or Inf; it cannot be encoded")
    return flat


def round_scale(plan: SiteDPPlan, clip: float | None) -> tuple[float, float]:
    """(clip, scale) of a round: the plan's, or an adaptive clip with the scale that keeps
    clip·scale (hence Δ₂ and the accounting) equal to the plan's."""
    if clip is None:
        return plan.clip, plan.scale
    if not plan.adaptive:
        raise ValueError("a round clip was given but the plan has fixed clipping "
                         "(plan with count_noise_std for adaptive clipping)")
    if isinstance(clip, bool) or not isinstance(clip, int | float) or not math.isfinite(clip) \
            or clip <= 0:
        raise ValueError(f"the round clip must be a positive finite number, got {clip!r}")
    return float(clip), plan.scale * plan.clip / float(clip)


def encode_site_delta(delta: np.ndarray | Sequence[np.ndarray], plan: SiteDPPlan, *,
                      rotation_seed: bytes, noise_stream: KeyStream | None = None,
                      clip: float | None = None) -> SiteEncoding:
    """This site's share of the round's noisy sum (module docstring, steps 1–6).

    ``noise_stream`` defaults to a fresh :class:`KeyStream` keyed from ``os.urandom``; pass one
    with a fixed key only to reproduce an encoding in tests. ``clip``: the round's adaptive
    clip (plans with adaptive clipping only; default the plan's clip)."""
    stream = KeyStream() if noise_stream is None else noise_stream
    round_clip, scale = round_scale(plan, clip)
    flat = flatten_delta(delta, plan.dim)
    norm = float(np.linalg.norm(flat))
    factor = min(1.0, round_clip / norm) if norm > 0 else 1.0
    padded = np.zeros(plan.padded_dim, dtype=np.float64)
    padded[:plan.dim] = flat * (factor * scale)
    rotated = rotate(padded, rademacher_signs(rotation_seed, plan.padded_dim))
    rounded, attempts = _conditional_rounding(rotated, plan, stream)
    if plan.adaptive:  # (b − 1/2)·K, b = 1 when the delta was within the clip
        half = plan.count_scale // 2
        rounded = np.append(rounded, np.int64(half if factor == 1.0 else -half))
    rounded += plan.noise.sample(plan.vector_length, stream)
    np.bitwise_and(rounded, np.int64((1 << plan.bits) - 1), out=rounded)  # two's complement
    return SiteEncoding(vector=rounded.astype(np.uint32), norm=norm, clipped=factor < 1.0,
                        rounding_attempts=attempts)


def _conditional_rounding(values: np.ndarray, plan: SiteDPPlan,
                          stream: KeyStream) -> tuple[np.ndarray, int]:
    """Unbiased randomized rounding, redrawn until ‖z‖₂ ≤ Δ₂ (Kairouz et al. 2021, Prop. 22)."""
    generator = np.random.default_rng(int.from_bytes(stream.read(32), "little"))
    floor = np.floor(values)
    fraction = values - floor
    bound_squared = plan.l2_sensitivity**2
    for attempt in range(1, MAX_ROUNDING_ATTEMPTS + 1):
        rounded = floor + (generator.random(values.size) < fraction)
        if float(np.dot(rounded, rounded)) <= bound_squared:
            return rounded.astype(np.int64), attempt
    raise RuntimeError(f"conditional rounding found no vector within the norm bound "
                       f"{plan.l2_sensitivity:.6g} in {MAX_ROUNDING_ATTEMPTS} attempts: the "
                       "plan's clip, scale or dim do not match this encoding")


def _signed(total: np.ndarray, plan: SiteDPPlan) -> np.ndarray:
    total = np.asarray(total)
    if total.dtype != np.uint32 or total.shape != (plan.vector_length,):
        raise ValueError(f"the unmasked sum must be a uint32 vector of length "
                         f"{plan.vector_length} (the plan's padded dimension"
                         f"{' + the count' if plan.adaptive else ''}), got {total.dtype} "
                         f"with shape {total.shape}")
    # The secure sum is mod 2^32; 2^bits divides it, so reducing mod 2^bits is exact.
    signed = total.astype(np.int64) & np.int64((1 << plan.bits) - 1)
    signed[signed >= (1 << (plan.bits - 1))] -= np.int64(1 << plan.bits)
    return signed


def decode_sum(total: np.ndarray, plan: SiteDPPlan, *, rotation_seed: bytes,
               clip: float | None = None) -> np.ndarray:
    """The noisy SUM of the survivors' clipped deltas (float64, length ``plan.dim``) from the
    unmasked uint32 ring sum (``clip``: the round's adaptive clip, as the sites used it)."""
    _, scale = round_scale(plan, clip)
    signed = _signed(total, plan)[:plan.padded_dim]
    restored = unrotate(signed.astype(np.float64), rademacher_signs(rotation_seed,
                                                                    plan.padded_dim))
    return restored[:plan.dim] / scale


def _check_survivors(plan: SiteDPPlan, survivors: int) -> None:
    if isinstance(survivors, bool) or not isinstance(survivors, int | np.integer) \
            or not plan.threshold <= survivors <= plan.sites_per_round:
        raise ValueError(f"survivors must be an integer in [threshold={plan.threshold}, "
                         f"sites_per_round={plan.sites_per_round}], got {survivors!r}")


def decode_mean(total: np.ndarray, plan: SiteDPPlan, *, rotation_seed: bytes,
                survivors: int, clip: float | None = None) -> np.ndarray:
    """The noisy MEAN of the ``survivors`` sites' clipped deltas (float64, ``plan.dim``)."""
    _check_survivors(plan, survivors)
    return decode_sum(total, plan, rotation_seed=rotation_seed, clip=clip) / survivors


def decode_unclipped_fraction(total: np.ndarray, plan: SiteDPPlan, *, survivors: int) -> float:
    """Adaptive clipping: the noisy share of survivors whose delta was within the round's clip,
    (Σ(b − 1/2)·K + noise)/K/s + 1/2 (noise std ``plan.count_std(s)/s``; may leave [0, 1])."""
    if not plan.adaptive:
        raise ValueError("this plan has fixed clipping: its sum carries no count")
    _check_survivors(plan, survivors)
    count = float(_signed(total, plan)[-1]) / plan.count_scale
    return count / survivors + 0.5
