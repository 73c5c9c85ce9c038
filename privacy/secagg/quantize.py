"""Fixed-point encoding of model updates into the ring Z_{2³²} that SecAgg sums over.

Encoding (per coordinate, per site): clip x to [−c, c], shift to [0, 2c], scale by
``s = M / (2c)`` with ``M = ⌊(2³² − 1) / n⌋`` levels per site, and round stochastically to one
of the two neighbouring integers q ∈ {0, …, M} (unbiased: E[q] = (x + c)·s). With at most
``n = num_sites`` summands the integer sum is ≤ n·M ≤ 2³² − 1, so the sum modulo 2³² that
SecAgg returns IS the integer sum: the ring never wraps and no information is lost.

Decoding the sum of ``m ≤ n`` sites (the survivors): ``Σx ≈ Σq / s − m·c``.

Error bound (:func:`quantization_error_bound`): each site's rounding moves q by less than one
level (plus float64 rounding of (x + c)·s, below 2⁻²⁰ level), so per coordinate

    |dequantize(Σq) − Σ clip(x_i)| < m·(1 + 2⁻²⁰)/s + 2⁻⁴⁸·(2c·n + c·m)

where the last term covers float64 rounding in the decoding. For n = 20, c = 1:
s ≈ 1.07·10⁸ and the bound for m = 20 is ≈ 1.9·10⁻⁷, far below fp32 resolution of the
average update. Stochastic rounding keeps the sum unbiased; its standard deviation is at most
√m/(2s).

Upload cost: one uint32 per coordinate, the same bytes as the fp32 plaintext (Flower 1.41's
SecAgg+ uploads int64, twice as many). Several segments with different clips (e.g. a weighted
update and an example count) can be quantized separately and concatenated: the sum is taken
coordinate by coordinate, each segment dequantizes with its own clip.

Determinism: the rounding draws come from ``rng`` (a ``numpy.random.Generator`` or a seed),
so the same seed gives the same encoding. The rounding need not be secret: the masks, not the
rounding, hide the update.
"""

from __future__ import annotations

import numpy as np

RING_BITS = 32
RING_SIZE = 2**RING_BITS
_MAX_INT = RING_SIZE - 1


def _check(clip: float, num_sites: int) -> None:
    if (isinstance(clip, bool) or not isinstance(clip, int | float | np.integer | np.floating)
            or not np.isfinite(clip) or clip <= 0):
        raise ValueError(f"clip must be a positive finite number, got {clip!r}")
    if not isinstance(num_sites, int | np.integer) or not 1 <= num_sites <= _MAX_INT:
        raise ValueError(f"num_sites must be an integer in [1, 2**32 - 1], got {num_sites!r}")


def levels_per_site(num_sites: int) -> int:
    """M = ⌊(2³² − 1)/n⌋: the largest value one site may contribute so n of them never wrap."""
    _check(1.0, num_sites)
    return _MAX_INT // int(num_sites)


def quantization_scale(clip: float, num_sites: int) -> float:
    """s = M / (2·clip): integer levels per unit of the clipped value."""
    _check(clip, num_sites)
    return levels_per_site(num_sites) / (2.0 * float(clip))


def quantization_error_bound(clip: float, num_sites: int, num_summed: int | None = None) -> float:
    """Max abs error per coordinate of the dequantized sum of ``num_summed`` sites vs the exact
    sum of their clipped values, for an encoding sized for ``num_sites`` (module docstring)."""
    num_summed = num_sites if num_summed is None else num_summed
    _check(clip, num_sites)
    if not 0 <= num_summed <= num_sites:
        raise ValueError(f"num_summed must be in [0, num_sites={num_sites}], got {num_summed}")
    scale = quantization_scale(clip, num_sites)
    return (num_summed * (1.0 + 2.0**-20) / scale
            + 2.0**-48 * (2.0 * clip * num_sites + clip * num_summed))


def quantize(values: np.ndarray, clip: float, num_sites: int,
             rng: np.random.Generator | int | None) -> np.ndarray:
    """A site's float update → uint32 in [0, M] (same shape), by clipping and stochastic rounding.

    ``num_sites`` is the most sites whose encodings will ever be summed (all participants of the
    round), not the number expected to survive. NaN raises (it has no meaningful clip); ±inf
    clips to ±clip.
    """
    _check(clip, num_sites)
    values = np.asarray(values)
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise ValueError(f"values must be a real-valued (float or int) array, got dtype "
                         f"{values.dtype}")
    if np.isnan(values).any():
        raise ValueError("values contain NaN: a site's update must be finite to be quantized")
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    encoded = np.empty(values.shape, dtype=np.uint32)
    quantize_into(np.array(values, dtype=np.float64), clip, num_sites, generator, encoded)
    return encoded


