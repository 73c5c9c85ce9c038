"""The site's side of a SecAgg round (Bonawitz et al. 2017, §4, Rounds 0–4): four pure functions.

Each stage function takes the site's secret ``state`` from the previous stage and the server's
message, and returns ``(new_state, reply)`` (stage 3 also returns the masked vector). Neither
``state`` nor any message holds anything but ConfigRecord values (bytes/int/str/bool and lists
of them), so the ClientApp keeps ``state`` in ``Context.state`` as ``ConfigRecord(state)``
between messages and reads it back with ``dict(record)``; deployment runs a new process per
message, so nothing may live in module globals. The input ``state`` is never modified.

    state, reply = advertise_keys(site_config)                     # 1: two X25519 public keys
    state, reply = share_keys(state, routed_keys)                  # 2: encrypted Shamir shares
    state, reply, masked = masked_input(state, routed_shares, y)   # 3: y + masks mod 2³²
    state, reply = unmask(state, unmask_request)                   # 4: shares the server needs

What the state holds, and why it is secret: the two X25519 private keys and the self-mask seed
b (until the masked input is sent; then they are deleted, as the input is out and only the
shares are needed), and the shares this site holds for its neighbours (each alone reveals
nothing; t of them reveal a neighbour's secret). Keep it inside the site.

Randomness (keys, b, Shamir coefficients, AEAD nonces) comes from ``entropy`` (``os.urandom``
by default). Pass a deterministic source ONLY in tests: predictable keys or seeds void the
protection.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from privacy.secagg import crypto, shamir
from privacy.secagg import messages as m
from privacy.secagg.errors import RevealRefused, SecAggAborted, SecAggProtocolError

# Keys of the site's state (ConfigRecord values only; see the module docstring).
_STAGE = "stage"
_C_PRIVATE_KEY = "c-private-key"
_S_PRIVATE_KEY = "s-private-key"
_SELF_MASK_SEED = "self-mask-seed"
_OWN_B_SHARE = "own-b-share"
_OWN_S_SHARE = "own-s-share"
_HELD_FROM = "held-shares-from"  # participants whose shares this site holds (incl. itself)
_HELD_B = "held-b-shares"
_HELD_S = "held-s-shares"
_REVEALED_B = "revealed-b"
_REVEALED_S = "revealed-s"
_VECTOR_LENGTH = "vector-length"

_ADVERTISED, _SHARED, _MASKED = "advertised", "shared", "masked"
SEED_BYTES = 32
_PLAINTEXT_BYTES = 2 * shamir.SHARE_BYTES  # b-share ‖ s_sk-share
CIPHERTEXT_BYTES = crypto.NONCE_BYTES + _PLAINTEXT_BYTES + crypto.TAG_BYTES


def _require_stage(state: Mapping[str, Any], allowed: tuple[str, ...], what: str) -> int:
    index = state.get(m.INDEX)
    stage = state.get(_STAGE)
    if stage not in allowed:
        raise SecAggProtocolError(
            f"{what}: site {index} is at stage {stage!r}, expected {' or '.join(allowed)} "
            "(a message out of order, or state from another round)", index)
    return index


def _base(state: Mapping[str, Any]) -> dict[str, Any]:
    return {m.SESSION: state[m.SESSION], m.INDEX: state[m.INDEX]}


def advertise_keys(site_config: Mapping[str, Any],
                   entropy: crypto.Entropy = os.urandom) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage 1: draw this round's two X25519 key pairs; reply with the public keys.

    ``site_config`` is this site's stage-0 message (``SecAggPlan.site_config(index)``).
    """
    what = f"{m.STAGE_SETUP} message"
    if not isinstance(site_config, Mapping):
        raise SecAggProtocolError(f"{what}: expected a dict, got {type(site_config).__name__}")
    index = m.get_int(site_config, m.INDEX, what, None)
    session = m.get_bytes(site_config, m.SESSION, what, index)
    num_participants = m.get_int(site_config, m.NUM_PARTICIPANTS, what, index)
    threshold = m.get_int(site_config, m.THRESHOLD, what, index)
    neighbours = m.get_int_list(site_config, m.NEIGHBOURS, what, index)
    if not session:
        raise SecAggProtocolError(f"{what}: the session id is empty", index)
    if not 0 <= index < num_participants:
        raise SecAggProtocolError(f"{what}: index {index} not in [0, {num_participants})", index)
    if index in neighbours or not all(0 <= j < num_participants for j in neighbours):
        raise SecAggProtocolError(f"{what}: neighbours must be other participants in "
                                  f"[0, {num_participants}), got {neighbours}", index)
    if not 2 <= threshold <= len(neighbours) + 1:
        raise SecAggProtocolError(f"{what}: threshold {threshold} not in [2, "
                                  f"{len(neighbours) + 1}] (this site and its neighbours)", index)
    c_private, c_public = crypto.generate_key_pair(entropy)
    s_private, s_public = crypto.generate_key_pair(entropy)
    state = {
        m.SESSION: session, m.INDEX: index, m.NUM_PARTICIPANTS: num_participants,
        m.THRESHOLD: threshold, m.NEIGHBOURS: sorted(neighbours), _STAGE: _ADVERTISED,
        _C_PRIVATE_KEY: c_private, _S_PRIVATE_KEY: s_private,
    }
    reply = {**_base(state), m.C_PUBLIC_KEY: c_public, m.S_PUBLIC_KEY: s_public}
    return state, reply


