"""Time every SecAgg stage on this machine (not a test).

    python -m privacy.secagg.benchmark                       # n = 10 sites, L = 100,000
    python -m privacy.secagg.benchmark --sites 20 --length 1000000 --degree 8 --drop 2
    python -m privacy.secagg.benchmark --sites 20 --length 1000 --shamir-holders 101

Prints, per stage, the time of all sites' work (summed: in a federation sites run in parallel,
so divide by n for one site's share) and the server's, each site checking every signature as a
deployed site does (``--remember-signatures``: as a simulation actor serving many sites, each
distinct signature checked once per process, identity.py), the upload per site, one site's
masked-input work (its update encoded and masked as the site streams it vs by the definitions
whole arrays at a time, same vector; median and min of 5, interleaved), and Shamir
split/reconstruct times for a round's secrets (default: as many holders as sites), ours and
Flower 1.41's (``flwr.common.secure_aggregation.crypto.shamir``: pycryptodome over GF(2^128), a
32-byte secret padded to 48 bytes and shared as three 16-byte chunks) measured side by side,
interleaved, min of 3; Flower's is reached through ``privacy.compat.flower_shamir()`` and the
line says why when that is missing. Flower's takes ~50 s per repeat at 101 holders here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import numpy as np

from privacy.secagg import crypto, shamir
from privacy.secagg import messages as m
from privacy.secagg.identity import forget_verified_signatures, remember_verified_signatures
from privacy.secagg.loopback import run_round
from privacy.secagg.quantize import quantize
from privacy.secagg.server import setup
from privacy.secagg.update import WEIGHT_CLIP, encode_difference


def _time_ours(num_holders: int) -> tuple[float, float]:
    threshold = num_holders // 2 + 1
    holders = list(range(num_holders))
    shamir.lagrange_coefficients_at_zero.cache_clear()
    secrets = [os.urandom(32) for _ in range(num_holders)]
    start = time.perf_counter()
    all_shares = [shamir.split(secret, threshold, holders) for secret in secrets]
    split = (time.perf_counter() - start) / num_holders
    start = time.perf_counter()
    recovered = [shamir.combine(shares, threshold, 32) for shares in all_shares]
    combine = time.perf_counter() - start
    assert recovered == secrets, "our Shamir did not give the secrets back"
    return split, combine


def flower_shamir() -> Any:
    """Flower's ``(create_shares, combine_shares)`` through ``privacy/compat.py`` (the one module
    allowed Flower's non-public API, tests/test_compat.py), or why they are not there."""
    from privacy import compat

    shamir_of_flower = getattr(compat, "flower_shamir", None)
    if shamir_of_flower is None:
        return ("Flower's Shamir (flwr.common.secure_aggregation.crypto.shamir) is not public "
                "API: only privacy/compat.py may import it, and compat has no flower_shamir() yet")
    return shamir_of_flower()


def _time_flower(num_holders: int) -> tuple[float, float]:
    functions = flower_shamir()
    if isinstance(functions, str):
        raise LookupError(functions)
    create_shares, combine_shares = functions
    threshold = num_holders // 2 + 1
    secrets = [os.urandom(32) for _ in range(num_holders)]
    start = time.perf_counter()
    all_shares = [create_shares(secret, threshold, num_holders) for secret in secrets]
    split = (time.perf_counter() - start) / num_holders
    start = time.perf_counter()
    recovered = [combine_shares(shares[:threshold]) for shares in all_shares]
    combine = time.perf_counter() - start
    assert recovered == secrets, "Flower's Shamir did not give the secrets back"
    return split, combine


def time_shamir(num_holders: int = 101, repeats: int = 3) -> tuple[float, float]:
    """Seconds to split one 32-byte secret among ``num_holders`` (majority threshold) and to
    reconstruct all ``num_holders`` secrets of a round from a majority of holders each (min
    of ``repeats``)."""
    times = [_time_ours(num_holders) for _ in range(repeats)]
    return min(t[0] for t in times), min(t[1] for t in times)


def compare_shamir(num_holders: int = 101, repeats: int = 3
                   ) -> dict[str, tuple[float, float] | str]:
    """``{"medsilo": (split, combine), "flower": (split, combine) or why it could not run}``:
    the same work as :func:`time_shamir` for both, interleaved (ours, Flower's, ours, ...)."""
    ours: list[tuple[float, float]] = []
    flower: list[tuple[float, float]] = []
    why_not = None
    for _ in range(repeats):
        ours.append(_time_ours(num_holders))
        if why_not is None:
            try:
                flower.append(_time_flower(num_holders))
            except LookupError as error:  # no way to Flower's Shamir here
                why_not = str(error)
            except ImportError as error:  # Flower or pycryptodome not installed
                why_not = f"Flower's Shamir cannot be imported here: {error}"
    result: dict[str, tuple[float, float] | str] = {
        "medsilo": (min(t[0] for t in ours), min(t[1] for t in ours))}
    result["flower"] = why_not if why_not is not None else (
        min(t[0] for t in flower), min(t[1] for t in flower))
    return result


def _site_work_streamed(after: list[np.ndarray], before: list[np.ndarray],
                        masks: list[tuple[bytes, bool]], num_sites: int) -> np.ndarray:
    """What a site runs: the delta formed, clipped, weighted and quantized block by block,
    then every mask applied in one pass over the vector."""
    vector, _ = encode_difference(after, before, 0.5, clip=0.5, num_sites=num_sites, rng=0)
    crypto.apply_masks(vector, masks)
    return vector


