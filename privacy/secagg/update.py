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

from privacy.secagg.quantize import (
    BLOCK,
    BlockQuantizer,
    dequantize,
    quantization_error_bound,
)

WEIGHT_CLIP = 1.0


def site_weight(num_examples: int, max_site_examples: int) -> float:
    if max_site_examples < 1:
        raise ValueError(f"max_site_examples must be >= 1, got {max_site_examples}")
    return min(1.0, max(0, num_examples) / max_site_examples)


def encode_update(
    delta: Sequence[np.ndarray], weight: float, *, clip: float, num_sites: int,
    rng: np.random.Generator | int,
) -> tuple[np.ndarray, float]:
    """``(uint32 vector, share of coordinates clipped)`` for one site's delta arrays: the values
    of ``quantize(weight * clip(delta))`` then the quantized weight, from the same generator."""
    return _encode([(np.asarray(d), None) for d in delta], weight, clip=clip,
                   num_sites=num_sites, rng=rng)


def encode_difference(
    after: Sequence[np.ndarray], before: Sequence[np.ndarray], weight: float, *, clip: float,
    num_sites: int, rng: np.random.Generator | int,
) -> tuple[np.ndarray, float]:
    """:func:`encode_update` of the delta ``float64(after) − float64(before)``, array by array
    (e.g. the weights after local training and the global weights received), without building
    the delta: each block of it is computed where it is encoded."""
    if len(after) != len(before):
        raise ValueError(f"{len(after)} arrays after training, {len(before)} before")
    pairs = []
    for k, (new, old) in enumerate(zip(after, before)):
        new, old = np.asarray(new), np.asarray(old)
        if new.shape != old.shape:
            raise ValueError(f"array {k} has shape {new.shape} after training, {old.shape} "
                             "before")
        pairs.append((new, old))
    return _encode(pairs, weight, clip=clip, num_sites=num_sites, rng=rng)


def _encode(pairs: Sequence[tuple[np.ndarray, np.ndarray | None]], weight: float, *,
            clip: float, num_sites: int,
            rng: np.random.Generator | int) -> tuple[np.ndarray, float]:
    """One pass over the update in cache-sized blocks, straight into the vector that is sent:
    each block is formed in one reused float64 buffer (the delta, or ``after − before``),
    checked finite, clipped, weighted and quantized (quantize.BlockQuantizer). A 1M-coordinate
    update is memory-bound, and each full-size temporary costs as much as the arithmetic on it
    (``python -m privacy.secagg.benchmark`` times a site's encoding and masks both ways)."""
    if not np.isfinite(weight):  # the quantizer trusts its input: NaN would encode as garbage
        raise ValueError(f"the site weight must be a finite number, got {weight!r}")
    generator = np.random.default_rng(rng)
    quantizer = BlockQuantizer(clip, num_sites, generator)
    size = sum(new.size for new, _ in pairs)
    vector = np.empty(size + 1, dtype=np.uint32)
    buffer = np.empty(min(size, BLOCK), dtype=np.float64)
    outside, position = 0, 0
    for new, old in pairs:
        new = new.reshape(-1)
        old = None if old is None else old.reshape(-1)
        for start in range(0, len(new), BLOCK):
            block = slice(start, start + BLOCK)
            work = buffer[:len(new[block])]
            if old is None:
                np.copyto(work, new[block], casting="unsafe")
            else:
                np.subtract(new[block], old[block], out=work, dtype=np.float64)
            if not np.isfinite(work).all():
                raise ValueError("the model update contains NaN or Inf; it cannot be sent")
            outside += np.count_nonzero(np.abs(work) > clip)
            np.clip(work, -clip, clip, out=work)
            work *= weight
            quantizer(work, vector[position:position + len(work)])
            position += len(work)
    BlockQuantizer(WEIGHT_CLIP, num_sites, generator)(np.array([weight], dtype=np.float64),
                                                      vector[-1:])
    return vector, (outside / size if size else 0.0)


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
    weighted /= weight_sum
    return split_by_shapes(weighted, shapes), weight_sum


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
