"""What a site puts into the secure sum, and how the server reads the sum back.

Sites send their model *delta* (weights after local training minus the global weights they
received), never their weights. Weighted averaging by example count without revealing any
site's count:

- each site clips every coordinate of its delta to ``[-clip, clip]``;
- scales it by its weight ``w = min(1, n_site / max_site_examples)`` (``max_site_examples`` is a
  public cap from the config; a site above it is weighted as if it had the cap);
- appends ``w`` itself as one more coordinate;
- quantizes both segments into the ring Z_2^32 (quantize.py; the delta segment with ``clip``,
  the weight with 1.0), which SecAgg then sums.

The server learns ``Σ w_i·Δ_i`` and ``Σ w_i`` over the surviving sites, hence the example-
weighted mean delta ``Σ w_i·Δ_i / Σ w_i`` and the total of (capped) example counts — not any
single site's delta or count. Error bound of the mean, per coordinate: quantization error of the
delta segment plus |mean|·(error of Σw), divided by Σw (:func:`mean_error_bound`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from privacy.secagg.quantize import dequantize, quantization_error_bound, quantize_into

WEIGHT_CLIP = 1.0


def site_weight(num_examples: int, max_site_examples: int) -> float:
    if max_site_examples < 1:
        raise ValueError(f"max_site_examples must be >= 1, got {max_site_examples}")
    return min(1.0, max(0, num_examples) / max_site_examples)


def encode_update(
    delta: Sequence[np.ndarray], weight: float, *, clip: float, num_sites: int,
    rng: np.random.Generator | int,
) -> tuple[np.ndarray, float]:
    """``(uint32 vector, share of coordinates clipped)`` for one site's delta arrays.

    One float64 copy of the delta, clipped, weighted and quantized in place, straight into the
    vector that is sent: the values of ``quantize(weight * clip(delta))`` then the quantized
    weight, from the same generator, without a temporary per step (1M coordinates are memory-
    bound here)."""
    flat = np.concatenate([np.asarray(d, dtype=np.float64).ravel() for d in delta])
    if not np.isfinite(flat).all():
        raise ValueError("the model update contains NaN or Inf; it cannot be sent")
    if not np.isfinite(weight):  # quantize_into trusts its input: NaN would encode as garbage
        raise ValueError(f"the site weight must be a finite number, got {weight!r}")
    outside = np.count_nonzero(flat > clip) + np.count_nonzero(flat < -clip)
    fraction = outside / flat.size if flat.size else 0.0
    np.clip(flat, -clip, clip, out=flat)
    flat *= weight
    generator = np.random.default_rng(rng)
    vector = np.empty(flat.size + 1, dtype=np.uint32)
    quantize_into(flat, clip, num_sites, generator, vector[:-1])
    quantize_into(np.array([weight], dtype=np.float64), WEIGHT_CLIP, num_sites, generator,
                  vector[-1:])
    return vector, fraction


def decode_mean(
    total: np.ndarray, shapes: Sequence[tuple[int, ...]], *, clip: float, num_sites: int,
    num_summed: int,
) -> tuple[list[np.ndarray], float]:
    """The example-weighted mean delta (one array per shape) and ``Σ w`` from the ring sum."""
    size = int(sum(int(np.prod(s)) for s in shapes))
    if total.shape != (size + 1,):
        raise ValueError(f"the unmasked sum has {total.shape[0]} coordinates, expected "
                         f"{size + 1} (model coordinates + weight)")
    weighted = dequantize(total[:size], clip, num_sites, num_summed)
    weight_sum = float(dequantize(total[size:], WEIGHT_CLIP, num_sites, num_summed)[0])
    if weight_sum <= 0:
        raise ValueError(f"the surviving sites' total weight is {weight_sum:.3g}; nothing to "
                         "average")
    return split_by_shapes(weighted / weight_sum, shapes), weight_sum


def split_by_shapes(flat: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """A flat vector back into one array per shape, in order (views, no copy)."""
    arrays, start = [], 0
    for shape in shapes:
        count = int(np.prod(shape))
        arrays.append(flat[start:start + count].reshape(shape))
        start += count
    return arrays


def mean_error_bound(*, clip: float, num_sites: int, num_summed: int, weight_sum: float) -> float:
    """Max abs error per coordinate of :func:`decode_mean` vs the exact weighted mean of the
    clipped deltas (|Σ(wΔ)| ≤ clip·Σw, so the weight error contributes at most clip·e_w/Σw)."""
    e_delta = quantization_error_bound(clip, num_sites, num_summed)
    e_weight = quantization_error_bound(WEIGHT_CLIP, num_sites, num_summed)
    low = max(weight_sum - e_weight, 1e-300)
    return (e_delta + clip * e_weight) / low