def share_keys(state: Mapping[str, Any], routed_keys: Mapping[str, Any],
               entropy: crypto.Entropy = os.urandom) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage 2: given the neighbours' public keys, draw the self-mask seed b and send each
    neighbour, encrypted for it, its Shamir shares of b and of this site's s private key."""
    what = f"{m.STAGE_SHARE_KEYS} input (routed public keys)"
    index = _require_stage(state, (_ADVERTISED,), what)
    m.check_envelope(routed_keys, state[m.SESSION], index, what)
    owners = m.get_int_list(routed_keys, m.KEY_OWNERS, what, index)
    c_keys = m.get_bytes_list(routed_keys, m.C_PUBLIC_KEYS, what, index, len(owners))
    s_keys = m.get_bytes_list(routed_keys, m.S_PUBLIC_KEYS, what, index, len(owners))
    strangers = sorted(set(owners) - set(state[m.NEIGHBOURS]))
    if strangers:
        raise SecAggProtocolError(f"{what}: keys of participants {strangers}, who are not "
                                  f"neighbours of site {index}", index)
    own_keys = {crypto.public_key_of(state[_C_PRIVATE_KEY]),
                crypto.public_key_of(state[_S_PRIVATE_KEY])}
    for owner, c_key, s_key in zip(owners, c_keys, s_keys):
        crypto.check_public_key(c_key, owner, "c public key")
        crypto.check_public_key(s_key, owner, "s public key")
    all_keys = c_keys + s_keys
    # Bonawitz et al. §4 Round 1: keys must be distinct, or a server could, e.g., hand a site
    # its own key back as a neighbour's and make that "pairwise" mask known to itself.
    if len(set(all_keys)) != len(all_keys) or own_keys & set(all_keys):
        raise SecAggProtocolError(f"{what}: public keys are not all distinct", index)
    holders = sorted(owners + [index])
    threshold = state[m.THRESHOLD]
    if len(holders) < threshold:
        raise SecAggAborted(m.STAGE_SHARE_KEYS, f"site {index} has {len(holders)} key holders "
                            f"(itself + neighbours that advertised keys), threshold {threshold}",
                            required=threshold, available=len(holders))
    self_mask_seed = entropy(SEED_BYTES)
    b_shares = shamir.split(self_mask_seed, threshold, holders, entropy)
    s_shares = shamir.split(state[_S_PRIVATE_KEY], threshold, holders, entropy)
    ciphertexts = [
        crypto.encrypt_shares(b_shares[owner] + s_shares[owner], state[_C_PRIVATE_KEY], index,
                              c_key, owner, state[m.SESSION], entropy)
        for owner, c_key in zip(owners, c_keys)
    ]
    new_state = {
        **state, _STAGE: _SHARED, m.KEY_OWNERS: owners, m.C_PUBLIC_KEYS: c_keys,
        m.S_PUBLIC_KEYS: s_keys, _SELF_MASK_SEED: self_mask_seed,
        _OWN_B_SHARE: b_shares[index], _OWN_S_SHARE: s_shares[index],
    }
    reply = {**_base(state), m.RECEIVERS: owners, m.CIPHERTEXTS: ciphertexts}
    return new_state, reply


