"""The site's side of a SecAgg round (Bonawitz et al. 2017, §4 and §6, Rounds 0–4): five pure
functions.

Each stage function takes the site's secret ``state`` from the previous stage and the server's
message, and returns ``(new_state, reply)`` (stage 3 also returns the masked vector). Neither
``state`` nor any message holds anything but ConfigRecord values (bytes/int/str/bool and lists
of them), so the ClientApp keeps ``state`` in ``Context.state`` as ``ConfigRecord(state)``
between messages and reads it back with ``dict(record)``; deployment runs a new process per
message, so nothing may live in module globals. The input ``state`` is never modified.

    state, reply = advertise_keys(site_config, identity)           # 1: two signed X25519 keys
    state, reply = share_keys(state, routed_keys, identity)        # 2: encrypted Shamir shares
    state, reply, masked = masked_input(state, routed_shares, y)   # 3: y + masks mod 2³²
    state, reply = confirm_survivors(state, request, identity)     # 3b: sign the survivor set U3
    state, reply = unmask(state, unmask_request, identity)         # 4: shares the server needs

``identity`` (identity.py) is the site's provisioned signing key, the CA-signed roster of the
federation and the site's own threshold floor. With it the protocol holds against a server that
deviates from it (an *active* server), not only one that follows it and looks:

- stage 1: the site signs its keys together with the round's session, its index, n and t; in
  stage 2 it accepts a neighbour's keys only under a valid signature of a roster site (no key
  substitution), from distinct sites other than itself, over the same session, n and t as its
  own (all honest sites agree on the round's parameters); it refuses a threshold below a
  majority of its neighbourhood or below its own ``secagg_min_threshold``;
- stage 3b (Bonawitz et al. §6, "ConsistencyCheck"): the site signs ONE survivor set U3 per
  session, and only one in which its input is not isolated: it is in U3, |U3| is at least the
  quorum max(t, n//2 + 1), and its neighbours in U3 are exactly peers it masked with, at least
  t − 1 of them;
- stage 4: it reveals anything only for that U3, under valid signatures of EVERY member of U3
  (at least the quorum of distinct roster sites): b-shares only of members of U3, mask-key
  shares only of non-members. Two different survivor sets would each need a majority of
  signers, so some honest site would have signed twice, which it never does; and a survivor's
  self-mask seed is revealed only once that survivor has itself checked and signed U3.

What the state holds, and why it is secret: the two X25519 private keys and the self-mask seed
b (until the masked input is sent; then they are deleted, as the input is out and only the
shares are needed), and the shares this site holds for its neighbours (each alone reveals
nothing; t of them reveal a neighbour's secret). Keep it inside the site.

Randomness (keys, b, Shamir coefficients, AEAD nonces) comes from ``entropy`` (``os.urandom``
by default). Pass a deterministic source ONLY in tests: predictable keys or seeds void the
protection.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from privacy.secagg import crypto, shamir
from privacy.secagg import messages as m
from privacy.secagg.errors import RevealRefused, SecAggAborted, SecAggProtocolError
from privacy.secagg.identity import SiteIdentity, verify

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
_OWN_SITE_ID = "own-site-id"
_MASKED_WITH = "masked-with"  # neighbours whose pairwise masks are in this site's input
_SIGNED_SET = "signed-survivor-set"  # the one U3 this site signed (never another)

_ADVERTISED, _SHARED, _MASKED, _CONFIRMED = "advertised", "shared", "masked", "confirmed"
SEED_BYTES = 32
_PLAINTEXT_BYTES = 2 * shamir.SHARE_BYTES  # b-share ‖ s_sk-share
CIPHERTEXT_BYTES = crypto.NONCE_BYTES + _PLAINTEXT_BYTES + crypto.TAG_BYTES


def _roster_key(identity: Any, site_id: str, what: str, who: str, index: int) -> Any:
    """The roster's public key of ``site_id``, or a protocol error naming ``who`` claimed it."""
    try:
        return identity.roster.public_key(site_id)
    except SecAggProtocolError as error:
        raise SecAggProtocolError(f"{what}: {who}: {error}", index) from error


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


