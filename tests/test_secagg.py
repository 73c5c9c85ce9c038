"""Secure aggregation (privacy/secagg): the server learns the exact sum of the survivors' inputs
and nothing it could use to unmask one site's input."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.app import ConfigRecord
from flwr.common import serde
from scipy import stats

from privacy.secagg import (
    RevealRefused,
    SecAggAborted,
    SecAggProtocolError,
    SecAggServer,
    ShareDecryptionError,
    advertise_keys,
    confirm_survivors,
    crypto,
    dequantize,
    masked_input,
    neighbour_graph,
    quantization_error_bound,
    quantization_scale,
    quantize,
    setup,
    shamir,
    share_keys,
    unmask,
)
from privacy.secagg import messages as m
from privacy.secagg.crypto import apply_mask, expand_mask
from privacy.secagg.graph import is_connected, suggested_degree
from privacy.secagg.identity import test_identities
from privacy.secagg.loopback import run_round
from privacy.secagg.quantize import levels_per_site

SESSION = b"test-session-0001"


class SeededEntropy:
    """A reproducible byte source (ChaCha20 keystream of a hashed label): tests only."""

    def __init__(self, *label: object) -> None:
        key = hashlib.sha256(repr(label).encode()).digest()
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def __call__(self, num_bytes: int) -> bytes:
        return self._stream.update(bytes(num_bytes))


def entropy_for(seed: int):
    return lambda index: SeededEntropy(seed, index)


def through_config_record(message: dict) -> dict:
    """What a ConfigRecord in a Flower message or in Context.state gives back (protobuf)."""
    m.check_record_values(message, "message")
    proto = serde.config_record_to_proto(ConfigRecord(message))
    return dict(serde.config_record_from_proto(proto))


def inputs(n: int, length: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.integers(0, 2**32, length, dtype=np.uint32) for i in range(n)}


def ring_sum(vectors: dict[int, np.ndarray], members) -> np.ndarray:
    total = np.zeros_like(next(iter(vectors.values())))
    for i in members:
        total += vectors[i]  # uint32 arithmetic wraps mod 2**32
    return total


# -- Shamir ---------------------------------------------------------------------------------

def test_shamir_any_threshold_subset_gives_the_secret_back():
    secret = SeededEntropy("secret")(32)
    shares = shamir.split(secret, 3, range(6), SeededEntropy("coefficients"))
    for size in (3, 4, 6):
        for subset in itertools.combinations(range(6), size):
            assert shamir.combine({j: shares[j] for j in subset}, 3, 32) == secret


def test_shamir_fewer_than_threshold_shares_do_not_give_the_secret():
    secret = SeededEntropy("secret")(32)
    shares = shamir.split(secret, 4, range(6), SeededEntropy("coefficients"))
    for subset in itertools.combinations(range(6), 3):
        partial = {j: shares[j] for j in subset}
        with pytest.raises(shamir.ShamirError, match="3 shares, 4 needed"):
            shamir.combine(partial, 4, 32)
        assert shamir.interpolate_at_zero(partial) != int.from_bytes(secret, "big")


def test_shamir_field_is_prime_and_holds_any_32_byte_secret():
    p = shamir.PRIME
    assert all(pow(base, p - 1, p) == 1 for base in (2, 3, 5, 7, 11, 13))
    assert p > 2**256
    secret = b"\xff" * 32
    shares = shamir.split(secret, 2, [0, 1, 2])
    assert shamir.combine({0: shares[0], 2: shares[2]}, 2, 32) == secret
    with pytest.raises(shamir.ShamirError, match="threshold"):
        shamir.split(secret, 1, [0, 1, 2])  # t = 1 would hand out the secret itself


# -- the protocol ---------------------------------------------------------------------------

def test_masks_cancel_in_the_sum_without_dropouts():
    vectors = inputs(5, 64)
    vectors[0][:] = 2**32 - 1  # the sum wraps around the ring
    plan = setup(5, seed=1, session=SESSION)
    result = run_round(plan, vectors, entropy=entropy_for(1), wire=through_config_record)
    assert result.survivors == set(range(5)) and result.dropped == set()
    np.testing.assert_array_equal(result.total, ring_sum(vectors, range(5)))


@pytest.mark.parametrize(("n", "dropped"), [(5, {3}), (7, {0, 5})])
def test_sites_dropping_after_share_keys_are_recovered(n, dropped):
    vectors = inputs(n, 32, seed=n)
    plan = setup(n, session=SESSION)
    assert plan.threshold == n // 2 + 1
    result = run_round(plan, vectors, dropouts={m.STAGE_MASKED_INPUT: dropped},
                       entropy=entropy_for(n), wire=through_config_record)
    survivors = set(range(n)) - dropped
    assert result.survivors == survivors and result.dropped == dropped
    np.testing.assert_array_equal(result.total, ring_sum(vectors, survivors))


def test_sites_dropping_before_share_keys_are_left_out():
    vectors = inputs(6, 16, seed=3)
    result = run_round(setup(6, session=SESSION), vectors,
                       dropouts={m.STAGE_SHARE_KEYS: {1}, m.STAGE_MASKED_INPUT: {4}},
                       entropy=entropy_for(3))
    np.testing.assert_array_equal(result.total, ring_sum(vectors, {0, 2, 3, 5}))


def test_a_survivor_silent_at_unmask_still_counts_in_the_sum():
    vectors = inputs(6, 16, seed=8)  # t = 4: four of the five survivors answer the unmask
    result = run_round(setup(6, session=SESSION), vectors,
                       dropouts={m.STAGE_MASKED_INPUT: {5}, m.STAGE_UNMASK: {1}},
                       entropy=entropy_for(8))
    assert result.survivors == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(result.total, ring_sum(vectors, range(5)))


def test_too_many_dropouts_abort_before_any_share_is_revealed():
    plan = setup(5, session=SESSION)  # t = 3
    with pytest.raises(SecAggAborted, match="masked-input.*2 share holders left, threshold 3") as e:
        run_round(plan, inputs(5, 8), dropouts={m.STAGE_MASKED_INPUT: {0, 1, 2}},
                  entropy=entropy_for(4))
    assert (e.value.stage, e.value.required, e.value.available) == (m.STAGE_MASKED_INPUT, 3, 2)


def test_survivors_silent_at_unmask_abort_the_round():
    with pytest.raises(SecAggAborted, match="unmask.*threshold 3") as e:
        run_round(setup(5, session=SESSION), inputs(5, 8),
                  dropouts={m.STAGE_MASKED_INPUT: {4}, m.STAGE_UNMASK: {0, 1}},
                  entropy=entropy_for(5))
    assert e.value.stage == m.STAGE_UNMASK


class Round:
    """A round driven stage by stage, so a test can meddle between stages."""

    def __init__(self, n: int, seed: int = 0, session: bytes = SESSION, **plan_args) -> None:
        self.plan = setup(n, session=session, seed=seed, **plan_args)
        self.server = SecAggServer(self.plan)
        self.entropy = {i: SeededEntropy(seed, session, i) for i in range(n)}
        made = test_identities(f"site-{i}" for i in range(n))
        self.identities = {i: made[f"site-{i}"] for i in range(n)}
        self.states: dict = {}
        self.vectors = inputs(n, 16, seed)

    def keys(self):
        replies = {}
        for i, config in self.server.site_configs().items():
            self.states[i], replies[i] = advertise_keys(config, self.identities[i],
                                                        self.entropy[i])
        return replies

    def shares(self):
        routed = self.server.route_public_keys(self.keys())
        replies = {}
        for i, message in routed.items():
            self.states[i], replies[i] = share_keys(self.states[i], message,
                                                    self.identities[i], self.entropy[i])
        return replies

    def confirm(self, checks):
        replies = {}
        for i, message in checks.items():
            self.states[i], replies[i] = confirm_survivors(self.states[i], message,
                                                           self.identities[i])
        return replies

    def reveal(self, requests):
        replies = {}
        for i, request in requests.items():
            self.states[i], replies[i] = unmask(self.states[i], request, self.identities[i])
        return replies

    def masked(self, routed):
        headers, vectors = {}, {}
        for i, message in routed.items():
            self.states[i], headers[i], vectors[i] = masked_input(self.states[i], message,
                                                                 self.vectors[i])
        return headers, vectors


def test_tampered_share_ciphertext_is_rejected_naming_its_sender():
    game = Round(4)
    routed = game.server.route_shares(game.shares())
    message = dict(routed[2])
    k = message[m.SENDERS].index(1)
    tampered = bytearray(message[m.CIPHERTEXTS][k])
    tampered[20] ^= 1
    message[m.CIPHERTEXTS] = list(message[m.CIPHERTEXTS])
    message[m.CIPHERTEXTS][k] = bytes(tampered)
    with pytest.raises(ShareDecryptionError, match="from participant 1 to 2") as error:
        masked_input(game.states[2], message, game.vectors[2])
    assert error.value.participant == 1
    # a ciphertext meant for site 3, handed to site 2 as if from the same sender
    swapped = dict(routed[2])
    swapped[m.CIPHERTEXTS] = list(swapped[m.CIPHERTEXTS])
    swapped[m.CIPHERTEXTS][k] = routed[3][m.CIPHERTEXTS][routed[3][m.SENDERS].index(1)]
    with pytest.raises(ShareDecryptionError, match="from participant 1 to 2"):
        masked_input(game.states[2], swapped, game.vectors[2])
    # site 2 sends nothing; to the server it dropped, and the others' sum comes out exactly
    headers, vectors = game.masked({i: routed[i] for i in (0, 1, 3)})
    checks = game.server.request_consistency(headers, vectors, 16)
    requests = game.server.request_unmask(game.confirm(checks))
    np.testing.assert_array_equal(game.server.unmask(game.reveal(requests)),
                                  ring_sum(game.vectors, {0, 1, 3}))


def test_share_ciphertext_from_a_previous_round_is_rejected():
    old, new = Round(4, session=b"round-1"), Round(4, session=b"round-2")
    old_routed = old.server.route_shares(old.shares())
    new_routed = new.server.route_shares(new.shares())
    replay = dict(new_routed[0])
    replay[m.CIPHERTEXTS] = list(old_routed[0][m.CIPHERTEXTS])
    with pytest.raises(ShareDecryptionError):
        masked_input(new.states[0], replay, new.vectors[0])
    with pytest.raises(SecAggProtocolError, match="session id"):  # the whole old message
        masked_input(new.states[0], old_routed[0], new.vectors[0])


def test_server_rejects_replayed_unknown_and_wrong_length_messages():
    game = Round(5)
    keys = game.keys()
    stale = {**keys[1], m.SESSION: b"previous-round"}
    with pytest.raises(SecAggProtocolError, match="session id") as error:
        SecAggServer(game.plan).route_public_keys({**keys, 1: stale})
    assert error.value.participant == 1
    with pytest.raises(SecAggProtocolError, match="participant 9"):
        SecAggServer(game.plan).route_public_keys({**keys, 9: keys[0]})
    # With drop_invalid the bad reply counts as a dropout and the round goes on, exactly.
    routed = game.server.route_shares(game.shares())
    headers, vectors = game.masked(routed)
    vectors[3] = vectors[3][:-1]
    with pytest.raises(SecAggProtocolError, match=r"participant 3 must be uint32 of shape \(16,\)"):
        game.server.request_consistency(headers, vectors, 16)
    # the failed call used nothing; the same stage can be retried, leaving the bad site out
    checks = game.server.request_consistency(headers, vectors, 16, drop_invalid=True)
    assert set(game.server.rejected) == {3} and game.server.dropped == {3}
    requests = game.server.request_unmask(game.confirm(checks))
    np.testing.assert_array_equal(game.server.unmask(game.reveal(requests)),
                                  ring_sum(game.vectors, {0, 1, 2, 4}))


def test_a_site_never_reveals_both_shares_of_one_participant():
    game = Round(5)
    routed = game.server.route_shares(game.shares())
    headers, vectors = game.masked(routed)
    checks = game.server.request_consistency(headers, vectors, 16)
    requests = game.server.request_unmask(game.confirm(checks))
    request = requests[0]  # signed by all five for U3 = {0..4}
    with pytest.raises(RevealRefused, match="both survivors and dropped"):
        unmask(game.states[0], {**request, m.DROPPED: [2]}, game.identities[0])
    with pytest.raises(RevealRefused, match="cannot be treated as dropped"):
        unmask(game.states[0], {**request, m.SURVIVORS: [1, 2, 3], m.DROPPED: [0]},
               game.identities[0])
    with pytest.raises(RevealRefused, match="contradicts the signed survivor set"):
        unmask(game.states[0], {**request, m.SURVIVORS: [0, 1, 3], m.DROPPED: [2]},
               game.identities[0])
    state, reply = unmask(game.states[0], request, game.identities[0])
    assert reply[m.B_OWNERS] == [0, 1, 2, 3, 4] and reply[m.S_OWNERS] == []


def test_masked_upload_is_uniform_on_the_ring_and_uncorrelated_with_the_input():
    length = 1 << 14
    update = np.linspace(-1, 1, length, dtype=np.float32)  # a smooth, very non-uniform input
    vectors = {i: quantize(update, 1.0, 5, rng=i) for i in range(5)}
    game = Round(5, seed=7)
    game.vectors = vectors
    _, masked = game.masked(game.server.route_shares(game.shares()))
    upload = masked[2]
    assert not np.array_equal(upload, vectors[2])
    for byte in range(4):  # every byte of the uint32s: uniform on 256 values
        counts = np.bincount((upload >> np.uint32(8 * byte)) & np.uint32(0xFF), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-3
    assert stats.kstest(upload / 2**32, "uniform").pvalue > 1e-3
    correlation = np.corrcoef(upload.astype(np.float64), vectors[2].astype(np.float64))[0, 1]
    assert abs(correlation) < 4 / np.sqrt(length)  # 4 sigma under independence


def test_mask_expansion_is_the_chacha20_keystream():
    seed = bytes(range(32))
    mask = expand_mask(seed, 1000)
    assert mask.dtype == np.uint32 and mask.shape == (1000,)
    assert np.array_equal(mask, expand_mask(seed, 1000))
    assert np.array_equal(mask[:10], expand_mask(seed, 10))
    assert not np.array_equal(mask, expand_mask(bytes(32), 1000))
    chunk = crypto.MASK_CHUNK_WORDS  # streamed chunk by chunk
    for length in (0, 1, chunk, chunk + 1, 2 * chunk + 7):
        base = np.arange(length, dtype=np.uint32)
        masked = base.copy()
        apply_mask(masked, seed)
        np.testing.assert_array_equal(masked, base + expand_mask(seed, length))
        apply_mask(masked, seed, subtract=True)
        np.testing.assert_array_equal(masked, base)


def test_site_state_and_messages_survive_config_records_between_stages():
    game = Round(4)
    routed = game.server.route_shares(game.shares())
    for state in game.states.values():
        assert through_config_record(state) == state
    state = through_config_record(game.states[1])
    _, header, vector = masked_input(state, through_config_record(routed[1]), game.vectors[1])
    _, _, direct = masked_input(game.states[1], routed[1], game.vectors[1])
    np.testing.assert_array_equal(vector, direct)
    assert through_config_record(header) == header


def test_setup_validates_sizes_and_threshold():
    with pytest.raises(ValueError, match="at least 2 participants"):
        setup(1)
    with pytest.raises(ValueError, match=r"threshold must be an integer in \[2, 5\]"):
        setup(5, threshold=1)
    with pytest.raises(ValueError, match=r"\[2, 5\]"):
        setup(5, threshold=6)
    with pytest.raises(ValueError, match=r"\[2, 5\]"):  # degree 4 → neighbourhoods of 5
        setup(8, neighbours=4, threshold=6)
    plan = setup(8, neighbours=4, seed=3, session=SESSION)
    assert plan.threshold == 3
    assert type(plan).from_record(through_config_record(plan.to_record())) == plan


# -- SecAgg+ graph ----------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "k"), [(8, 2), (8, 3), (7, 4), (9, 3), (8, 7), (6, None)])
def test_neighbour_graph_is_symmetric_regular_connected_and_reproducible(n, k):
    graph = neighbour_graph(n, k, seed=11)
    expected = n - 1 if k is None or k >= n - 1 else k + (k % 2 == 1 and n % 2 == 1)
    for i, row in enumerate(graph):
        assert i not in row and len(row) == min(expected, n - 1)
        assert all(i in graph[j] for j in row)
    assert is_connected(set(range(n)), graph)
    assert graph == neighbour_graph(n, k, seed=11)
    if k is not None and k < n - 3:
        assert any(graph != neighbour_graph(n, k, seed=s) for s in range(5))


def test_suggested_degree_is_logarithmic_and_full_for_small_federations():
    assert suggested_degree(5) == 4
    assert suggested_degree(1000) == 30
    assert suggested_degree(100) < 25


def test_secagg_plus_recovers_dropouts():
    vectors = inputs(8, 32, seed=9)
    plan = setup(8, neighbours=4, seed=2, session=SESSION)
    assert all(len(row) == 4 for row in plan.neighbours)
    dropped = {plan.neighbours[0][0], 5} - {0}
    result = run_round(plan, vectors, dropouts={m.STAGE_MASKED_INPUT: dropped},
                       entropy=entropy_for(9), wire=through_config_record)
    np.testing.assert_array_equal(result.total, ring_sum(vectors, set(range(8)) - dropped))


def test_secagg_plus_aborts_when_dropouts_split_the_survivors():
    plan = setup(8, neighbours=2, seed=4, session=SESSION)  # a ring, t = 2
    ring = [0, plan.neighbours[0][0]]
    while len(ring) < 8:
        ring.append(next(j for j in plan.neighbours[ring[-1]] if j != ring[-2]))
    with pytest.raises(SecAggAborted, match="disconnected"):
        run_round(plan, inputs(8, 8), dropouts={m.STAGE_MASKED_INPUT: {ring[0], ring[4]}},
                  entropy=entropy_for(10))


# -- quantization -----------------------------------------------------------------------------

@pytest.mark.parametrize(("num_sites", "num_summed", "clip"), [(8, 8, 1.0), (8, 5, 0.05),
                                                               (3, 3, 100.0)])
def test_dequantized_sum_is_within_the_error_bound(num_sites, num_summed, clip):
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, clip, 4096).astype(np.float32) for _ in range(num_summed)]
    updates[0][:3] = [np.inf, -np.inf, 10 * clip]  # clipped, not wrapped
    encoded = [quantize(u, clip, num_sites, rng=i) for i, u in enumerate(updates)]
    assert all(e.dtype == np.uint32 and e.nbytes == u.nbytes for e, u in zip(encoded, updates))
    total = ring_sum(dict(enumerate(encoded)), range(num_summed))
    exact = sum(np.clip(u.astype(np.float64), -clip, clip) for u in updates)
    error = np.abs(dequantize(total, clip, num_sites, num_summed) - exact)
    bound = quantization_error_bound(clip, num_sites, num_summed)
    assert error.max() <= bound
    assert error.max() > bound / 100  # the bound is not vacuous
    assert bound < 1e-6 * clip * num_sites


def test_quantization_never_wraps_and_is_deterministic():
    top = levels_per_site(7)
    at_clip = [quantize(np.full(4, 2.0), 2.0, 7, rng=i) for i in range(7)]
    assert all((e == top).all() for e in at_clip) and 7 * top <= 2**32 - 1
    total = ring_sum(dict(enumerate(at_clip)), range(7))
    np.testing.assert_allclose(dequantize(total, 2.0, 7), 14.0, atol=1e-6)
    x = np.random.default_rng(1).uniform(-1, 1, 100).astype(np.float32)
    assert np.array_equal(quantize(x, 1.0, 7, rng=5), quantize(x, 1.0, 7, rng=5))
    assert quantization_scale(1.0, 7) == top / 2.0
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([np.nan], dtype=np.float32), 1.0, 7, rng=0)


def test_secagg_of_quantized_updates_matches_the_plaintext_sum():
    rng = np.random.default_rng(2)
    updates = {i: rng.normal(0, 0.3, 256).astype(np.float32) for i in range(6)}
    vectors = {i: quantize(u, 1.0, 6, rng=10 + i) for i, u in updates.items()}
    result = run_round(setup(6, session=SESSION), vectors,
                       dropouts={m.STAGE_MASKED_INPUT: {2}}, entropy=entropy_for(12))
    survivors = result.survivors
    plaintext = sum(np.clip(updates[i].astype(np.float64), -1, 1) for i in survivors)
    aggregate = dequantize(result.total, 1.0, 6, len(survivors))
    assert np.abs(aggregate - plaintext).max() <= quantization_error_bound(1.0, 6, 5)


def test_a_site_forgets_its_private_keys_and_self_mask_seed_once_its_masked_input_is_out():
    game = Round(4)
    routed = game.server.route_shares(game.shares())
    before = game.states[1]
    secrets = [value for key, value in before.items()
               if key in ("c-private-key", "s-private-key", "self-mask-seed")]
    assert len(secrets) == 3 and all(isinstance(v, bytes) and len(v) >= 32 for v in secrets)
    after, _, _ = masked_input(before, routed[1], game.vectors[1])
    after, _ = confirm_survivors(after, {m.SESSION: SESSION, m.INDEX: 1,
                                         m.SURVIVOR_SET: [0, 1, 2, 3]}, game.identities[1])
    kept = [v for value in after.values() for v in (value if isinstance(value, list) else [value])]
    assert not any(secret in kept for secret in secrets)
