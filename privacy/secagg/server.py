"""The server's side of a SecAgg round: plan it, route what sites send, unmask only the sum.

    plan = setup(num_participants=5, threshold=None, neighbours=None, seed=round_seed)
    server = SecAggServer(plan)
    configs = server.site_configs()                          # 0: index → site config
    routed_keys = server.route_public_keys(key_replies)      # 1 → 2: index → neighbours' keys
    routed_shares = server.route_shares(share_replies)       # 2 → 3: index → ciphertexts for it
    checks = server.request_consistency(headers, masked, L)  # 3 → 3b: index → survivor set U3
    requests = server.request_unmask(confirmations)          # 3b → 4: index → what to reveal
    total = server.unmask(unmask_replies)                    # Σ_{survivors} y_i mod 2³² (uint32)

Every ``replies`` argument maps a participant index to the message that site sent (the driver
maps Flower node ids to indices and leaves out sites that did not answer in time: those are
the dropouts). Every returned mapping is index → message to send to that site. Messages are
dicts of ConfigRecord values (messages.py); masked vectors are 1-D uint32 arrays.

The server sees public keys, ciphertexts it cannot read, masked vectors, and in stage 4, for
each survivor its self-mask seed b_i and for each dropped participant its mask key: exactly what
removes the masks from the survivors' sum (Bonawitz et al. 2017, §4). Before asking for any
share it checks that every secret it will need has ≥ t holders left and that the survivors'
neighbour graph is connected (else a component's partial sum would come out); otherwise it
raises :class:`SecAggAborted` and nothing is revealed.

Invalid replies (wrong session = replay, unknown or unexpected participant, wrong shape, wrong
length) raise :class:`SecAggProtocolError` naming the participant; with ``drop_invalid=True``
they are instead left out (that site counts as dropped) and the reason is kept in
``server.rejected``. Either way an invalid reply is never used.

Threat model: the sites do not trust this code. Every site checks what the server routes
(client.py): keys signed by roster identities, one signed survivor set per round, never both
secrets of one participant. The checks here are what an honest server does to fail early and
clearly (abort before anything is revealed) instead of being refused by the sites; a dishonest
server gains nothing by skipping them. docs/secure_aggregation.md states what an active server
can and cannot learn.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from privacy.secagg import crypto, graph, shamir
from privacy.secagg import messages as m
from privacy.secagg.client import CIPHERTEXT_BYTES, SEED_BYTES, quorum
from privacy.secagg.errors import SecAggAborted, SecAggProtocolError
from privacy.secagg.identity import SIGNATURE_MAX_BYTES

SESSION_BYTES = 16
_ABORTED = "aborted"


@dataclass(frozen=True)
class SecAggPlan:
    """The public parameters of one round: who takes part, who neighbours whom, threshold t."""

    session: bytes
    num_participants: int
    threshold: int
    neighbours: tuple[tuple[int, ...], ...]

    def site_config(self, index: int) -> dict[str, Any]:
        """The stage-0 message for participant ``index`` (ConfigRecord values)."""
        if not 0 <= index < self.num_participants:
            raise ValueError(f"participant index must be in [0, {self.num_participants}), "
                             f"got {index}")
        return {m.SESSION: self.session, m.INDEX: index,
                m.NUM_PARTICIPANTS: self.num_participants, m.THRESHOLD: self.threshold,
                m.NEIGHBOURS: list(self.neighbours[index])}

    def holders(self, index: int) -> set[int]:
        """Who holds shares of ``index``'s secrets: itself and its neighbours."""
        return {index, *self.neighbours[index]}

    def to_record(self) -> dict[str, Any]:
        """ConfigRecord values (neighbour lists as keys ``neighbours.<index>``)."""
        record: dict[str, Any] = {m.SESSION: self.session,
                                  m.NUM_PARTICIPANTS: self.num_participants,
                                  m.THRESHOLD: self.threshold}
        for index, linked in enumerate(self.neighbours):
            record[f"{m.NEIGHBOURS}.{index}"] = list(linked)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SecAggPlan:
        n = int(record[m.NUM_PARTICIPANTS])
        return cls(session=bytes(record[m.SESSION]), num_participants=n,
                   threshold=int(record[m.THRESHOLD]),
                   neighbours=tuple(tuple(record[f"{m.NEIGHBOURS}.{i}"]) for i in range(n)))


