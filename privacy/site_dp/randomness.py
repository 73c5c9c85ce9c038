"""Exact uniform integers from a ChaCha20 keystream: the randomness behind site-level DP noise.

Why not numpy's generator: the noise a site adds is what hides its update from everyone who
later sees the unmasked sum. A PCG64/Mersenne state is predictable from its seed or from enough
outputs, and predictable noise can be subtracted. The keystream here is ChaCha20 (OpenSSL via
``cryptography``) keyed with 32 bytes from ``os.urandom`` — the same construction as
privacy/secure_noise.py, without its torch/Opacus dependencies (a server that only decodes or
plans should not import torch).

Exactness: :meth:`KeyStream.uniform_below_scalar` draws 63-bit words and rejects those at or
above the largest multiple of the bound (``w < ⌊2⁶³/b⌋·b``), so every value in ``[0, b)`` has
exactly the same probability; nothing passes through floating point. The discrete Gaussian sampler
(discrete_gaussian.py) is built from these integers only.

Keystream hygiene: one key per stream, nonce fixed at 0, the 64-bit block counter running from
0; a stream refuses to produce more than 2⁴⁰ bytes (far beyond a round's needs: ~20 words per
coordinate, 160 MB for 1M coordinates), so no (key, counter) block is reused.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_MAX_BYTES = 2**40
_TWO_63 = 2**63


class KeyStream:
    """A ChaCha20 keystream read as little-endian 64-bit words and exact uniform integers.

    ``key`` defaults to ``os.urandom(32)``. Pass one only to reproduce a stream (tests) or for a
    PUBLIC stream such as the round's shared rotation (:meth:`public`): a known key makes the
    stream predictable. Not thread-safe.
    """

    def __init__(self, key: bytes | None = None) -> None:
        if key is None:
            key = os.urandom(32)
        if not isinstance(key, bytes | bytearray) or len(key) != 32:
            raise ValueError(f"a ChaCha20 key must be 32 bytes, got {type(key).__name__} "
                             f"of length {len(key) if hasattr(key, '__len__') else '?'}")
        cipher = Cipher(algorithms.ChaCha20(bytes(key), bytes(16)), mode=None)
        self._encryptor = cipher.encryptor()
        self._used = 0

    @classmethod
    def public(cls, seed: bytes, label: str) -> KeyStream:
        """A stream every party can recompute from a public ``seed`` (domain-separated by
        ``label``): for the round's random rotation, never for noise."""
        if not isinstance(seed, bytes | bytearray) or not seed:
            raise ValueError("the public seed must be non-empty bytes")
        return cls(hashlib.sha256(label.encode() + b"\x00" + bytes(seed)).digest())

    def __repr__(self) -> str:  # never show the key
        return f"{type(self).__name__}(bytes_used={self._used})"

    def read(self, num_bytes: int) -> bytes:
        """The next ``num_bytes`` bytes of keystream."""
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
        self._used += num_bytes
        if self._used > _MAX_BYTES:
            raise RuntimeError("this keystream has produced 2**40 bytes; start a new one")
        return self._encryptor.update(bytes(num_bytes))

    def words(self, count: int) -> np.ndarray:
        """``count`` uniform uint64 words."""
        return np.frombuffer(self.read(8 * count), dtype="<u8").astype(np.uint64, copy=False)

    def bits(self, count: int) -> np.ndarray:
        """``count`` uniform bits as a uint8 array of 0/1."""
        packed = np.frombuffer(self.read((count + 7) // 8), dtype=np.uint8)
        return np.unpackbits(packed, count=count, bitorder="little")

    def uniform_below_scalar(self, count: int, bound: int) -> np.ndarray:
        """``count`` exact uniform integers in ``[0, bound)`` (int64), ``bound`` in [1, 2⁶²]:
        one limit for all lanes (the largest multiple of ``bound`` not above 2⁶³)."""
        bound = int(bound)
        if not 1 <= bound <= 2**62:
            raise ValueError(f"uniform_below_scalar needs a bound in [1, 2**62], got {bound}")
        limit = np.int64((_TWO_63 // bound) * bound - 1)  # accept w ≤ limit
        draws = (self.words(count) >> np.uint64(1)).view(np.int64)
        ok = draws <= limit
        if ok.all():  # all but always: a rejection has probability < bound / 2⁶³
            return draws % bound
        out = draws % bound
        pending = np.flatnonzero(~ok)
        while pending.size:
            draws = (self.words(pending.size) >> np.uint64(1)).view(np.int64)
            ok = draws <= limit
            out[pending[ok]] = draws[ok] % bound
            pending = pending[~ok]
        return out

    def uniform_below_int(self, bound: int) -> int:
        """An exact uniform Python integer in ``[0, bound)`` for any ``bound >= 1``."""
        if bound < 1:
            raise ValueError(f"bound must be >= 1, got {bound}")
        num_bits = bound.bit_length()
        num_bytes = (num_bits + 7) // 8
        mask = (1 << num_bits) - 1
        while True:  # accept probability > 1/2
            value = int.from_bytes(self.read(num_bytes), "little") & mask
            if value < bound:
                return value