def threshold_floor(num_neighbours: int, min_threshold: int | None = None) -> int:
    """The smallest threshold a site accepts: a majority of its neighbourhood (itself and its
    neighbours; under full SecAgg the whole sampled set), or its own floor if higher."""
    return max((num_neighbours + 1) // 2 + 1, min_threshold or 0)


def quorum(num_participants: int, threshold: int) -> int:
    """Signatures on the survivor set a site needs before revealing: max(t, n//2 + 1)."""
    return max(threshold, num_participants // 2 + 1)


def advertise_keys(site_config: Mapping[str, Any], identity: SiteIdentity,
                   entropy: crypto.Entropy = os.urandom) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage 1: draw this round's two X25519 key pairs; reply with the public keys, signed.

    ``site_config`` is this site's stage-0 message (``SecAggPlan.site_config(index)``). A
    threshold below :func:`threshold_floor` is refused (SecAggProtocolError): with fewer
    honest shares needed, a lying server could collect both secrets of one site.
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
    floor = threshold_floor(len(neighbours), identity.min_threshold)
    if threshold < floor:
        raise SecAggProtocolError(
            f"{what}: site {identity.site_id!r} refuses threshold {threshold}: its floor is "
            f"{floor} (a majority of its neighbourhood of {len(neighbours) + 1}"
            + (f", or its secagg_min_threshold {identity.min_threshold}"
               if identity.min_threshold else "") + ")", index)
    c_private, c_public = crypto.generate_key_pair(entropy)
    s_private, s_public = crypto.generate_key_pair(entropy)
    state = {
        m.SESSION: session, m.INDEX: index, m.NUM_PARTICIPANTS: num_participants,
        m.THRESHOLD: threshold, m.NEIGHBOURS: sorted(neighbours), _STAGE: _ADVERTISED,
        _C_PRIVATE_KEY: c_private, _S_PRIVATE_KEY: s_private, _OWN_SITE_ID: identity.site_id,
    }
    signature = identity.sign(m.key_statement(session, index, num_participants, threshold,
                                              identity.site_id, c_public, s_public))
    reply = {**_base(state), m.C_PUBLIC_KEY: c_public, m.S_PUBLIC_KEY: s_public,
             m.SITE_ID: identity.site_id, m.KEY_SIGNATURE: signature}
    return state, reply


def _check_identity(state: Mapping[str, Any], identity: SiteIdentity, index: int) -> None:
    if identity.site_id != state[_OWN_SITE_ID]:
        raise SecAggProtocolError(f"site {identity.site_id!r} holds the round state of site "
                                  f"{state[_OWN_SITE_ID]!r}", index)


def _check_key_signatures(state: Mapping[str, Any], identity: SiteIdentity, owners: list[int],
                          site_ids: list[str], signatures: list[bytes], c_keys: list[bytes],
                          s_keys: list[bytes], what: str) -> None:
    """Bonawitz et al. §6: a neighbour's keys count only under its roster identity's signature
    over THIS site's view of the round (session, n, t), so a server can neither substitute keys
    nor show sites different round parameters."""
    index = state[m.INDEX]
    if len(set(site_ids)) != len(site_ids):
        raise SecAggProtocolError(f"{what}: one site appears as several participants "
                                  f"({sorted(site_ids)})", index)
    for owner, site_id, signature, c_key, s_key in zip(owners, site_ids, signatures, c_keys,
                                                       s_keys):
        if site_id == identity.site_id:
            raise SecAggProtocolError(f"{what}: participant {owner} claims to be this site "
                                      f"({site_id!r})", owner)
        public_key = _roster_key(identity, site_id, what, f"participant {owner}", owner)
        statement = m.key_statement(state[m.SESSION], owner, state[m.NUM_PARTICIPANTS],
                                    state[m.THRESHOLD], site_id, c_key, s_key)
        if not verify(public_key, signature, statement):
            raise SecAggProtocolError(
                f"{what}: the keys of participant {owner} (site {site_id!r}) are not signed by "
                "that site for this session, number of participants and threshold (keys "
                "substituted, or the server told sites different round parameters)", owner)


def share_keys(state: Mapping[str, Any], routed_keys: Mapping[str, Any],
               identity: SiteIdentity,
               entropy: crypto.Entropy = os.urandom) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage 2: given the neighbours' signed public keys, draw the self-mask seed b and send
    each neighbour, encrypted for it, its Shamir shares of b and of this site's s private key.

    A key without a valid signature of a distinct roster site raises SecAggProtocolError naming
    the participant; the site then sends nothing more in this round."""
    what = f"{m.STAGE_SHARE_KEYS} input (routed public keys)"
    index = _require_stage(state, (_ADVERTISED,), what)
    _check_identity(state, identity, index)
    m.check_envelope(routed_keys, state[m.SESSION], index, what)
    owners = m.get_int_list(routed_keys, m.KEY_OWNERS, what, index)
    c_keys = m.get_bytes_list(routed_keys, m.C_PUBLIC_KEYS, what, index, len(owners))
    s_keys = m.get_bytes_list(routed_keys, m.S_PUBLIC_KEYS, what, index, len(owners))
    site_ids = m.get_str_list(routed_keys, m.KEY_SITE_IDS, what, index, len(owners))
    signatures = m.get_bytes_list(routed_keys, m.KEY_SIGNATURES, what, index, len(owners))
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
    _check_key_signatures(state, identity, owners, site_ids, signatures, c_keys, s_keys, what)
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
        m.S_PUBLIC_KEYS: s_keys, m.KEY_SITE_IDS: site_ids, _SELF_MASK_SEED: self_mask_seed,
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
    masks = [(state[_SELF_MASK_SEED], False)]
    for peer in senders:
        seed = crypto.pairwise_mask_seed(state[_S_PRIVATE_KEY], index, s_key_of[peer], peer,
                                         session)
        # The lower index adds, the higher subtracts: the pair's masks cancel in the sum.
        masks.append((seed, peer < index))
    masked = vector.copy()
    crypto.apply_masks(masked, masks)  # all of them in one pass over the vector
    new_state = {key: value for key, value in state.items()
                 if key not in (_C_PRIVATE_KEY, _S_PRIVATE_KEY, _SELF_MASK_SEED, _OWN_B_SHARE,
                                _OWN_S_SHARE)}
    new_state.update({_STAGE: _MASKED, _HELD_FROM: held_from, _HELD_B: held_b, _HELD_S: held_s,
                      _REVEALED_B: [], _REVEALED_S: [], _VECTOR_LENGTH: len(masked),
                      _MASKED_WITH: sorted(senders)})
    return new_state, _base(state), masked


def _isolation(state: Mapping[str, Any], survivor_set: list[int]) -> str | None:
    """Why this site's input would be isolated under ``survivor_set``, or None.

    Its masked input carries pairwise masks only with the peers it masked with. If a neighbour
    it did NOT mask with is called a survivor, or fewer than t − 1 of its masking peers are, the
    server could strip its masks with the mask keys of "dropped" peers plus its self-mask seed
    (the attack in docs/secure_aggregation.md): so it signs and reveals nothing.
    """
    index = state[m.INDEX]
    neighbourhood = set(state[m.NEIGHBOURS]) | {index}
    in_set = set(survivor_set) & neighbourhood
    unmasked = sorted(in_set - {index} - set(state[_MASKED_WITH]))
    if unmasked:
        return (f"participants {unmasked} are listed as survivors but this site never masked "
                "with them (their shares were not delivered to it)")
    if len(in_set) < state[m.THRESHOLD]:
        return (f"only {len(in_set)} of its neighbourhood (itself included) are survivors, "
                f"threshold {state[m.THRESHOLD]}: its input would be nearly alone in the sum")
    return None


def _check_survivor_set(state: Mapping[str, Any], survivor_set: list[int], what: str) -> None:
    index, n = state[m.INDEX], state[m.NUM_PARTICIPANTS]
    if not all(0 <= j < n for j in survivor_set):
        raise SecAggProtocolError(f"{what}: survivor set {survivor_set} has participants "
                                  f"outside [0, {n})", index)
    if index not in survivor_set:
        raise RevealRefused(f"site {index} refuses: it sent its masked input but is not in the "
                            "survivor set", index)
    needed = quorum(n, state[m.THRESHOLD])
    if len(survivor_set) < needed:
        raise RevealRefused(f"site {index} refuses: the survivor set has {len(survivor_set)} "
                            f"participants, fewer than the quorum {needed} = max(t, n//2 + 1)",
                            index)
    if (reason := _isolation(state, survivor_set)) is not None:
        raise RevealRefused(f"site {index} refuses: {reason}", index)


def confirm_survivors(state: Mapping[str, Any], request: Mapping[str, Any],
                      identity: SiteIdentity) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage 3b (Bonawitz et al. §6, ConsistencyCheck): sign the survivor set U3, once.

    The site signs only a U3 that contains it, has at least the quorum max(t, n//2 + 1)
    members, and does not isolate its input (:func:`_isolation`). It signs at most one U3 per
    session: asked again for the same set it signs it again, asked for another it refuses
    (RevealRefused). That single signature is what makes two different views of U3 impossible.
    """
    what = f"{m.STAGE_CONSISTENCY} request"
    index = _require_stage(state, (_MASKED, _CONFIRMED), what)
    _check_identity(state, identity, index)
    m.check_envelope(request, state[m.SESSION], index, what)
    survivor_set = sorted(m.get_int_list(request, m.SURVIVOR_SET, what, index))
    if _SIGNED_SET in state and state[_SIGNED_SET] != survivor_set:
        raise RevealRefused(f"site {index} refuses: it already signed the survivor set "
                            f"{state[_SIGNED_SET]} in this round, not {survivor_set}", index)
    _check_survivor_set(state, survivor_set, what)
    signature = identity.sign(m.survivor_set_statement(state[m.SESSION], index, survivor_set))
    new_state = {**state, _STAGE: _CONFIRMED, _SIGNED_SET: survivor_set}
    return new_state, {**_base(state), m.SURVIVOR_SET_SIGNATURE: signature}


def _check_signers(state: Mapping[str, Any], request: Mapping[str, Any],
                   identity: SiteIdentity, what: str) -> None:
    """Every member of the signed U3 must have signed it, under distinct roster identities."""
    index, session, survivor_set = state[m.INDEX], state[m.SESSION], state[_SIGNED_SET]
    signers = m.get_int_list(request, m.SIGNER_INDICES, what, index)
    site_ids = m.get_str_list(request, m.SIGNER_SITE_IDS, what, index, len(signers))
    signatures = m.get_bytes_list(request, m.SIGNER_SIGNATURES, what, index, len(signers))
    if sorted(signers) != survivor_set:
        missing = sorted(set(survivor_set) - set(signers))
        raise RevealRefused(f"site {index} refuses: the survivor set is signed by {sorted(signers)}"
                            f", not by every member of it (missing {missing})", index)
    if len(set(site_ids)) != len(site_ids):
        raise RevealRefused(f"site {index} refuses: one site signed the survivor set as "
                            "several participants", index)
    known = dict(zip(state[m.KEY_OWNERS], state[m.KEY_SITE_IDS]))
    known[index] = state[_OWN_SITE_ID]
    statement_for = functools.partial(m.survivor_set_statement, session)
    for signer, site_id, signature in zip(signers, site_ids, signatures):
        if signer in known and known[signer] != site_id:
            raise SecAggProtocolError(f"{what}: participant {signer} is site {known[signer]!r} "
                                      f"in this round, not {site_id!r}", signer)
        public_key = _roster_key(identity, site_id, what, f"signer {signer}", signer)
        if not verify(public_key, signature, statement_for(signer, survivor_set)):
            raise SecAggProtocolError(f"{what}: the signature of participant {signer} (site "
                                      f"{site_id!r}) on the survivor set does not verify", signer)


def unmask(state: Mapping[str, Any], request: Mapping[str, Any],
           identity: SiteIdentity) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage 4: reveal the b-shares of the listed survivors and the s-key shares of the listed
    dropped participants, for the survivor set this site signed and every member of it signed.

    Never both secrets of one participant, in this request or across requests (RevealRefused):
    with both, the server could unmask that participant's input. Survivors must be members of
    U3 and dropped participants must not be, so honest sites, who all reveal for the same U3,
    never hand out both between them either."""
    what = f"{m.STAGE_UNMASK} request"
    index = _require_stage(state, (_CONFIRMED,), what)
    _check_identity(state, identity, index)
    m.check_envelope(request, state[m.SESSION], index, what)
    survivors = m.get_int_list(request, m.SURVIVORS, what, index)
    dropped = m.get_int_list(request, m.DROPPED, what, index)
    survivor_set = sorted(m.get_int_list(request, m.SURVIVOR_SET, what, index))
    if survivor_set != state[_SIGNED_SET]:
        raise RevealRefused(f"site {index} refuses: the request is for survivor set "
                            f"{survivor_set}, it signed {state[_SIGNED_SET]}", index)
    both = sorted(set(survivors) & set(dropped))
    if both:
        raise RevealRefused(f"site {index} refuses: participants {both} are listed as both "
                            "survivors and dropped; revealing both shares would expose their "
                            "input", both[0])
    if index in dropped:
        raise RevealRefused(f"site {index} refuses: it sent its masked input, so it cannot be "
                            "treated as dropped", index)
    _check_survivor_set(state, survivor_set, what)
    _check_signers(state, request, identity, what)
    outside = sorted(set(survivors) - set(survivor_set))
    inside = sorted(set(dropped) & set(survivor_set))
    if outside or inside:
        raise RevealRefused(f"site {index} refuses: the request contradicts the signed survivor "
                            f"set {survivor_set} (survivors outside it: {outside}; dropped inside "
                            f"it: {inside})", (outside or inside)[0])
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