def _site_work_whole(after: list[np.ndarray], before: list[np.ndarray],
                     masks: list[tuple[bytes, bool]], num_sites: int) -> np.ndarray:
    """The same values by the definitions, whole arrays at a time: the float64 delta, then
    ``quantize(w·clip(delta))`` and the weight, then each mask expanded in full and added."""
    delta = np.concatenate([a.astype(np.float64).ravel() - b.astype(np.float64).ravel()
                            for a, b in zip(after, before)])
    generator = np.random.default_rng(0)
    vector = np.concatenate([quantize(0.5 * np.clip(delta, -0.5, 0.5), 0.5, num_sites,
                                      generator),
                             quantize(np.array([0.5]), WEIGHT_CLIP, num_sites, generator)])
    for seed, subtract in masks:
        mask = crypto.expand_mask(seed, len(vector))
        vector = vector - mask if subtract else vector + mask
    return vector


def compare_site_work(length: int, num_sites: int, repeats: int = 5
                      ) -> dict[str, tuple[float, float]]:
    """A site's work in the masked-input stage at full SecAgg (its update of ``length`` fp32
    weights encoded, then its self mask and ``num_sites`` − 1 pairwise masks), streamed as the
    site runs it vs whole arrays at a time, interleaved; ``{name: (median s, min s)}``. Both
    must give the same vector."""
    rng = np.random.default_rng(1)
    before = [rng.normal(0, 0.1, length).astype(np.float32)]
    after = [b + rng.normal(0, 0.01, length).astype(np.float32) for b in before]
    masks = [(rng.bytes(crypto.KEY_BYTES), k % 2 == 1) for k in range(num_sites)]
    variants = {"streamed": _site_work_streamed, "whole arrays": _site_work_whole}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        vectors = []
        for name, work in variants.items():
            start = time.perf_counter()
            vectors.append(work(after, before, masks, num_sites))
            times[name].append(time.perf_counter() - start)
        assert np.array_equal(*vectors), "the streamed site work differs from the definition"
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--length", type=int, default=100_000)
    parser.add_argument("--degree", type=int, default=None, help="SecAgg+ degree (None: full)")
    parser.add_argument("--drop", type=int, default=1, help="sites dropping after share-keys")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--remember-signatures", action="store_true",
                        help="let the sites share this process's cache of checked signatures")
    parser.add_argument("--shamir-holders", type=int, default=None,
                        help="holders for the Shamir timing (default: --sites)")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    plan = setup(args.sites, neighbours=args.degree, seed=args.seed)
    vectors = {i: rng.integers(0, 2**32, args.length, dtype=np.uint32)
               for i in range(args.sites)}
    dropped = set(range(args.sites - args.drop, args.sites))
    forget_verified_signatures()
    limit = remember_verified_signatures(0)
    if args.remember_signatures:
        remember_verified_signatures(limit)
    try:
        start = time.perf_counter()
        result = run_round(plan, vectors, dropouts={m.STAGE_MASKED_INPUT: dropped})
        wall = time.perf_counter() - start
    finally:
        remember_verified_signatures(limit)
    expected = np.zeros(args.length, dtype=np.uint32)
    for i in result.survivors:
        expected += vectors[i]
    assert np.array_equal(result.total, expected), "unmasked sum differs from the plaintext sum"
    print(f"SecAgg round: n={args.sites}, L={args.length:,}, t={plan.threshold}, "
          f"degree={len(plan.neighbours[0])}, {args.drop} dropped after share-keys; "
          f"exact sum OK; {wall:.3f} s in one process; each signature checked "
          f"{'once in this process' if args.remember_signatures else 'by every site'}")
    print(f"{'stage':<16}{'all sites (s)':>14}{'per site (ms)':>15}{'server (s)':>12}")
    for stage in m.STAGES:
        sites = result.site_seconds.get(stage, 0.0)
        print(f"{stage:<16}{sites:>14.4f}{1e3 * sites / args.sites:>15.2f}"
              f"{result.server_seconds.get(stage, 0.0):>12.4f}")
    survivor = min(result.survivors)
    overhead = result.upload_bytes[survivor] - 4 * args.length
    print(f"upload of site {survivor}: {result.upload_bytes[survivor]:,} bytes = 4 B x "
          f"{args.length:,} (same as fp32) + {overhead:,} B of keys, ciphertexts and shares")
    print(f"one site's masked-input work, n={args.sites} masks over {args.length + 1:,} "
          "coordinates (encode + mask; median / min of 5, interleaved):")
    for name, (median_s, min_s) in compare_site_work(args.length, args.sites).items():
        print(f"  {name:<13} {median_s * 1e3:8.2f} ms / {min_s * 1e3:8.2f} ms")
    holders = args.shamir_holders or args.sites
    print(f"Shamir, {holders} holders, t={holders // 2 + 1}, 32-byte secrets (min of 3, "
          "interleaved):")
    for name, measured in compare_shamir(holders).items():
        if isinstance(measured, str):
            print(f"  {name:<8} not measured: {measured}")
            continue
        split_s, combine_s = measured
        print(f"  {name:<8} split one secret {split_s * 1e3:8.3f} ms ({2e3 * holders * split_s:.1f}"
              f" ms for b and s key of all {holders} sites); reconstruct {holders} secrets "
              f"{combine_s * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