def default_threshold(neighbourhood_size: int) -> int:
    """A majority of the neighbourhood (the site and its neighbours): size // 2 + 1."""
    return neighbourhood_size // 2 + 1


def setup(num_participants: int, threshold: int | None = None, neighbours: int | None = None,
          seed: int = 0, session: bytes | None = None) -> SecAggPlan:
    """Stage 0: the round's plan.

    ``neighbours``: None for full SecAgg (everyone neighbours everyone), or the SecAgg+ degree k
    (graph.py; e.g. ``graph.suggested_degree(n)``). ``threshold``: t, default a majority of the
    smallest neighbourhood (site + neighbours); must be in [2, smallest neighbourhood]. A
    majority also protects against a server that lies about who dropped (Bonawitz et al. §4):
    honest sites then cannot be made to reveal t shares of both secrets of one site.
    ``seed``: public, makes the graph reproducible. ``session``: the round's id bound into every
    key derivation and ciphertext (default 16 random bytes; must differ between rounds).
    """
    if not isinstance(num_participants, int) or num_participants < 2:
        raise ValueError(f"secure aggregation needs at least 2 participants, "
                         f"got {num_participants!r}")
    linked = graph.neighbour_graph(num_participants, neighbours, seed)
    smallest = min(len(row) for row in linked) + 1
    if threshold is None:
        threshold = default_threshold(smallest)
    if not isinstance(threshold, int) or not 2 <= threshold <= smallest:
        raise ValueError(f"threshold must be an integer in [2, {smallest}] (smallest "
                         f"neighbourhood: a site and its neighbours), got {threshold!r}")
    session = os.urandom(SESSION_BYTES) if session is None else session
    if not isinstance(session, bytes) or not session:
        raise ValueError("session must be non-empty bytes")
    return SecAggPlan(session=session, num_participants=num_participants, threshold=threshold,
                      neighbours=tuple(tuple(row) for row in linked))


