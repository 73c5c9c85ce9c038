"""DP-SGD noise from a cryptographically secure generator, for Opacus on torch 2.13.

Why: Opacus's ``secure_mode=True`` needs ``torchcsprng``, whose last release pins torch 1.8.1,
so it cannot be used here. ``torch.normal`` draws from a Mersenne Twister / Philox state that
is predictable from its seed or from enough outputs; an adversary who can predict the noise
can subtract it, and the DP guarantee is void. Here the noise comes from a ChaCha20 keystream
(``cryptography``, i.e. OpenSSL) keyed with 32 bytes from ``os.urandom``.

Sampling (all in float64, cast to the gradient's dtype at the end):

- keystream → little-endian 64-bit words → their top 52 bits ``k`` → ``u = (k + 0.5)·2⁻⁵²``,
  uniform on (0, 1) with both ends excluded (every value is exact in float64, the largest is
  1 − 2⁻⁵³), so ``log(u)`` is always finite;
- Box–Muller: ``r = sqrt(−2·log u₁)``, ``θ = 2π·u₂`` → ``r·cos θ``, ``r·sin θ``. The smallest
  ``u₁`` is 2⁻⁵³, so the tails are exact up to |z| ≈ 8.57 (P[|Z| > 8.57] ≈ 10⁻¹⁷).

Keystream hygiene: each generator has its own random key; the 16-byte ChaCha20 nonce holds a
64-bit segment number in its upper 8 bytes and a block counter starting at 0 in its lower 8;
a new segment (next nonce, counter 0) starts every 2³⁶ bytes (2³⁰ blocks, within what even a
32-bit block counter addresses), so no (key, nonce, counter) block is ever used twice.

Scope: this makes the noise unpredictable. It does not by itself defend against floating-point
attacks on the Gaussian sampler (Mironov 2012; Jin et al. 2021, arXiv:2107.10138), which Opacus's
``secure_mode`` also mitigates by summing four draws; sampling in float64 and rounding to the
gradient's float32 makes the released values dense, but no formal claim is made here.

How it plugs into Opacus: :func:`use_secure_noise` changes the class of the optimizer that
``PrivacyEngine.make_private`` returned to a subclass whose only difference is ``add_noise``
(same std ``noise_multiplier · max_grad_norm``, same clipping, scaling, step hooks, hence
the same accounting). The class is changed IN PLACE rather than wrapped because other objects
hold the optimizer: the accountant's step hook is stored on it, and in ghost-clipping mode the
``DPLossFastGradientClipping`` criterion keeps a reference to it; a wrapper would leave those
pointing at the insecure original.

Run ``python -m privacy.secure_noise`` for the cost compared with ``torch.normal``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
import warnings
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping, DPPerLayerOptimizer

from privacy.compat import check_processed_flag, mark_as_processed

_TWO_PI = 2.0 * math.pi
_INV_2_52 = 2.0**-52


def _uniform_open(words: np.ndarray) -> np.ndarray:
    """64-bit words → float64 uniform on the OPEN interval (0, 1) (52-bit resolution).

    52 bits, not 53: ``(k + 0.5)·2⁻⁵³`` for the top 53 bits would round 1 − 2⁻⁵⁴ up to 1.0.
    """
    top52 = (words >> np.uint64(12)).astype(np.float64)
    return (top52 + 0.5) * _INV_2_52


def _box_muller(words: np.ndarray) -> torch.Tensor:
    """``2m`` 64-bit words → ``2m`` independent N(0, 1) float64 samples (Box–Muller)."""
    uniforms = torch.from_numpy(_uniform_open(words))
    half = uniforms.numel() // 2
    radius = uniforms[:half].log().mul_(-2.0).sqrt_()
    angle = uniforms[half:].mul(_TWO_PI)
    normals = torch.empty(2 * half, dtype=torch.float64)
    torch.mul(radius, angle.cos(), out=normals[:half])
    torch.mul(radius, angle.sin_(), out=normals[half:])
    return normals


class ChaCha20Gaussian:
    """A Gaussian sampler driven by a ChaCha20 keystream (a CSPRNG).

    ``key`` defaults to ``os.urandom(32)``; pass one ONLY to reproduce a stream in tests, a
    known key makes the noise predictable and voids the privacy guarantee.

    Samples are produced in chunks of ``2·CHUNK_PAIRS`` through preallocated scratch buffers
    (≈1.8 MB, cache-sized): allocating fresh multi-MB temporaries per parameter made the noise
    step 5-10x slower inside a training loop (page faults), although not in isolation. Each
    chunk's output is exactly :func:`_box_muller` of that chunk's keystream words. One
    generator per optimizer; it is not thread-safe.
    """

    SEGMENT_BYTES = 2**36  # keystream bytes per nonce; 64 GiB ≪ 2³² blocks · 64 B
    CHUNK_PAIRS = 2**15  # Box–Muller pairs per chunk (16 bytes of keystream each)

    def __init__(self, key: bytes | None = None) -> None:
        if key is None:
            key = os.urandom(32)
        if not isinstance(key, bytes | bytearray) or len(key) != 32:
            raise ValueError("ChaCha20 needs a 32-byte key")
        self._key = bytes(key)
        self._segment = 0
        self._segment_left = 0
        self._encryptor: Any = None
        chunk_bytes = 16 * self.CHUNK_PAIRS
        self._zeros = bytes(chunk_bytes)  # ChaCha20(zeros) = keystream
        self._bytes = bytearray(chunk_bytes)
        self._words = np.frombuffer(self._bytes, dtype="<u8")
        self._uniform = torch.empty(2 * self.CHUNK_PAIRS, dtype=torch.float64)
        self._scratch = torch.empty(self.CHUNK_PAIRS, dtype=torch.float64)

    def __repr__(self) -> str:  # never show the key
        return f"{type(self).__name__}(segment={self._segment})"

    def _next_segment(self) -> None:
        nonce = (0).to_bytes(8, "little") + self._segment.to_bytes(8, "little")
        self._encryptor = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
        self._segment += 1
        self._segment_left = self.SEGMENT_BYTES

    def _fill_keystream(self, out: memoryview) -> None:
        zeros = memoryview(self._zeros)
        done, total = 0, len(out)
        while done < total:
            if self._segment_left == 0:
                self._next_segment()
            take = min(total - done, self._segment_left, len(zeros))
            self._encryptor.update_into(zeros[:take], out[done:done + take])
            self._segment_left -= take
            done += take

    def keystream(self, num_bytes: int) -> bytearray:
        """The next ``num_bytes`` bytes of the keystream (ChaCha20 applied to zeros)."""
        out = bytearray(num_bytes)
        self._fill_keystream(memoryview(out))
        return out

    def _fill_normal_(self, out: torch.Tensor, std: float) -> None:
        """Fill the flat CPU tensor ``out`` with N(0, std²) samples (float64 math, then cast)."""
        n, start = out.numel(), 0
        while start < n:
            count = min(n - start, 2 * self.CHUNK_PAIRS)
            pairs = (count + 1) // 2
            words = self._words[: 2 * pairs]
            self._fill_keystream(memoryview(self._bytes)[: 16 * pairs])
            # the in-place form of _uniform_open: top 52 bits, (k + 0.5)·2⁻⁵², open (0, 1)
            np.right_shift(words, np.uint64(12), out=words)
            uniform = self._uniform[: 2 * pairs]
            np.copyto(uniform.numpy(), words, casting="unsafe")
            uniform.add_(0.5).mul_(_INV_2_52)
            # the in-place form of _box_muller, std folded into the radius
            radius = uniform[:pairs].log_().mul_(-2.0).sqrt_().mul_(std)
            angle = uniform[pairs:].mul_(_TWO_PI)
            scratch = self._scratch[:pairs]
            out[start:start + pairs].copy_(torch.cos(angle, out=scratch).mul_(radius))
            out[start + pairs:start + count].copy_(
                torch.sin(angle, out=scratch).mul_(radius)[: count - pairs])
            start += count

    def standard_normal(self, n: int) -> torch.Tensor:
        """``n`` independent N(0, 1) samples, float64, on CPU."""
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        out = torch.empty(n, dtype=torch.float64)
        self._fill_normal_(out, 1.0)
        return out

    def normal_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """N(0, std²) noise with ``reference``'s shape, dtype and device (zeros if std == 0).

        Drawn on CPU (the keystream comes from OpenSSL) and then moved to the device.
        """
        if std == 0:
            return torch.zeros_like(reference)
        noise = torch.empty(reference.numel(), dtype=reference.dtype)
        self._fill_normal_(noise, float(std))
        return noise.view(reference.shape).to(device=reference.device)


class SecureNoiseMixin:
    """Replaces ``DPOptimizer.add_noise`` by the same step with ChaCha20 noise; nothing else."""

    secure_noise_source: ChaCha20Gaussian

    def __init__(self, *args: Any, noise_key: bytes | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.secure_noise_source = ChaCha20Gaussian(noise_key)

    def add_noise(self) -> None:
        # Same std as Opacus: noise_multiplier · max_grad_norm, added to the clipped sum
        # (before scale_grad divides by the expected batch size). Ghost clipping may set
        # _adjusted_noise_multiplier for noise while accounting keeps noise_multiplier.
        noise_multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = noise_multiplier * self.max_grad_norm
        for p in self.params:
            check_processed_flag(p.summed_grad)
            noise = self.secure_noise_source.normal_like(p.summed_grad, std)
            p.grad = (p.summed_grad + noise).view_as(p)
            mark_as_processed(p.summed_grad)


class SecureNoiseDPOptimizer(SecureNoiseMixin, DPOptimizer):
    """``DPOptimizer`` (hooks/ew/functorch, flat clipping) with CSPRNG noise."""


class SecureNoiseDPPerLayerOptimizer(SecureNoiseMixin, DPPerLayerOptimizer):
    """``DPPerLayerOptimizer`` (per-layer clipping) with CSPRNG noise."""


class SecureNoiseDPOptimizerFastGradientClipping(SecureNoiseMixin, DPOptimizerFastGradientClipping):
    """``DPOptimizerFastGradientClipping`` (ghost clipping) with CSPRNG noise."""


# Exact classes; a subclass may override add_noise (AdaClip, DDP, FSDP do), and silently
# replacing its noise step could change what it adds or on which rank: ``secure_class`` adds
# only subclasses that keep DPOptimizer's noise path untouched.
SECURE_VARIANTS: dict[type, type] = {
    DPOptimizer: SecureNoiseDPOptimizer,
    DPPerLayerOptimizer: SecureNoiseDPPerLayerOptimizer,
    DPOptimizerFastGradientClipping: SecureNoiseDPOptimizerFastGradientClipping,
}


def secure_class(optimizer_class: type) -> type | None:
    """The secure-noise variant of a DP optimizer class, or None when it has none.

    Besides the exact classes in ``SECURE_VARIANTS``, a ``DPOptimizer`` subclass that keeps
    ``DPOptimizer``'s whole noise path (``pre_step``, ``add_noise``, ``scale_grad``, ``step``)
    and changes only how per-sample gradients are clipped (models/dp_embedding.py's sparse
    embedding tables) gets the same mixin: what it adds noise to is still ``p.summed_grad``.
    """
    secure = SECURE_VARIANTS.get(optimizer_class)
    if secure is not None or not issubclass(optimizer_class, DPOptimizer):
        return secure
    if any(getattr(optimizer_class, name) is not getattr(DPOptimizer, name)
           for name in ("pre_step", "add_noise", "scale_grad", "step")):
        return None
    secure = type(f"SecureNoise{optimizer_class.__name__}", (SecureNoiseMixin, optimizer_class),
                  {"__doc__": f"``{optimizer_class.__name__}`` with CSPRNG noise.",
                   "__module__": __name__})
    return SECURE_VARIANTS.setdefault(optimizer_class, secure)


def use_secure_noise(dp_optimizer: DPOptimizer, *, key: bytes | None = None) -> DPOptimizer:
    """Make the optimizer returned by ``PrivacyEngine.make_private`` draw its noise from ChaCha20.

    Changes ``dp_optimizer``'s class in place (see the module docstring for why not a wrapper)
    and returns the same object. Idempotent. A ``noise_generator`` given to ``make_private``
    is no longer used (a seeded torch generator is exactly what secure noise replaces).
    Raises ``TypeError`` for optimizers whose noise step differs from ``DPOptimizer``'s
    (AdaClip, distributed, FSDP).
    """
    if type(dp_optimizer) in SECURE_VARIANTS.values():
        return dp_optimizer
    secure = secure_class(type(dp_optimizer))
    if secure is None:
        raise TypeError(
            f"secure noise supports {sorted(c.__name__ for c in SECURE_VARIANTS)} and "
            "DPOptimizer subclasses that keep its noise step, "
            f"not {type(dp_optimizer).__name__}"
        )
    if getattr(dp_optimizer, "generator", None) is not None:
        warnings.warn("secure noise ignores the torch noise_generator given to make_private",
                      stacklevel=2)
    dp_optimizer.__class__ = secure
    dp_optimizer.secure_noise_source = ChaCha20Gaussian(key)
    return dp_optimizer


def benchmark(num_params: int = 1_000_000, repeats: int = 7) -> dict[str, float]:
    """Median time to draw noise for ``num_params`` float32 parameters: ChaCha20 vs torch.normal."""
    reference = torch.zeros(num_params, dtype=torch.float32)
    source = ChaCha20Gaussian()

    def median_seconds(draw) -> float:
        draw()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            draw()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    secure = median_seconds(lambda: source.normal_like(reference, 1.0))
    plain = median_seconds(lambda: torch.normal(0.0, 1.0, size=reference.shape,
                                                 dtype=reference.dtype))
    result = {"num_params": float(num_params), "secure_s": secure, "torch_s": plain,
              "ratio": secure / plain}
    print(f"noise for {num_params:,} params (median of {repeats}, "
          f"{torch.get_num_threads()} torch threads):")
    print(f"  ChaCha20 + Box-Muller (float64): {secure * 1e3:8.2f} ms")
    print(f"  torch.normal (float32)         : {plain * 1e3:8.2f} ms")
    print(f"  ratio secure / torch            : {secure / plain:8.1f}x")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=benchmark.__doc__)
    parser.add_argument("--num-params", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    arguments = parser.parse_args()
    benchmark(arguments.num_params, arguments.repeats)
