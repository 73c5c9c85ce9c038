"""What makes a secure round cheaper must not make it weaker: a remembered signature vouches only
for the exact bytes it signed, and the fused encoding gives the very values of its definition."""

from __future__ import annotations

import numpy as np
import pytest

from privacy.secagg import SecAggProtocolError, SecAggServer, advertise_keys, setup, share_keys
from privacy.secagg import identity as ident
from privacy.secagg import messages as m
from privacy.secagg.crypto import MASK_CHUNK_WORDS, apply_masks, expand_mask, generate_key_pair
from privacy.secagg.identity import (
    forget_verified_signatures,
    generate_key,
    sign,
    test_identities,
    verification_counts,
    verify,
)
from privacy.secagg.loopback import run_round
from privacy.secagg.quantize import BLOCK, quantize, quantize_into
from privacy.secagg.update import WEIGHT_CLIP, encode_difference, encode_update

SESSION = b"speed-session-01"


def _delta(counts: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: counts[k] - before[k] for k in counts}


def test_a_remembered_signature_vouches_for_nothing_but_the_bytes_it_signed():
    key, other = generate_key(), generate_key()
    c_key, s_key = generate_key_pair()[1], generate_key_pair()[1]
    statement = m.key_statement(SESSION, 1, 5, 3, "site-1", c_key, s_key)
    signature = sign(key, statement)
    forget_verified_signatures()
    assert verify(key.public_key(), signature, statement)
    before = verification_counts()
    assert verify(key.public_key(), signature, statement)  # remembered, not re-checked
    assert _delta(verification_counts(), before) == {"verified": 0, "remembered": 1, "refused": 0}
    # the same session and index with a substituted key, another signer, another round's
    # parameters: each is checked, and refused, every time it is asked
    substituted = m.key_statement(SESSION, 1, 5, 3, "site-1", generate_key_pair()[1], s_key)
    other_round = m.key_statement(SESSION, 1, 5, 4, "site-1", c_key, s_key)
    before = verification_counts()
    for _ in range(2):
        assert not verify(key.public_key(), signature, substituted)
        assert not verify(other.public_key(), signature, statement)
        assert not verify(key.public_key(), signature, other_round)
        assert not verify(key.public_key(), signature[:-1] + bytes([signature[-1] ^ 1]),
                          statement)
    assert _delta(verification_counts(), before) == {"verified": 0, "remembered": 0, "refused": 8}


def test_a_site_refuses_a_substituted_key_after_its_neighbours_accepted_the_real_one():
    """The server routes site 1's real signed keys to sites 0, 2, 3 (the signature is now
    remembered in this process) and a substituted key under the same signature to site 4."""
    n, victim, owner = 5, 4, 1
    plan = setup(n, session=SESSION)
    server = SecAggServer(plan)
    made = test_identities(f"site-{i}" for i in range(n))
    identities = {i: made[f"site-{i}"] for i in range(n)}
    states, replies = {}, {}
    for i, config in server.site_configs().items():
        states[i], replies[i] = advertise_keys(config, identities[i])
    routed = server.route_public_keys(replies)
    for i in (0, 2, 3):
        share_keys(states[i], routed[i], identities[i])
    message = routed[victim]
    position = message[m.KEY_OWNERS].index(owner)
    for field in (m.C_PUBLIC_KEYS, m.S_PUBLIC_KEYS):
        keys = list(message[field])
        keys[position] = generate_key_pair()[1]
        with pytest.raises(SecAggProtocolError, match="not signed by that site") as error:
            share_keys(states[victim], {**message, field: keys}, identities[victim])
        assert error.value.participant == owner
    share_keys(states[victim], message, identities[victim])  # the real keys still pass


def test_one_process_serving_every_site_checks_each_signature_once():
    """2n distinct signatures in a round (n signed key sets, n signatures on the survivor set),
    each checked by n - 1 or n sites: in one process, n·(n-1) + n² checks become 2n."""
    n = 6
    forget_verified_signatures()
    before = verification_counts()
    vectors = {i: np.arange(8, dtype=np.uint32) * (i + 1) for i in range(n)}
    result = run_round(setup(n, session=SESSION), vectors)
    assert result.survivors == set(range(n))
    counts = _delta(verification_counts(), before)
    assert counts["verified"] == 2 * n and counts["refused"] == 0
    assert counts["remembered"] == n * (n - 1) + n * n - 2 * n


def test_the_verification_cache_is_bounded_and_drops_the_least_recently_used():
    previous = ident.remember_verified_signatures(3)
    try:
        key = generate_key()
        signed = [(b"statement %d" % k, sign(key, b"statement %d" % k)) for k in range(5)]
        for statement, signature in signed:
            assert verify(key.public_key(), signature, statement)
        assert ident._verified.cache_info().currsize == 3
        before = verification_counts()
        assert verify(key.public_key(), signed[4][1], signed[4][0])  # kept
        assert verify(key.public_key(), signed[0][1], signed[0][0])  # dropped: checked again
        assert _delta(verification_counts(), before) == {"verified": 1, "remembered": 1,
                                                         "refused": 0}
        ident.remember_verified_signatures(0)  # as a deployed site: every check is made
        for _ in range(2):
            assert verify(key.public_key(), signed[1][1], signed[1][0])
        assert verification_counts() == {"verified": 2, "remembered": 0, "refused": 0}
    finally:
        ident.remember_verified_signatures(previous)


