"""Adaptive clipping for hospital-level DP: the server's update of the L2 clip between rounds.

Andrew, Thakkar, McMahan, Ramaswamy 2021 ("Differentially Private Learning with Adaptive
Clipping", NeurIPS), geometric update: C ← C·exp(−η·(b̃ − γ)), with b̃ the noisy share of the
round's sites whose delta was within C (encoding.decode_unclipped_fraction) and γ the target
quantile. The clip tracks the γ-quantile of the sites' update norms without any site revealing
its norm: b̃ comes out of the same secure, noised sum as the model (accounted together,
accounting.plan(count_noise_std=...)), and the update is post-processing of it.
"""

from __future__ import annotations

import math

DEFAULT_TARGET_QUANTILE = 0.5  # Andrew et al.'s recommendation for federated training
DEFAULT_LEARNING_RATE = 0.2  # η: their default for the geometric update


def next_clip(clip: float, unclipped_fraction: float, *,
              target_quantile: float = DEFAULT_TARGET_QUANTILE,
              learning_rate: float = DEFAULT_LEARNING_RATE) -> float:
    """The next round's clip from this round's noisy unclipped fraction b̃."""
    for name, value in (("clip", clip), ("learning_rate", learning_rate)):
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not 0 < target_quantile < 1:
        raise ValueError(f"target_quantile must be in (0, 1), got {target_quantile!r}")
    if not math.isfinite(unclipped_fraction):
        raise ValueError(f"unclipped_fraction must be finite, got {unclipped_fraction!r}")
    return float(clip) * math.exp(-learning_rate * (unclipped_fraction - target_quantile))