def _server_stage(expected: str,
                  stage: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run a server stage only after ``expected``; it counts as done only if it returns.

    A protocol error leaves the server where it was (the driver may retry the stage, e.g. with
    ``drop_invalid=True``); an abort ends the round for good.
    """
    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def run(self: SecAggServer, *args: Any, **kwargs: Any) -> Any:
            self._enter(expected, stage)
            try:
                result = method(self, *args, **kwargs)
            except SecAggAborted:
                self._stage = _ABORTED
                raise
            self._stage = stage
            return result
        return run
    return decorate


class SecAggServer:
    """The server's state for one round; methods are the stages, in order (module docstring)."""

    def __init__(self, plan: SecAggPlan) -> None:
        self.plan = plan
        self.rejected: dict[int, str] = {}
        self.advertised: set[int] = set()  # U1: sent public keys
        self.shared: set[int] = set()  # U2: sent encrypted shares
        self.survivors: set[int] = set()  # U3: sent a masked input
        self._stage = m.STAGE_SETUP
        self._c_keys: dict[int, bytes] = {}
        self._s_keys: dict[int, bytes] = {}
        self._site_ids: dict[int, str] = {}
        self._key_signatures: dict[int, bytes] = {}
        self._survivor_set: list[int] = []
        self._key_owners: dict[int, list[int]] = {}
        self._masked: dict[int, np.ndarray] = {}
        self._requests: dict[int, dict[str, Any]] = {}

    @property
    def dropped(self) -> set[int]:
        """Participants that shared keys but sent no (valid) masked input: U2 \\ U3."""
        return self.shared - self.survivors

    # -- helpers ---------------------------------------------------------------------------
    def _enter(self, expected: str, stage: str) -> None:
        if self._stage != expected:
            raise SecAggProtocolError(f"server stage '{stage}' called after '{self._stage}', "
                                      f"expected after '{expected}'")

    def _accept(self, replies: Mapping[int, Any], allowed: set[int], stage: str,
                check: Callable[[int, Any], None], drop_invalid: bool) -> list[int]:
        accepted = []
        for index in sorted(replies):
            try:
                if index not in allowed:
                    raise SecAggProtocolError(
                        f"{stage}: reply from participant {index!r}, who is not expected at "
                        f"this stage (expected one of {sorted(allowed)})", index)
                check(index, replies[index])
            except SecAggProtocolError as error:
                if not drop_invalid:
                    raise
                self.rejected[index] = f"{stage}: {error}"
                continue
            accepted.append(index)
        return accepted

    def _abort_unless(self, stage: str, holders: int, needed_for: str) -> None:
        t = self.plan.threshold
        if holders < t:
            raise SecAggAborted(stage, f"{needed_for} has {holders} share holders left, "
                                f"threshold {t}", required=t, available=holders)

    def _envelope(self, index: int) -> dict[str, Any]:
        return {m.SESSION: self.plan.session, m.INDEX: index}

    # -- stages ----------------------------------------------------------------------------
    def site_configs(self) -> dict[int, dict[str, Any]]:
        """Stage 0: index → that site's config (session, index, threshold, neighbours)."""
        return {i: self.plan.site_config(i) for i in range(self.plan.num_participants)}

    @_server_stage(m.STAGE_SETUP, m.STAGE_ADVERTISE_KEYS)
    def route_public_keys(self, replies: Mapping[int, Mapping[str, Any]], *,
                          drop_invalid: bool = False) -> dict[int, dict[str, Any]]:
        """Stage 1 → 2: record who advertised keys (U1); send each its neighbours' keys."""
        stage = m.STAGE_ADVERTISE_KEYS
        seen: set[bytes] = set()
        seen_sites: set[str] = set()

        def check(index: int, reply: Any) -> None:
            m.check_envelope(reply, self.plan.session, index, stage)
            c_key = crypto.check_public_key(reply.get(m.C_PUBLIC_KEY), index, "c public key")
            s_key = crypto.check_public_key(reply.get(m.S_PUBLIC_KEY), index, "s public key")
            site_id = m.get_str(reply, m.SITE_ID, stage, index)
            signature = m.get_bytes(reply, m.KEY_SIGNATURE, stage, index)
            if c_key == s_key or {c_key, s_key} & seen:
                raise SecAggProtocolError(f"{stage}: public keys of participant {index} repeat "
                                          "a key already advertised", index)
            if site_id in seen_sites:  # its neighbours would refuse the round: leave it out
                raise SecAggProtocolError(f"{stage}: participant {index} claims site "
                                          f"{site_id!r}, already another participant", index)
            if len(signature) > SIGNATURE_MAX_BYTES:
                raise SecAggProtocolError(f"{stage}: key signature of participant {index} is "
                                          "too long for ECDSA P-384", index)
            seen.update((c_key, s_key))
            seen_sites.add(site_id)
            self._c_keys[index], self._s_keys[index] = c_key, s_key
            self._site_ids[index], self._key_signatures[index] = site_id, signature

        accepted = self._accept(replies, set(range(self.plan.num_participants)), stage, check,
                                drop_invalid)
        self.advertised = set(accepted)
        for index in list(self._c_keys):
            if index not in self.advertised:
                del self._c_keys[index], self._s_keys[index]
                del self._site_ids[index], self._key_signatures[index]
        self._check_holders(stage, self.advertised)
        routed = {}
        for index in sorted(self.advertised):
            owners = [j for j in self.plan.neighbours[index] if j in self.advertised]
            self._key_owners[index] = owners
            routed[index] = {**self._envelope(index), m.KEY_OWNERS: owners,
                             m.C_PUBLIC_KEYS: [self._c_keys[j] for j in owners],
                             m.S_PUBLIC_KEYS: [self._s_keys[j] for j in owners],
                             m.KEY_SITE_IDS: [self._site_ids[j] for j in owners],
                             m.KEY_SIGNATURES: [self._key_signatures[j] for j in owners]}
        return routed

    def _check_holders(self, stage: str, alive: set[int]) -> None:
        """Every live participant's secrets must keep ≥ t live holders (itself included)."""
        if not alive:
            raise SecAggAborted(stage, "no participant left", required=self.plan.threshold,
                                available=0)
        for index in sorted(alive):
            holders = len(self.plan.holders(index) & alive)
            self._abort_unless(stage, holders, f"participant {index}")

    @_server_stage(m.STAGE_ADVERTISE_KEYS, m.STAGE_SHARE_KEYS)
    def route_shares(self, replies: Mapping[int, Mapping[str, Any]], *,
                     drop_invalid: bool = False) -> dict[int, dict[str, Any]]:
        """Stage 2 → 3: record who shared (U2); regroup the ciphertexts by receiver."""
        stage = m.STAGE_SHARE_KEYS

        def check(index: int, reply: Any) -> None:
            m.check_envelope(reply, self.plan.session, index, stage)
            receivers = m.get_int_list(reply, m.RECEIVERS, stage, index)
            ciphertexts = m.get_bytes_list(reply, m.CIPHERTEXTS, stage, index, len(receivers))
            if receivers != self._key_owners[index]:
                raise SecAggProtocolError(f"{stage}: participant {index} shared with "
                                          f"{receivers}, expected {self._key_owners[index]}",
                                          index)
            if any(len(c) != CIPHERTEXT_BYTES for c in ciphertexts):
                raise SecAggProtocolError(f"{stage}: share ciphertexts of participant {index} "
                                          f"must be {CIPHERTEXT_BYTES} bytes", index)

        accepted = self._accept(replies, self.advertised, stage, check, drop_invalid)
        self.shared = set(accepted)
        self._check_holders(stage, self.shared)
        inbox: dict[int, dict[str, Any]] = {
            i: {**self._envelope(i), m.SENDERS: [], m.CIPHERTEXTS: []} for i in self.shared}
        for sender in accepted:
            reply = replies[sender]
            for receiver, ciphertext in zip(reply[m.RECEIVERS], reply[m.CIPHERTEXTS]):
                if receiver in inbox:  # receivers that dropped at this stage get nothing
                    inbox[receiver][m.SENDERS].append(sender)
                    inbox[receiver][m.CIPHERTEXTS].append(ciphertext)
        return inbox

    @property
    def site_ids(self) -> dict[int, str]:
        """index → the site id each participant signed its keys with (stage 1)."""
        return dict(self._site_ids)

    @_server_stage(m.STAGE_SHARE_KEYS, m.STAGE_MASKED_INPUT)
    def request_consistency(self, replies: Mapping[int, Mapping[str, Any]],
                            masked_inputs: Mapping[int, np.ndarray], vector_length: int, *,
                            drop_invalid: bool = False) -> dict[int, dict[str, Any]]:
        """Stage 3 → 3b: keep the valid masked inputs (U3); ask each survivor to sign U3.

        ``replies`` are the stage-3 headers, ``masked_inputs`` the vectors (same keys); a vector
        that is not 1-D uint32 of ``vector_length`` is rejected.
        """
        stage = m.STAGE_MASKED_INPUT
        if not isinstance(vector_length, int) or vector_length < 0:
            raise ValueError(f"vector_length must be a non-negative int, got {vector_length!r}")

        def check(index: int, reply: Any) -> None:
            m.check_envelope(reply, self.plan.session, index, stage)
            vector = masked_inputs.get(index)
            if (not isinstance(vector, np.ndarray) or vector.dtype != np.uint32
                    or vector.shape != (vector_length,)):
                shape = (f"{vector.dtype} {vector.shape}" if isinstance(vector, np.ndarray)
                         else type(vector).__name__)
                raise SecAggProtocolError(f"{stage}: masked input of participant {index} must "
                                          f"be uint32 of shape ({vector_length},), got {shape}",
                                          index)

        extra = sorted(set(masked_inputs) - set(replies))
        if extra:
            raise SecAggProtocolError(f"{stage}: masked inputs without a header from {extra}")
        accepted = self._accept(replies, self.shared, stage, check, drop_invalid)
        self.survivors = set(accepted)
        self._masked = {i: masked_inputs[i] for i in accepted}
        # Before anyone reveals anything: every survivor's b and every needed dropped s key
        # must be reconstructible from survivors, and the survivors' graph must be connected.
        if not self.survivors:
            raise SecAggAborted(stage, "no masked input received", required=1, available=0)
        for index in sorted(self.survivors):
            self._abort_unless(stage, len(self.plan.holders(index) & self.survivors),
                               f"self-mask seed of survivor {index}")
        for index in sorted(self._dropped_with_survivor_neighbours()):
            self._abort_unless(stage, len(self.plan.holders(index) & self.survivors),
                               f"mask key of dropped participant {index}")
        if not graph.is_connected(self.survivors, [list(r) for r in self.plan.neighbours]):
            raise SecAggAborted(stage, "the survivors' neighbour graph is disconnected; "
                                "unmasking would reveal the sum of each part")
        needed = quorum(self.plan.num_participants, self.plan.threshold)
        if len(self.survivors) < needed:  # the sites would refuse to sign or reveal
            raise SecAggAborted(stage, f"{len(self.survivors)} survivors, fewer than the quorum "
                                f"{needed} = max(t, n//2 + 1) of signatures sites require",
                                required=needed, available=len(self.survivors))
        self._survivor_set = sorted(self.survivors)
        return {i: {**self._envelope(i), m.SURVIVOR_SET: list(self._survivor_set)}
                for i in self._survivor_set}

    @_server_stage(m.STAGE_MASKED_INPUT, m.STAGE_CONSISTENCY)
    def request_unmask(self, replies: Mapping[int, Mapping[str, Any]], *,
                       drop_invalid: bool = False) -> dict[int, dict[str, Any]]:
        """Stage 3b → 4: collect every survivor's signature on U3; ask each survivor for the
        b-shares of survivors and the s-key shares of dropped participants it holds, with all
        the signatures (sites reveal nothing without them).

        A survivor that does not sign aborts the round: sites reveal a survivor's self-mask
        seed only once it has signed U3, and U3 cannot change (each site signs one U3).
        """
        stage = m.STAGE_CONSISTENCY
        signatures: dict[int, bytes] = {}

        def check(index: int, reply: Any) -> None:
            m.check_envelope(reply, self.plan.session, index, stage)
            signature = m.get_bytes(reply, m.SURVIVOR_SET_SIGNATURE, stage, index)
            if len(signature) > SIGNATURE_MAX_BYTES:
                raise SecAggProtocolError(f"{stage}: signature of participant {index} is too "
                                          "long for ECDSA P-384", index)
            signatures[index] = signature

        accepted = self._accept(replies, self.survivors, stage, check, drop_invalid)
        missing = sorted(self.survivors - set(accepted))
        if missing:
            raise SecAggAborted(stage, f"survivors {missing} did not sign the survivor set; "
                                "their self masks cannot be removed", required=len(
                                    self.survivors), available=len(accepted))
        signed = {m.SURVIVOR_SET: list(self._survivor_set),
                  m.SIGNER_INDICES: list(self._survivor_set),
                  m.SIGNER_SITE_IDS: [self._site_ids[i] for i in self._survivor_set],
                  m.SIGNER_SIGNATURES: [signatures[i] for i in self._survivor_set]}
        self._requests = {}
        for index in sorted(self.survivors):
            holds = self.plan.holders(index) & self.shared  # whose shares it received
            self._requests[index] = {
                **self._envelope(index),
                m.SURVIVORS: sorted(holds & self.survivors),
                m.DROPPED: sorted(holds & self._dropped_with_survivor_neighbours()),
            }
        return {i: {**request, **signed} for i, request in self._requests.items()}

    def _dropped_with_survivor_neighbours(self) -> set[int]:
        """Dropped participants whose pairwise masks are inside some survivor's input."""
        return {j for j in self.dropped if set(self.plan.neighbours[j]) & self.survivors}

    @_server_stage(m.STAGE_CONSISTENCY, m.STAGE_UNMASK)
    def unmask(self, replies: Mapping[int, Mapping[str, Any]], *,
               drop_invalid: bool = False) -> np.ndarray:
        """Stage 4: reconstruct the survivors' b and the dropped participants' s keys from ≥ t
        revealed shares each, remove all masks, and return Σ_{i∈U3} y_i mod 2³² (uint32)."""
        stage = m.STAGE_UNMASK
        share_bytes = shamir.SHARE_BYTES

        def check(index: int, reply: Any) -> None:
            m.check_envelope(reply, self.plan.session, index, stage)
            request = self._requests[index]
            for owners_key, shares_key, expected in ((m.B_OWNERS, m.B_SHARES, m.SURVIVORS),
                                                     (m.S_OWNERS, m.S_SHARES, m.DROPPED)):
                owners = m.get_int_list(reply, owners_key, stage, index)
                shares = m.get_bytes_list(reply, shares_key, stage, index, len(owners))
                if owners != request[expected]:
                    raise SecAggProtocolError(f"{stage}: participant {index} revealed "
                                              f"'{owners_key}' {owners}, asked for "
                                              f"{request[expected]}", index)
                if any(len(share) != share_bytes for share in shares):
                    raise SecAggProtocolError(f"{stage}: shares of participant {index} must be "
                                              f"{share_bytes} bytes", index)

        accepted = self._accept(replies, self.survivors, stage, check, drop_invalid)
        b_shares: dict[int, dict[int, bytes]] = {i: {} for i in self.survivors}
        s_shares: dict[int, dict[int, bytes]] = {j: {} for j in
                                                 self._dropped_with_survivor_neighbours()}
        for holder in accepted:
            reply = replies[holder]
            for owner, share in zip(reply[m.B_OWNERS], reply[m.B_SHARES]):
                b_shares[owner][holder] = share
            for owner, share in zip(reply[m.S_OWNERS], reply[m.S_SHARES]):
                s_shares[owner][holder] = share
        # All counts first: abort before reconstructing anything (nothing partial comes out).
        for owner in sorted(b_shares):
            self._abort_unless(stage, len(b_shares[owner]), f"self-mask seed of survivor {owner}")
        for owner in sorted(s_shares):
            self._abort_unless(stage, len(s_shares[owner]), f"mask key of dropped {owner}")

        t = self.plan.threshold
        # every seed first (a corrupt share aborts before any work), then one pass of masks
        masks = [(self._combine(b_shares[owner], t, SEED_BYTES, stage, owner, "self-mask seed"),
                  True) for owner in sorted(b_shares)]
        for dropped in sorted(s_shares):
            s_private = self._combine(s_shares[dropped], t, crypto.KEY_BYTES, stage, dropped,
                                      "mask key")
            if crypto.public_key_of(s_private) != self._s_keys[dropped]:
                raise SecAggAborted(stage, f"the mask key of dropped participant {dropped} "
                                    "reconstructs inconsistently (corrupted shares)")
            for survivor in sorted(set(self.plan.neighbours[dropped]) & self.survivors):
                seed = crypto.pairwise_mask_seed(s_private, dropped, self._s_keys[survivor],
                                                 survivor, self.plan.session)
                # The survivor added PRG(s_ij) if dropped > survivor, else subtracted it.
                masks.append((seed, dropped > survivor))
        vectors = iter(self._masked.values())
        total = next(vectors).copy()  # the survivors' sum, in place: no zero vector to add to
        for vector in vectors:
            np.add(total, vector, out=total)
        crypto.apply_masks(total, masks)
        return total

    @staticmethod
    def _combine(shares: dict[int, bytes], threshold: int, size: int, stage: str, owner: int,
                 what: str) -> bytes:
        try:
            return shamir.combine(shares, threshold, size)
        except shamir.ShamirError as error:
            raise SecAggAborted(stage, f"{what} of participant {owner}: {error}") from error
