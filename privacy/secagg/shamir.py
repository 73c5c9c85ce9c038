"""Shamir t-of-n secret sharing over the prime field GF(2⁵²¹ − 1) (Shamir 1979).

Why this field: p = 2⁵²¹ − 1 is the Mersenne prime M521, larger than any 32-byte secret the
protocol shares (a self-mask seed, an X25519 private key), so a secret is one field element
and no splitting into chunks is needed. A share is the pair (x, f(x)) where f is a random
polynomial of degree t − 1 with f(0) = secret; its value travels as 66 big-endian bytes.

Share holders are participants 0..n−1; holder j gets x = j + 1 (x = 0 would be the secret).

Any t shares determine f, hence the secret (Lagrange interpolation at 0). Fewer than t shares
are jointly uniform and independent of the secret (perfect secrecy): :func:`combine` refuses
them, and :func:`interpolate_at_zero` on them returns an unrelated field element.

Randomness: the polynomial's coefficients are uniform in GF(p), drawn by rejection sampling from
``entropy`` (``os.urandom`` by default; a deterministic source is for tests only).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache

PRIME = 2**521 - 1
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66
Entropy = Callable[[int], bytes]


class ShamirError(ValueError):
    """Shares that cannot give back a secret (too few, duplicated, malformed, inconsistent)."""


def random_field_element(entropy: Entropy = os.urandom) -> int:
    """Uniform in [0, p): 521 random bits, rejected if ≥ p (only p itself, probability 2⁻⁵²¹)."""
    while True:
        value = int.from_bytes(entropy(SHARE_BYTES), "big") & PRIME
        if value < PRIME:
            return value


def _holder_x(holder: int) -> int:
    if not isinstance(holder, int) or isinstance(holder, bool) or holder < 0:
        raise ShamirError(f"share holder must be a participant index >= 0, got {holder!r}")
    return holder + 1


def split(secret: bytes, threshold: int, holders: Iterable[int],
          entropy: Entropy = os.urandom) -> dict[int, bytes]:
    """Shares of ``secret`` for each of ``holders`` (participant indices): holder → 66 bytes.

    Any ``threshold`` of the returned shares give ``secret`` back; fewer reveal nothing.
    """
    holders = list(holders)
    if not isinstance(secret, bytes | bytearray):
        raise ShamirError(f"secret must be bytes, got {type(secret).__name__}")
    if len(secret) >= SHARE_BYTES:  # must be < p as an integer
        raise ShamirError(f"secret must be shorter than {SHARE_BYTES} bytes, got {len(secret)}")
    if len(set(holders)) != len(holders):
        raise ShamirError(f"share holders must be distinct, got {holders}")
    if not 2 <= threshold <= len(holders):
        raise ShamirError(f"threshold must be in [2, {len(holders)}] (number of holders), "
                          f"got {threshold}")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [random_field_element(entropy) for _ in range(threshold - 1)]
    shares = {}
    for holder in holders:
        x = _holder_x(holder)
        y = 0
        for coefficient in reversed(coefficients):  # Horner, reduced once at the end: x is
            y = y * x + coefficient  # small, so y only grows by log2(x) bits per step (2x faster)
        shares[holder] = (y % PRIME).to_bytes(SHARE_BYTES, "big")
    return shares


@lru_cache(maxsize=256)
def lagrange_coefficients_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """λ_i = Π_{j≠i} x_j / (x_j − x_i) mod p, so that f(0) = Σ λ_i f(x_i) for deg f < len(xs).

    Cached: the server reconstructs many secrets from the same set of surviving holders.
    """
    coefficients = []
    for i, x_i in enumerate(xs):
        numerator, denominator = 1, 1
        for j, x_j in enumerate(xs):
            if j != i:
                numerator *= x_j
                denominator *= x_j - x_i
        coefficients.append(numerator * pow(denominator % PRIME, -1, PRIME) % PRIME)
    return tuple(coefficients)


def interpolate_at_zero(shares: Mapping[int, bytes]) -> int:
    """f(0) for the lowest-degree f through all given shares (holder → value bytes)."""
    holders = sorted(shares)
    if len(set(map(_holder_x, holders))) != len(holders):
        raise ShamirError(f"duplicate share holders: {holders}")
    values = []
    for holder in holders:
        value = shares[holder]
        if not isinstance(value, bytes | bytearray) or len(value) != SHARE_BYTES:
            raise ShamirError(f"share of holder {holder} must be {SHARE_BYTES} bytes")
        value = int.from_bytes(value, "big")
        if value >= PRIME:
            raise ShamirError(f"share of holder {holder} is not a field element")
        values.append(value)
    lambdas = lagrange_coefficients_at_zero(tuple(_holder_x(h) for h in holders))
    return sum(lam * y for lam, y in zip(lambdas, values)) % PRIME


def combine(shares: Mapping[int, bytes], threshold: int, secret_bytes: int) -> bytes:
    """The ``secret_bytes``-byte secret from at least ``threshold`` shares (holder → value).

    Uses the ``threshold`` shares of the lowest holder indices (deterministic, and it lets the
    Lagrange coefficients be cached across secrets). Raises :class:`ShamirError` for fewer than
    ``threshold`` shares, and when the interpolated value does not fit in ``secret_bytes``
    bytes, which is what shares of different secrets or corrupted shares give with overwhelming
    probability (1 − 2^(8·secret_bytes − 521)).
    """
    if threshold < 2:
        raise ShamirError(f"threshold must be >= 2, got {threshold}")
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares, {threshold} needed to reconstruct")
    chosen = {holder: shares[holder] for holder in sorted(shares)[:threshold]}
    secret = interpolate_at_zero(chosen)
    if secret >= 1 << (8 * secret_bytes):
        raise ShamirError("shares are inconsistent: the interpolated value is not a "
                          f"{secret_bytes}-byte secret")
    return secret.to_bytes(secret_bytes, "big")