def masked_input(state: Mapping[str, Any], routed_shares: Mapping[str, Any],
                 vector: np.ndarray) -> tuple[dict[str, Any], dict[str, Any], np.ndarray]:
    """Stage 3: check and keep the shares addressed to this site, then mask ``vector``.

    ``vector`` is the site's quantized update (1-D uint32, see quantize.py). Returns the masked
    vector y + PRG(b) + Σ_{j>i} PRG(s_ij) − Σ_{j<i} PRG(s_ij) mod 2³², j over the neighbours
    that sent shares (they will include this site's mask likewise, so pairwise masks cancel in
    the sum). A share ciphertext that fails authentication raises ShareDecryptionError naming
    its sender; the site then sends nothing (to the server it is a dropout, recovered).
    """
    what = f"{m.STAGE_MASKED_INPUT} input (routed shares)"
    index = _require_stage(state, (_SHARED,), what)
    session = state[m.SESSION]
    m.check_envelope(routed_shares, session, index, what)
    senders = m.get_int_list(routed_shares, m.SENDERS, what, index)
    ciphertexts = m.get_bytes_list(routed_shares, m.CIPHERTEXTS, what, index, len(senders))
    vector = np.asarray(vector)
    if vector.dtype != np.uint32 or vector.ndim != 1:
        raise ValueError(f"site {index}: the vector to mask must be 1-D uint32 (quantized), got "
                         f"{vector.dtype} with shape {vector.shape}")
    key_owners = state[m.KEY_OWNERS]
    unknown = sorted(set(senders) - set(key_owners))
    if unknown:
        raise SecAggProtocolError(f"{what}: shares from participants {unknown}, whose keys site "
                                  f"{index} never received", index)
    threshold = state[m.THRESHOLD]
    if len(senders) + 1 < threshold:
        raise SecAggAborted(m.STAGE_MASKED_INPUT, f"site {index} received shares from "
                            f"{len(senders)} neighbours, needs {threshold - 1} (threshold "
                            f"{threshold} with itself)", required=threshold,
                            available=len(senders) + 1)
    held_from, held_b, held_s = [index], [state[_OWN_B_SHARE]], [state[_OWN_S_SHARE]]
    s_key_of = dict(zip(key_owners, state[m.S_PUBLIC_KEYS]))
    c_key_of = dict(zip(key_owners, state[m.C_PUBLIC_KEYS]))
    for sender, ciphertext in zip(senders, ciphertexts):
        plaintext = crypto.decrypt_shares(ciphertext, state[_C_PRIVATE_KEY], index,
                                          c_key_of[sender], sender, session)
        if len(plaintext) != _PLAINTEXT_BYTES:
            raise SecAggProtocolError(f"{what}: shares from participant {sender} have "
                                      f"{len(plaintext)} bytes, expected {_PLAINTEXT_BYTES}",
                                      sender)
        held_from.append(sender)
        held_b.append(plaintext[:shamir.SHARE_BYTES])
        held_s.append(plaintext[shamir.SHARE_BYTES:])
    masked = vector.copy()
    crypto.apply_mask(masked, state[_SELF_MASK_SEED])
    for peer in senders:
        seed = crypto.pairwise_mask_seed(state[_S_PRIVATE_KEY], index, s_key_of[peer], peer,
                                         session)
        # The lower index adds, the higher subtracts: the pair's masks cancel in the sum.
        crypto.apply_mask(masked, seed, subtract=peer < index)
    new_state = {key: value for key, value in state.items()
                 if key not in (_C_PRIVATE_KEY, _S_PRIVATE_KEY, _SELF_MASK_SEED, _OWN_B_SHARE,
                                _OWN_S_SHARE)}
    new_state.update({_STAGE: _MASKED, _HELD_FROM: held_from, _HELD_B: held_b, _HELD_S: held_s,
                      _REVEALED_B: [], _REVEALED_S: [], _VECTOR_LENGTH: len(masked)})
    return new_state, _base(state), masked


def unmask(state: Mapping[str, Any],
           request: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage 4: reveal the b-shares of the listed survivors and the s-key shares of the listed
    dropped participants. Never both for the same participant, in this request or across
    requests (RevealRefused): with both, the server could unmask that participant's input."""
    what = f"{m.STAGE_UNMASK} request"
    index = _require_stage(state, (_MASKED,), what)
    m.check_envelope(request, state[m.SESSION], index, what)
    survivors = m.get_int_list(request, m.SURVIVORS, what, index)
    dropped = m.get_int_list(request, m.DROPPED, what, index)
    both = sorted(set(survivors) & set(dropped))
    if both:
        raise RevealRefused(f"site {index} refuses: participants {both} are listed as both "
                            "survivors and dropped; revealing both shares would expose their "
                            "input", both[0])
    if index in dropped:
        raise RevealRefused(f"site {index} refuses: it sent its masked input, so it cannot be "
                            "treated as dropped", index)
    earlier_b, earlier_s = set(state[_REVEALED_B]), set(state[_REVEALED_S])
    conflicting = sorted((set(survivors) & earlier_s) | (set(dropped) & earlier_b))
    if conflicting:
        raise RevealRefused(f"site {index} refuses: for participants {conflicting} it already "
                            "revealed the other secret's share in this round", conflicting[0])
    if index not in survivors:
        raise SecAggProtocolError(f"{what}: site {index} sent its masked input but is not "
                                  "listed among the survivors", index)
    position = {owner: k for k, owner in enumerate(state[_HELD_FROM])}
    unknown = sorted(set(survivors + dropped) - set(position))
    if unknown:
        raise SecAggProtocolError(f"{what}: site {index} holds no shares of participants "
                                  f"{unknown}", index)
    threshold = state[m.THRESHOLD]
    if len(survivors) < threshold:
        raise SecAggAborted(m.STAGE_UNMASK, f"site {index} is told of {len(survivors)} "
                            f"survivors among its neighbourhood, threshold {threshold}",
                            required=threshold, available=len(survivors))
    new_state = {**state, _REVEALED_B: sorted(earlier_b | set(survivors)),
                 _REVEALED_S: sorted(earlier_s | set(dropped))}
    reply = {
        **_base(state),
        m.B_OWNERS: survivors, m.B_SHARES: [state[_HELD_B][position[j]] for j in survivors],
        m.S_OWNERS: dropped, m.S_SHARES: [state[_HELD_S][position[j]] for j in dropped],
    }
    return new_state, reply