@pytest.mark.parametrize(("weight", "num_sites"), [(0.37, 5), (1.0, 20), (0.0, 3), (1.5, 7)])
def test_the_fused_encoding_is_quantize_of_the_weighted_clipped_delta_then_the_weight(
        weight, num_sites):
    rng = np.random.default_rng(4)
    delta = [rng.normal(0, 0.4, shape).astype(np.float32) for shape in [(64, 35), (64,), (2,)]]
    delta[0][0, :2] = [9.0, -9.0]
    vector, clipped = encode_update(delta, weight, clip=0.5, num_sites=num_sites, rng=11)
    flat = np.concatenate([d.astype(np.float64).ravel() for d in delta])
    generator = np.random.default_rng(11)
    expected = np.concatenate([
        quantize(weight * np.clip(flat, -0.5, 0.5), 0.5, num_sites, generator),
        quantize(np.array([weight]), WEIGHT_CLIP, num_sites, generator)])
    np.testing.assert_array_equal(vector, expected)
    assert vector.dtype == np.uint32
    assert clipped == pytest.approx(np.mean(np.abs(flat) > 0.5))


@pytest.mark.parametrize("weight", [float("nan"), float("inf")])
def test_a_weight_that_is_not_a_number_is_never_encoded(weight):
    with pytest.raises(ValueError, match="weight must be a finite number"):
        encode_update([np.zeros(4, dtype=np.float32)], weight, clip=0.5, num_sites=3, rng=0)


def test_masks_applied_in_one_pass_are_the_masks_applied_one_by_one():
    """A site's n masks (and the server's unmasking) stream the vector once, chunk by chunk,
    every keystream advanced in step: the same ring values as each mask in turn."""
    rng = np.random.default_rng(5)
    masks = [(rng.bytes(32), bool(k % 2)) for k in range(5)]
    for length in (0, 3, MASK_CHUNK_WORDS, 2 * MASK_CHUNK_WORDS + 5):
        base = rng.integers(0, 2**32, length, dtype=np.uint32)
        one_by_one = base.copy()
        for seed, subtract in masks:
            mask = expand_mask(seed, length)
            one_by_one = one_by_one - mask if subtract else one_by_one + mask
        together = base.copy()
        apply_masks(together, masks)
        np.testing.assert_array_equal(together, one_by_one)
        apply_masks(together, [(seed, not subtract) for seed, subtract in masks])
        np.testing.assert_array_equal(together, base)


def test_masks_are_applied_only_to_a_writeable_uint32_vector_with_32_byte_seeds():
    seed = bytes(32)
    with pytest.raises(ValueError, match="mask seed must be 32 bytes"):
        apply_masks(np.zeros(4, dtype=np.uint32), [(seed, False), (seed[:16], True)])
    with pytest.raises(ValueError, match="1-D uint32"):
        apply_masks(np.zeros(4, dtype=np.int64), [(seed, False)])
    frozen = np.zeros(4, dtype=np.uint32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        apply_masks(frozen, [(seed, False)])


def _model_pair(rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Weights before and after training whose arrays straddle the encoding's blocks."""
    shapes = [(BLOCK + 3,), (7, 5), (2, BLOCK - 1), (1,)]
    before = [rng.normal(0, 1, shape).astype(np.float32) for shape in shapes]
    after = [b + rng.normal(0, 0.4, b.shape).astype(np.float32) for b in before]
    after[2][1, -2:] = before[2][1, -2:] + np.float32(3.0)  # beyond the clip
    return after, before


@pytest.mark.parametrize(("weight", "num_sites"), [(0.37, 5), (1.0, 20)])
def test_encoding_the_difference_block_by_block_is_encoding_the_float64_delta(weight, num_sites):
    """The site encodes after − before without building the delta: the same vector as the
    definition (quantize of the weighted clipped float64 delta, then the weight), across
    block and array boundaries."""
    after, before = _model_pair(np.random.default_rng(8))
    vector, clipped = encode_difference(after, before, weight, clip=0.5, num_sites=num_sites,
                                        rng=13)
    flat = np.concatenate([a.astype(np.float64).ravel() - b.astype(np.float64).ravel()
                           for a, b in zip(after, before)])
    generator = np.random.default_rng(13)
    expected = np.concatenate([
        quantize(weight * np.clip(flat, -0.5, 0.5), 0.5, num_sites, generator),
        quantize(np.array([weight]), WEIGHT_CLIP, num_sites, generator)])
    np.testing.assert_array_equal(vector, expected)
    assert clipped == pytest.approx(np.mean(np.abs(flat) > 0.5)) and clipped > 0
    delta = [a.astype(np.float64) - b.astype(np.float64) for a, b in zip(after, before)]
    same, _ = encode_update(delta, weight, clip=0.5, num_sites=num_sites, rng=13)
    np.testing.assert_array_equal(same, vector)


def test_a_difference_that_does_not_line_up_or_is_not_finite_is_never_encoded():
    after, before = _model_pair(np.random.default_rng(9))
    with pytest.raises(ValueError, match="4 arrays after training, 3 before"):
        encode_difference(after, before[:3], 0.5, clip=0.5, num_sites=3, rng=0)
    with pytest.raises(ValueError, match=r"array 1 has shape \(7, 5\) after training, \(35,\)"):
        encode_difference(after, [before[0], before[1].ravel(), *before[2:]], 0.5, clip=0.5,
                          num_sites=3, rng=0)
    after[2][0, BLOCK - 2] = np.inf  # inf − finite, in the second block of the update
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode_difference(after, before, 0.5, clip=0.5, num_sites=3, rng=0)


def test_in_place_quantization_needs_contiguous_arrays_of_one_shape():
    generator = np.random.default_rng(0)
    work = np.zeros((4, 6))
    with pytest.raises(ValueError, match="C-contiguous arrays of one shape"):
        quantize_into(work[:, ::2], 0.5, 3, generator, np.empty((4, 3), dtype=np.uint32))
    with pytest.raises(ValueError, match="C-contiguous arrays of one shape"):
        quantize_into(work, 0.5, 3, generator, np.empty(24, dtype=np.uint32))