# Coordinates per step of the in-place encoding: its float64 block and the rounding draws
# (256 KiB each) stay in a core's L2 cache through the nine passes of the arithmetic.
BLOCK = 1 << 15


class BlockQuantizer:
    """:func:`quantize` block by block into a preallocated uint32 vector, one generator.

    The same values as ``quantize`` of the whole vector for the same generator state: the
    rounding draws are taken in coordinate order, and ``Generator.random`` fills ``out`` from
    the same stream whatever the block sizes. The scratch buffers are reused, so encoding a
    1M-coordinate update allocates nothing per block (tests/test_secagg_speed.py checks the
    values across block and array boundaries).
    """

    def __init__(self, clip: float, num_sites: int, generator: np.random.Generator) -> None:
        _check(clip, num_sites)
        self.clip = float(clip)
        self.scale = quantization_scale(clip, num_sites)
        self.levels = float(levels_per_site(num_sites))
        self.generator = generator
        self._floor = np.empty(BLOCK, dtype=np.float64)
        self._draws = np.empty(BLOCK, dtype=np.float64)

    def __call__(self, work: np.ndarray, out: np.ndarray) -> None:
        """Encode ``work`` (1-D float64, no NaN: the caller checked; overwritten) into ``out``
        (uint32, same length), in blocks of at most :data:`BLOCK`."""
        for start in range(0, len(work), BLOCK):
            self._block(work[start:start + BLOCK], out[start:start + BLOCK])

    def _block(self, work: np.ndarray, out: np.ndarray) -> None:
        size = len(work)
        floor, draws = self._floor[:size], self._draws[:size]
        np.clip(work, -self.clip, self.clip, out=work)
        work += self.clip
        work *= self.scale
        np.floor(work, out=floor)
        work -= floor  # the fractional part: the probability of rounding up
        self.generator.random(out=draws)
        np.less(draws, work, out=draws)  # 1.0 where the draw rounds up, else 0.0
        floor += draws
        # (2c)·s can round to a hair above M in float64; never let one site exceed its M levels.
        np.minimum(floor, self.levels, out=floor)
        np.copyto(out, floor, casting="unsafe")


def quantize_into(work: np.ndarray, clip: float, num_sites: int,
                  generator: np.random.Generator, out: np.ndarray) -> None:
    """:func:`quantize` of ``work`` (float64, no NaN: the caller checked) written into ``out``
    (uint32, same shape); ``work`` is overwritten. The same values as ``quantize`` for the same
    generator state, in place and block by block (:class:`BlockQuantizer`): a 1M-coordinate
    update is memory-bound, and each temporary array costs as much as the arithmetic on it."""
    if not (work.flags.c_contiguous and out.flags.c_contiguous) or work.shape != out.shape:
        raise ValueError(f"quantize_into needs C-contiguous arrays of one shape, got "
                         f"{work.shape} and {out.shape}")
    BlockQuantizer(clip, num_sites, generator)(work.reshape(-1), out.reshape(-1))


def dequantize(total: np.ndarray, clip: float, num_sites: int,
               num_summed: int | None = None) -> np.ndarray:
    """The float64 sum of ``num_summed`` sites' clipped values from the uint32 sum of their
    encodings (sized for ``num_sites``); ``num_summed`` defaults to ``num_sites``."""
    num_summed = num_sites if num_summed is None else num_summed
    _check(clip, num_sites)
    if not isinstance(num_summed, int | np.integer) or not 0 <= num_summed <= num_sites:
        raise ValueError(f"num_summed must be an integer in [0, num_sites={num_sites}], "
                         f"got {num_summed!r}")
    total = np.asarray(total)
    if total.dtype != np.uint32:
        raise ValueError(f"the SecAgg sum must be a uint32 array, got dtype {total.dtype}")
    if num_summed and (total > np.uint32(num_summed * levels_per_site(num_sites))).any():
        raise ValueError(f"sum exceeds what {num_summed} encodings can add up to: the inputs "
                         "were not quantized for this clip/num_sites")
    decoded = total.astype(np.float64)  # the one full-size array: the rest is in place
    decoded /= quantization_scale(clip, num_sites)
    decoded -= num_summed * clip
    return decoded
