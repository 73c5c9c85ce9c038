"""The threat model, as attacks: each test is an attack that must fail.

Secure aggregation against an ACTIVE server (one that deviates from the protocol at will): the
attackers below drive honest sites through the real stage functions of privacy/secagg/client.py
and do whatever a server can do: route, withhold, substitute and forge. Honest sites hold
provisioned identities and a CA-signed roster (privacy/secagg/identity.py).

The site's policy against a server that sends whatever run settings it likes (second part):
privacy off against a site that requires DP, σ below the site's floor, a target above its budget,
settings outside its ranges, no state directory, an error reply that would carry a patient value,
and the site's exact size (only a noisy, accounted count leaves).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client.app import build_client_app
from client.egress import EGRESS_LOG, read_log
from client.privacy_budget import LEDGER_FILE, plan_ledger
from privacy import protocol
from privacy.accounting import PrivacyLedger
from privacy.secagg import (
    IdentityError,
    RevealRefused,
    Roster,
    SecAggProtocolError,
    SecAggServer,
    SiteIdentity,
    advertise_keys,
    confirm_survivors,
    masked_input,
    setup,
    shamir,
    share_keys,
    unmask,
)
from privacy.secagg import messages as m
from privacy.secagg.client import SEED_BYTES
from privacy.secagg.crypto import KEY_BYTES, apply_mask, generate_key_pair, pairwise_mask_seed
from privacy.secagg.identity import generate_key, test_identities, write_ephemeral_federation
from privacy.secagg.loopback import run_round
from server.app import initial_model
from server.settings import compose, site_settings
from simulations.synthetic import get_generator

SESSION = b"threat-model-session"
LENGTH = 32


class Federation:
    """Honest sites 0..n-1 (site-0, site-1, ...) whose every message an attacker handles.

    ``server`` is the honest SecAggServer bookkeeping the attacker may use or bypass; the
    attacker reads and rewrites what it routes between the calls.
    """

    def __init__(self, n: int, threshold: int | None = None, seed: int = 0,
                 min_threshold: int | None = None) -> None:
        self.plan = setup(n, threshold=threshold, session=SESSION, seed=seed)
        self.server = SecAggServer(self.plan)
        made = test_identities((f"site-{i}" for i in range(n)), min_threshold=min_threshold)
        self.identities = {i: made[f"site-{i}"] for i in range(n)}
        rng = np.random.default_rng(seed)
        self.vectors = {i: rng.integers(0, 2**32, LENGTH, dtype=np.uint32) for i in range(n)}
        self.states: dict[int, dict] = {}

    def advertise(self) -> dict[int, dict]:
        replies = {}
        for i, config in self.server.site_configs().items():
            self.states[i], replies[i] = advertise_keys(config, self.identities[i])
        return replies

    def share(self, routed: dict[int, dict]) -> dict[int, dict]:
        replies = {}
        for i, message in routed.items():
            self.states[i], replies[i] = share_keys(self.states[i], message, self.identities[i])
        return replies

    def mask(self, routed: dict[int, dict]) -> tuple[dict[int, dict], dict[int, np.ndarray]]:
        headers, masked = {}, {}
        for i, message in routed.items():
            self.states[i], headers[i], masked[i] = masked_input(self.states[i], message,
                                                                 self.vectors[i])
        return headers, masked

    def up_to_masked_input(self) -> tuple[dict[int, dict], dict[int, np.ndarray]]:
        routed = self.server.route_public_keys(self.advertise())
        return self.mask(self.server.route_shares(self.share(routed)))

    def try_confirm(self, index: int, survivor_set: list[int]) -> bytes | None:
        """Ask site ``index`` to sign ``survivor_set``; its signature, or None if it refuses."""
        request = {m.SESSION: SESSION, m.INDEX: index, m.SURVIVOR_SET: survivor_set}
        try:
            self.states[index], reply = confirm_survivors(self.states[index], request,
                                                          self.identities[index])
        except SecAggProtocolError:
            return None
        return reply[m.SURVIVOR_SET_SIGNATURE]

    def try_unmask(self, index: int, request: dict) -> dict | None:
        try:
            self.states[index], reply = unmask(self.states[index], request,
                                               self.identities[index])
        except SecAggProtocolError:
            return None
        return reply


def _shares_of(replies: list[dict], owner: int, kind: str) -> dict[int, bytes]:
    owners_key, shares_key = (m.B_OWNERS, m.B_SHARES) if kind == "b" else (m.S_OWNERS,
                                                                         m.S_SHARES)
    return {reply[m.INDEX]: share for reply in replies
            for j, share in zip(reply[owners_key], reply[shares_key]) if j == owner}


# -- (a) the lying server of issue 15: two views of who survived --------------------------------

V, A, B, C, D = range(5)
# What the attacker wants each site to reveal (issue 15): b-shares of `survivors`, s-key shares
# of `dropped`. Together: b_V from V, A, B; s_sk_A from B, C, D; s_sk_B from A, C, D.
LIES = {V: ([V, A, B], []), A: ([A, V, C], [B]), B: ([B, V, D], [A]),
        C: ([C, D, V], [A, B]), D: ([D, C, V], [A, B])}


def lying_server_attack(fed: Federation) -> tuple[list[dict], dict[int, np.ndarray]]:
    """The attack, against the real stage functions: V receives only A's and B's shares (so it
    masks with A and B alone), then every site is told a different survivor set and asked to
    reveal accordingly. Returns every reveal the sites agreed to, and the masked inputs."""
    routed = fed.server.route_public_keys(fed.advertise())
    inbox = fed.server.route_shares(fed.share(routed))
    keep = [k for k, sender in enumerate(inbox[V][m.SENDERS]) if sender in (A, B)]
    inbox[V] = {**inbox[V], m.SENDERS: [inbox[V][m.SENDERS][k] for k in keep],
                m.CIPHERTEXTS: [inbox[V][m.CIPHERTEXTS][k] for k in keep]}
    _, masked = fed.mask(inbox)
    # Consistency stage: each site is shown the survivor set of its own lie.
    signatures = {i: fed.try_confirm(i, sorted(LIES[i][0])) for i in LIES}
    revealed = []
    for i, (survivors, dropped) in LIES.items():
        view = sorted(survivors)
        # the attacker forwards every signature it holds; a site whose signature it lacks is
        # "signed" with a signature over another set (all it has), or with a key of its own
        own_key = generate_key()
        signers, site_ids, sigs = [], [], []
        for j in view:
            signature = signatures.get(j) or own_key.sign(b"forged", _ecdsa())
            signers.append(j)
            site_ids.append(f"site-{j}")
            sigs.append(signature)
        request = {m.SESSION: SESSION, m.INDEX: i, m.SURVIVORS: sorted(survivors),
                   m.DROPPED: sorted(dropped), m.SURVIVOR_SET: view, m.SIGNER_INDICES: signers,
                   m.SIGNER_SITE_IDS: site_ids, m.SIGNER_SIGNATURES: sigs}
        reply = fed.try_unmask(i, request)
        if reply is not None:
            revealed.append(reply)
    return revealed, masked


def _ecdsa():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.ECDSA(hashes.SHA384())


def test_lying_server_cannot_unmask_one_site_with_two_views_of_the_survivors():
    fed = Federation(5)  # t = 3
    assert fed.plan.threshold == 3
    revealed, masked = lying_server_attack(fed)
    assert revealed == []  # every honest site refused: no view has every member's signature
    t = fed.plan.threshold
    needed = {"b_V": _shares_of(revealed, V, "b"), "s_A": _shares_of(revealed, A, "s"),
              "s_B": _shares_of(revealed, B, "s")}
    assert all(len(shares) < t for shares in needed.values()), needed
    with pytest.raises(shamir.ShamirError):
        shamir.combine(needed["b_V"], t, SEED_BYTES)
    # V's masked input stays masked: without b_V the attacker's best guess is not V's vector
    assert not np.array_equal(masked[V], fed.vectors[V])


def test_lying_server_with_one_view_learns_only_a_sum_of_at_least_t_sites():
    """The attacker's best consistent move after withholding C's and D's shares from V:
    U3 = {V, A, B}. V, A and B sign it and reveal; what comes out is y_V + y_A + y_B (the sum of
    t sites, as the protocol allows), never y_V alone: A's and B's mask keys stay secret."""
    fed = Federation(5)
    routed = fed.server.route_public_keys(fed.advertise())
    inbox = fed.server.route_shares(fed.share(routed))
    keep = [k for k, sender in enumerate(inbox[V][m.SENDERS]) if sender in (A, B)]
    inbox[V] = {**inbox[V], m.SENDERS: [inbox[V][m.SENDERS][k] for k in keep],
                m.CIPHERTEXTS: [inbox[V][m.CIPHERTEXTS][k] for k in keep]}
    # (test-only peek, to check the attacker's arithmetic below: secrets the sites never send)
    peeked = {j: fed.states[j]["s-private-key"] for j in (A, B)}
    s_public_v = fed.states[A][m.S_PUBLIC_KEYS][fed.states[A][m.KEY_OWNERS].index(V)]
    _, masked = fed.mask(inbox)
    everyone = [V, A, B, C, D]
    assert fed.try_confirm(V, everyone) is None  # C, D listed, V never masked with them
    view = [V, A, B]
    signatures = {i: fed.try_confirm(i, view) for i in everyone}
    assert signatures[C] is None and signatures[D] is None  # not in the view: they refuse
    assert signatures[A] is not None and signatures[B] is not None
    signed = {m.SURVIVOR_SET: view, m.SIGNER_INDICES: view,
              m.SIGNER_SITE_IDS: [f"site-{j}" for j in view],
              m.SIGNER_SIGNATURES: [signatures[j] for j in view]}
    replies = []
    for i in view:
        # greedy: ask for b-shares of the view and s-key shares of everyone else, A and B too
        for dropped in ([A, B, C, D], [C, D], []):
            survivors = [j for j in view if j not in dropped]
            reply = fed.try_unmask(i, {m.SESSION: SESSION, m.INDEX: i, m.SURVIVORS: survivors,
                                       m.DROPPED: [j for j in dropped if j != i], **signed})
            if reply is not None:
                replies.append(reply)
                break
    assert len(_shares_of(replies, A, "s")) == 0 and len(_shares_of(replies, B, "s")) == 0
    b_v = shamir.combine(_shares_of(replies, V, "b"), fed.plan.threshold, SEED_BYTES)
    guess = masked[V].copy()
    apply_mask(guess, b_v, subtract=True)  # V's pairwise masks with A and B remain
    assert not np.array_equal(guess, fed.vectors[V])
    # Had A and B revealed their mask keys (as "dropped"), this is all it would take:
    for j in (A, B):
        seed = pairwise_mask_seed(peeked[j], j, s_public_v, V, SESSION)
        apply_mask(guess, seed, subtract=j > V)  # V added PRG(s_Vj) for j > V
    np.testing.assert_array_equal(guess, fed.vectors[V])


def test_withholding_shares_to_isolate_a_site_makes_it_refuse_and_nobody_reveals_its_seed():
    """n = 9, t = 5: the server delivers V only four peers' shares, then declares those four
    dropped (U3 = V + the other four). Their mask keys would come out, and with V's self-mask
    seed, V's input. V refuses to sign such a U3, and no site reveals b_V without V's
    signature on U3."""
    fed = Federation(9)
    t = fed.plan.threshold
    assert t == 5
    routed = fed.server.route_public_keys(fed.advertise())
    inbox = fed.server.route_shares(fed.share(routed))
    peers = [1, 2, 3, 4]
    keep = [k for k, sender in enumerate(inbox[0][m.SENDERS]) if sender in peers]
    inbox[0] = {**inbox[0], m.SENDERS: [inbox[0][m.SENDERS][k] for k in keep],
                m.CIPHERTEXTS: [inbox[0][m.CIPHERTEXTS][k] for k in keep]}
    fed.mask(inbox)
    view = [0, 5, 6, 7, 8]
    signatures = {i: fed.try_confirm(i, view) for i in view}
    assert signatures[0] is None
    replies = []
    for i in view[1:]:
        request = {m.SESSION: SESSION, m.INDEX: i, m.SURVIVORS: view, m.DROPPED: peers,
                   m.SURVIVOR_SET: view, m.SIGNER_INDICES: view[1:],
                   m.SIGNER_SITE_IDS: [f"site-{j}" for j in view[1:]],
                   m.SIGNER_SIGNATURES: [signatures[j] for j in view[1:]]}
        if (reply := fed.try_unmask(i, request)) is not None:
            replies.append(reply)
    assert replies == []
    assert len(_shares_of(replies, 0, "b")) < t


# -- (b) key substitution in stage 1 -------------------------------------------------------------

def _routed_keys() -> tuple[Federation, dict[int, dict]]:
    fed = Federation(5)
    return fed, fed.server.route_public_keys(fed.advertise())


def _replace(message: dict, key: str, position: int, value) -> dict:
    values = list(message[key])
    values[position] = value
    return {**message, key: values}


def test_a_substituted_public_key_is_detected_naming_the_participant():
    fed, routed = _routed_keys()
    message = routed[V]
    k = message[m.KEY_OWNERS].index(A)
    _, attacker_key = generate_key_pair()
    for key in (m.C_PUBLIC_KEYS, m.S_PUBLIC_KEYS):
        with pytest.raises(SecAggProtocolError, match=r"participant 1 \(site 'site-1'\) are "
                                                      "not signed") as error:
            share_keys(fed.states[V], _replace(message, key, k, attacker_key), fed.identities[V])
        assert error.value.participant == A
    # the attacker signs its keys with a P-384 key of its own: not the roster's key of site-1
    own = generate_key()
    forged = own.sign(m.key_statement(SESSION, A, 5, 3, "site-1", attacker_key, attacker_key),
                      _ecdsa())
    tampered = _replace(_replace(_replace(message, m.C_PUBLIC_KEYS, k, attacker_key),
                                 m.S_PUBLIC_KEYS, k, bytes(KEY_BYTES - 1) + b"\x09"),
                        m.KEY_SIGNATURES, k, forged)
    with pytest.raises(SecAggProtocolError, match="not signed"):
        share_keys(fed.states[V], tampered, fed.identities[V])


def test_identities_outside_the_roster_duplicated_or_impersonating_the_site_are_refused():
    fed, routed = _routed_keys()
    message = routed[V]
    k = message[m.KEY_OWNERS].index(A)
    with pytest.raises(SecAggProtocolError, match="'mallory' is not in the federation roster"):
        share_keys(fed.states[V], _replace(message, m.KEY_SITE_IDS, k, "mallory"),
                   fed.identities[V])
    with pytest.raises(SecAggProtocolError, match="several participants"):
        share_keys(fed.states[V], _replace(message, m.KEY_SITE_IDS, k, "site-2"),
                   fed.identities[V])
    with pytest.raises(SecAggProtocolError, match="claims to be this site"):
        share_keys(fed.states[V], _replace(message, m.KEY_SITE_IDS, k, "site-0"),
                   fed.identities[V])
    # the site sent nothing and stays where it was: the round goes on without it or aborts
    assert fed.states[V]["stage"] == "advertised"


def test_sites_told_different_round_parameters_detect_it():
    """The server tells site V that t = 4 (or n = 6) while the others run t = 3: every
    neighbour's signature was made over the real parameters, so V refuses."""
    fed = Federation(5)
    replies = fed.advertise()
    configs = fed.server.site_configs()
    fed.states[V], replies[V] = advertise_keys({**configs[V], m.THRESHOLD: 4}, fed.identities[V])
    routed = fed.server.route_public_keys(replies)
    with pytest.raises(SecAggProtocolError, match="different round parameters"):
        share_keys(fed.states[V], routed[V], fed.identities[V])
    # and V's own keys, signed for t = 4, are refused by every other site
    with pytest.raises(SecAggProtocolError, match=r"participant 0 \(site 'site-0'\)"):
        share_keys(fed.states[A], routed[A], fed.identities[A])


# -- (c) a threshold below the site's floor ------------------------------------------------------

def test_a_threshold_below_a_majority_of_the_neighbourhood_is_refused():
    plan = setup(5, threshold=2, session=SESSION)
    identities = test_identities(["site-0"])
    with pytest.raises(SecAggProtocolError, match="refuses threshold 2: its floor is 3"):
        advertise_keys(plan.site_config(0), identities["site-0"])


def test_a_threshold_below_the_sites_own_floor_is_refused():
    plan = setup(7, session=SESSION)  # t = 4, a majority
    strict = test_identities(["site-0"], min_threshold=5)["site-0"]
    with pytest.raises(SecAggProtocolError, match="secagg_min_threshold 5"):
        advertise_keys(plan.site_config(0), strict)


def test_a_site_without_an_identity_refuses_secure_aggregation(tmp_path):
    from client.secure_aggregation import identity_refusal, site_identity
    from client.site import SiteSettings

    site = SiteSettings(site_id="hospital_a", data_path=tmp_path)
    reason = identity_refusal(site)
    assert reason is not None and "identity_key, roster, ca_cert" in reason
    entries = write_ephemeral_federation(tmp_path / "ids", ["hospital_a"])["hospital_a"]
    with_key = SiteSettings(site_id="hospital_a", data_path=tmp_path,
                            identity_key=tmp_path / "ids" / "keys" / "hospital_a.key")
    assert "roster, ca_cert" in identity_refusal(with_key)
    complete = SiteSettings(site_id="hospital_a", data_path=tmp_path,
                            identity_key=entries["identity-key"], roster=entries["roster"],
                            ca_cert=entries["ca-cert"])
    assert identity_refusal(complete) is None
    assert site_identity(complete).site_id == "hospital_a"


# -- (d) forged or missing consistency signatures ------------------------------------------------

def _signed_round(n: int = 5) -> tuple[Federation, dict[int, dict]]:
    fed = Federation(n)
    headers, masked = fed.up_to_masked_input()
    checks = fed.server.request_consistency(headers, masked, LENGTH)
    confirmations = {}
    for i, message in checks.items():
        fed.states[i], confirmations[i] = confirm_survivors(fed.states[i], message,
                                                            fed.identities[i])
    return fed, fed.server.request_unmask(confirmations)


def test_a_survivor_set_missing_a_members_signature_is_refused():
    fed, requests = _signed_round()
    request = requests[A]
    short = {**request, m.SIGNER_INDICES: request[m.SIGNER_INDICES][1:],
             m.SIGNER_SITE_IDS: request[m.SIGNER_SITE_IDS][1:],
             m.SIGNER_SIGNATURES: request[m.SIGNER_SIGNATURES][1:]}
    with pytest.raises(RevealRefused, match=r"not by every member of it \(missing \[0\]\)"):
        unmask(fed.states[A], short, fed.identities[A])


def test_forged_consistency_signatures_are_refused():
    fed, requests = _signed_round()
    request = requests[A]
    # V's signature replaced by B's (valid, but over B's index), by one of the attacker's own
    # key, and V's slot claimed by a site outside the roster
    swapped = _replace(request, m.SIGNER_SIGNATURES, V, request[m.SIGNER_SIGNATURES][B])
    with pytest.raises(SecAggProtocolError, match=r"participant 0 \(site 'site-0'\) on the "
                                                  "survivor set does not verify"):
        unmask(fed.states[A], swapped, fed.identities[A])
    own = generate_key().sign(m.survivor_set_statement(SESSION, V, [0, 1, 2, 3, 4]), _ecdsa())
    with pytest.raises(SecAggProtocolError, match="does not verify"):
        unmask(fed.states[A], _replace(request, m.SIGNER_SIGNATURES, V, own), fed.identities[A])
    with pytest.raises(SecAggProtocolError, match="participant 0 is site 'site-0'"):
        unmask(fed.states[A], _replace(request, m.SIGNER_SITE_IDS, V, "site-9"),
               fed.identities[A])
    # a smaller survivor set than the one A signed (its signatures reused)
    smaller = {**request, m.SURVIVOR_SET: [0, 1, 2, 3], m.SURVIVORS: [0, 1, 2, 3],
               m.DROPPED: [4]}
    with pytest.raises(RevealRefused, match="it signed"):
        unmask(fed.states[A], smaller, fed.identities[A])
    # after all that, the honest request still works: refusals used nothing
    _, reply = unmask(fed.states[A], request, fed.identities[A])
    assert reply[m.B_OWNERS] == [0, 1, 2, 3, 4]


def test_a_site_signs_one_survivor_set_per_round():
    fed = Federation(5)
    fed.up_to_masked_input()
    assert fed.try_confirm(A, [0, 1, 2, 3, 4]) is not None
    assert fed.try_confirm(A, [0, 1, 2, 3, 4]) is not None  # the same set again: fine
    with pytest.raises(RevealRefused, match="already signed the survivor set"):
        confirm_survivors(fed.states[A], {m.SESSION: SESSION, m.INDEX: A,
                                          m.SURVIVOR_SET: [0, 1, 2]}, fed.identities[A])
    other = Federation(5)
    other.up_to_masked_input()
    with pytest.raises(RevealRefused, match="fewer than the quorum 3"):
        confirm_survivors(other.states[A], {m.SESSION: SESSION, m.INDEX: A,
                                            m.SURVIVOR_SET: [0, 1]}, other.identities[A])


# -- the roster ------------------------------------------------------------------------------------

def test_a_roster_not_signed_by_the_federation_ca_is_refused_naming_the_file(tmp_path):
    entries = write_ephemeral_federation(tmp_path / "fed", ["h1", "h2"])["h1"]
    roster_path = tmp_path / "fed" / "roster.json"
    assert sorted(Roster.load(roster_path, entries["ca-cert"]).sites) == ["h1", "h2"]
    document = json.loads(roster_path.read_text())
    document["sites"]["mallory"] = document["sites"]["h2"]  # a site added by someone else
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(document))
    with pytest.raises(IdentityError, match=f"roster {tampered} is not signed by the federation"):
        Roster.load(tampered, entries["ca-cert"])
    other = write_ephemeral_federation(tmp_path / "other", ["h1"])["h1"]
    with pytest.raises(IdentityError, match="not signed by the federation CA"):
        Roster.load(roster_path, other["ca-cert"])
    with pytest.raises(IdentityError, match="is not the one the roster"):
        SiteIdentity.load("h1", other["identity-key"], roster_path, entries["ca-cert"])


# -- an honest round still sums exactly ------------------------------------------------------------

def test_an_honest_round_with_provisioned_identities_sums_exactly_with_a_dropout(tmp_path):
    n = 6
    names = [f"hospital_{i}" for i in range(n)]
    entries = write_ephemeral_federation(tmp_path / "fed", names)
    identities = {i: SiteIdentity.load(name, entries[name]["identity-key"],
                                       entries[name]["roster"], entries[name]["ca-cert"])
                  for i, name in enumerate(names)}
    rng = np.random.default_rng(3)
    vectors = {i: rng.integers(0, 2**32, LENGTH, dtype=np.uint32) for i in range(n)}
    result = run_round(setup(n, session=SESSION), vectors, identities=identities,
                       dropouts={m.STAGE_MASKED_INPUT: {2}, m.STAGE_UNMASK: {5}})
    assert result.survivors == {0, 1, 3, 4, 5}
    expected = np.zeros(LENGTH, dtype=np.uint32)
    for i in result.survivors:
        expected += vectors[i]
    np.testing.assert_array_equal(result.total, expected)


# -- the site's handler: fail closed -------------------------------------------------------------

def _advertise_at_site(tmp_path, node_config: dict, threshold: int | None = None):
    import time

    from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

    from client.app import build_client_app
    from privacy import protocol

    plan = setup(5, threshold=threshold, session=SESSION)
    fields = {**plan.site_config(0), protocol.SECAGG_CLIP: 0.5,
              protocol.SECAGG_MAX_EXAMPLES: 1000, protocol.SECAGG_NUM_SITES: 5}
    content = RecordDict({protocol.SECAGG: ConfigRecord(fields),
                          protocol.CONFIG: ConfigRecord({
                              **protocol.encode_run_settings(site_settings(compose(
                                  ["task=tabular"]))), protocol.SERVER_ROUND: 1})})
    metadata = Metadata(run_id=3, message_id="m-1", src_node_id=1, dst_node_id=7,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600,
                        message_type=f"train.{protocol.SECAGG_ADVERTISE_KEYS}")
    config = {"site-id": "hospital_a", "data-path": str(tmp_path),
              "state-dir": str(tmp_path / "state"), "require-approval": False,
              "require-dp": False, **node_config}
    context = Context(run_id=3, node_id=7, node_config=config, state=RecordDict(),
                      run_config={})
    reply = build_client_app()(message=Message(metadata=metadata, content=content),
                               context=context)
    return reply.content[protocol.SITE], reply.content.get(protocol.SECAGG)


def test_a_site_handler_without_identity_or_asked_for_a_low_threshold_refuses(tmp_path):
    from privacy import protocol

    status, secagg = _advertise_at_site(tmp_path, {})
    assert status[protocol.STATUS] == protocol.STATUS_REFUSED and secagg is None
    assert "identity_key, roster, ca_cert" in status[protocol.REASON]
    entries = write_ephemeral_federation(tmp_path / "ids", ["hospital_a"])["hospital_a"]
    status, _ = _advertise_at_site(tmp_path, entries, threshold=2)
    assert status[protocol.STATUS] == protocol.STATUS_REFUSED
    assert "refuses threshold 2" in status[protocol.REASON]
    status, secagg = _advertise_at_site(tmp_path, entries)
    assert status[protocol.STATUS] == protocol.STATUS_OK
    assert secagg[m.SITE_ID] == "hospital_a" and secagg[m.KEY_SIGNATURE]


# ---- the site's policy against the server's run settings (client/policy.py) -------------

RUN_ID = 7


@pytest.fixture(scope="module")
def cfg(small_tabular_cfg):
    return small_tabular_cfg


@pytest.fixture(scope="module")
def site_folder(small_tabular_site):
    return small_tabular_site


def _message(cfg, message_type: str = "train", task=None, rounds=None, **privacy) -> Message:
    """What a (dishonest) server sends: the run settings with ``privacy`` (and ``task``, the
    planned ``rounds``) overridden."""
    settings = site_settings(cfg)
    # a dishonest server can put anything in the record: build it from the flat dict
    values = settings.to_dict()
    values["privacy"].update(privacy)
    values["rounds"] = rounds or values["rounds"]
    values["task"].update(task or {})
    content = RecordDict({
        protocol.ARRAYS: ArrayRecord(initial_model(cfg).state_dict()),
        protocol.CONFIG: ConfigRecord({**protocol.flatten(values, prefix=protocol.RUN_PREFIX),
                                       protocol.SERVER_ROUND: 1}),
    })
    metadata = Metadata(run_id=RUN_ID, message_id=f"m-{message_type}", src_node_id=1,
                        dst_node_id=7, reply_to_message_id="", group_id="",
                        created_at=time.time(), ttl=3600, message_type=message_type)
    return Message(metadata=metadata, content=content)


def _send(cfg, node_config, message_type="train", task=None, rounds=None,
          **privacy) -> Message:
    context = Context(run_id=RUN_ID, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config={})
    return build_client_app()(message=_message(cfg, message_type, task, rounds, **privacy),
                              context=context)


def test_a_delta_near_one_from_the_server_is_capped_at_the_sites_default(
        cfg, site_folder, tmp_path):
    """δ = 0.5 would make any ε meaningless: a deployed site without its own δ never accounts
    with more than its default (below 1/(10·ñ)); its own δ still wins."""
    reply = _send(cfg, _site(site_folder, tmp_path / "a"), delta=0.5)
    ledger = reply.content[protocol.PRIVACY]
    assert ledger["delta"] <= 1e-5 and ledger["delta"] < 1 / (10 * 40)
    own = _send(cfg, _site(site_folder, tmp_path / "b", delta=1e-3), delta=0.5)
    assert own.content[protocol.PRIVACY]["delta"] == 1e-3


def test_a_server_cannot_plan_sigma_for_one_round_and_then_run_more(cfg, site_folder,
                                                                     tmp_path):
    """A deployed site without its own max_epsilon: the target σ was planned for is its budget
    from then on, and a later max_epsilon from the server cannot raise it."""
    site = _site(site_folder, tmp_path)
    first = _send(cfg, site, rounds=1, target_epsilon=2.0)
    assert first.content[protocol.SITE][protocol.STATUS] == protocol.STATUS_OK
    assert first.content[protocol.PRIVACY]["max_epsilon"] == 2.0
    again = _send(cfg, site, rounds=1, target_epsilon=2.0, max_epsilon=100.0)
    assert again.content[protocol.SITE][protocol.STATUS] == protocol.STATUS_DECLINED
    assert "max_epsilon=2" in again.content[protocol.SITE][protocol.REASON]
    assert PrivacyLedger.load(tmp_path / LEDGER_FILE).epsilon() <= 2.0


def test_standardisation_fitted_to_the_sites_records_is_refused_under_dp(
        cfg, site_folder, tmp_path):
    # task.standardize=site: one patient would move every other patient's features
    reason = _refusal(_send(cfg, _site(site_folder, tmp_path), task={"standardize": "site"}))
    assert "task.standardize=site" in reason
    # a research site that does not require DP may still run it
    reply = _send(cfg, _site(site_folder, tmp_path / "r", **{"require-dp": False}),
                  task={"standardize": "site"})
    assert reply.content[protocol.SITE][protocol.STATUS] == protocol.STATUS_OK


def _site(folder, state, **extra):
    return {"site-id": "hospital_x", "data-path": str(folder), "state-dir": str(state),
            "threads": 1, "require-approval": False, **extra}


def _refusal(reply: Message) -> str:
    status = reply.content[protocol.SITE]
    assert status[protocol.STATUS] == protocol.STATUS_REFUSED, dict(status)
    assert protocol.ARRAYS not in reply.content  # nothing of the model left
    return str(status[protocol.REASON])


def test_privacy_off_is_refused_by_a_site_that_requires_dp(cfg, site_folder, tmp_path):
    # deployment default (no require_dp line): DP required; with a budget too
    for extra in ({}, {"max-epsilon": 8.0}, {"require-dp": True}):
        state = tmp_path / str(len(extra))
        for kind in ("train", "evaluate"):
            reason = _refusal(_send(cfg, _site(site_folder, state, **extra), kind, name="off"))
            assert "requires DP-SGD" in reason and "privacy=off" in reason
        assert not (state / LEDGER_FILE).exists()  # nothing trained, nothing spent
    # a site that explicitly allows it trains without DP
    reply = _send(cfg, _site(site_folder, tmp_path / "ok", **{"require-dp": False}), name="off")
    assert reply.content[protocol.SITE][protocol.STATUS] == protocol.STATUS_OK


def test_a_server_that_knows_the_seed_cannot_replay_a_deployed_sites_noise(
        cfg, site_folder, tmp_path):
    """The run's seed is the server's: noise, Poisson batches or the noisy count drawn from it
    could be regenerated there and subtracted. Two deployed sites with the same data, asked
    with the same seed (and secure_noise=false), send different updates and counts; simulated
    sites, which keep the seed for reproducibility, send identical ones."""
    def update(reply: Message) -> dict:
        return reply.content[protocol.ARRAYS].to_torch_state_dict()

    def same(a: Message, b: Message) -> bool:
        return all(bool((update(a)[k] == update(b)[k]).all()) for k in update(a)) and \
            a.content[protocol.METRICS][protocol.NUM_EXAMPLES] == \
            b.content[protocol.METRICS][protocol.NUM_EXAMPLES]

    deployed = [_send(cfg, _site(site_folder, tmp_path / f"d{i}"), secure_noise=False)
                for i in range(2)]
    assert not same(*deployed)

    def simulated(i: int) -> Message:
        context = Context(run_id=RUN_ID, node_id=7, node_config={"partition-id": 0},
                          state=RecordDict(), run_config={})
        app = build_client_app({0: _site(site_folder, tmp_path / f"s{i}")})
        return app(message=_message(cfg, secure_noise=False), context=context)

    assert same(simulated(0), simulated(1))


def test_sigma_below_the_sites_floor_is_refused_and_a_planned_sigma_raised(
        cfg, site_folder, tmp_path):
    site = _site(site_folder, tmp_path / "a", **{"min-noise-multiplier": 2.0})
    reason = _refusal(_send(cfg, site, noise_multiplier=0.3, target_epsilon=None))
    assert "noise multiplier 0.3" in reason and "min_noise_multiplier 2" in reason
    # a target epsilon that would plan sigma < 2: the site trains with sigma = 2 instead
    reply = _send(cfg, site, target_epsilon=50.0)
    assert reply.content[protocol.SITE][protocol.STATUS] == protocol.STATUS_OK
    assert reply.content[protocol.PRIVACY]["noise_multiplier"] == 2.0
    ledger = PrivacyLedger.load(tmp_path / "a" / LEDGER_FILE)
    assert ledger.noise_multiplier == 2.0
    # a later round cannot lower it: sigma is fixed in the site's own ledger
    reply = _send(cfg, site, noise_multiplier=2.5, target_epsilon=None)
    assert PrivacyLedger.load(tmp_path / "a" / LEDGER_FILE).noise_multiplier == 2.0


def test_the_site_plans_sigma_from_its_own_budget(cfg, site_folder, tmp_path):
    site = _site(site_folder, tmp_path, **{"max-epsilon": 2.0})
    reply = _send(cfg, site, target_epsilon=40.0)  # the server proposes a weak guarantee
    ledger = reply.content[protocol.PRIVACY]
    assert ledger["max_epsilon"] == 2.0 and ledger["epsilon"] <= 2.0
    plan = site_settings(cfg).rounds
    weak = plan_ledger({**site_settings(cfg).privacy.as_dict(), "target_epsilon": 40.0}, 40, 32, 1,
                       plan, None)
    assert ledger["noise_multiplier"] > 2 * weak.noise_multiplier


@pytest.mark.parametrize("privacy, expected", [
    ({"max_grad_norm": 50.0}, "max_grad_norm 50"),
    ({"name": "dp-ish"}, "unknown privacy mode"),
    ({"count_noise": 0.0}, "noisy count"),
    ({"accountant": "moments"}, "unknown accountant"),
    ({"delta": 0.5, "max_grad_norm": 1.0}, None),  # delta < 1 is the server's to propose
])
def test_run_settings_outside_the_sites_policy_are_refused(cfg, site_folder, tmp_path,
                                                            privacy, expected):
    site = _site(site_folder, tmp_path, **{"max-grad-norm-range": "0.1,10"})
    reply = _send(cfg, site, **privacy)
    if expected is None:
        assert reply.content[protocol.SITE][protocol.STATUS] == protocol.STATUS_OK
    else:
        assert expected in _refusal(reply)


def test_models_and_tasks_the_site_does_not_allow_are_refused(cfg, site_folder, tmp_path):
    reason = _refusal(_send(cfg, _site(site_folder, tmp_path, **{"allowed-models": "logreg"})))
    assert "model 'mlp' is not among this site's allowed_models ['logreg']" in reason
    reason = _refusal(_send(cfg, _site(site_folder, tmp_path, **{"allowed-tasks": "vitals"})))
    assert "task 'tabular' is not among" in reason


def test_a_deployed_site_without_a_state_dir_fails_closed(cfg, site_folder, tmp_path):
    site = _site(site_folder, tmp_path)
    del site["state-dir"]
    reason = _refusal(_send(cfg, site))
    assert "no state_dir" in reason
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root ignores permissions
        assert "not writable" in _refusal(_send(cfg, _site(site_folder, read_only)))


def test_the_ledger_and_the_egress_log_are_the_sites_alone(cfg, site_folder, tmp_path):
    reply = _send(cfg, _site(site_folder, tmp_path / "state"))
    assert reply.content[protocol.SITE][protocol.STATUS] == protocol.STATUS_OK
    for name in (LEDGER_FILE, EGRESS_LOG):
        assert stat.S_IMODE((tmp_path / "state" / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


def test_an_error_reply_carries_no_patient_value_and_no_path(cfg, tmp_path, caplog):
    folder = tmp_path / "hospital_y"
    folder.mkdir()
    # a malformed record: the loader's error quotes the value and the file's path
    generator = get_generator("tabular")
    generator.generate_site(folder, cfg["task"], generator.site_profiles(cfg["task"], 1, 0)[0],
                            0)
    (data,) = [p for p in folder.iterdir() if p.is_file()]
    lines = data.read_text().splitlines()
    fields = lines[0].split(",")
    fields[2] = "987654321"  # chest-pain type: not one of its declared codes
    data.write_text("\n".join([",".join(fields), *lines[1:]]) + "\n")
    with caplog.at_level(logging.ERROR, logger="flwr.medsilo.egress"):
        reply = _send(cfg, _site(folder, tmp_path / "state"))
    assert reply.has_error()
    reason = reply.error.reason
    assert "987654321" not in reason and str(tmp_path) not in reason and "/" not in reason
    site, error_class = reason.split(" ")[:2]
    assert site == "hospital_x:" and error_class.isidentifier() and "[site error " in reason
    (entry,) = read_log(tmp_path / "state" / EGRESS_LOG)
    assert entry["kind"] == "error" and entry["reason"] == reason
    # the site's own log keeps the full text under the same code
    code = reason.split("[site error ")[1][:8]
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert code in logged
    assert any("987654321" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_only_a_noisy_count_of_the_site_leaves_and_it_is_charged(cfg):
    privacy = {**site_settings(cfg).privacy.as_dict(), "count_noise": 10.0}
    # two sites that differ in one patient and draw the same noise release the same numbers
    # whenever their noisy counts round alike; everything sent derives from that count
    a = plan_ledger(privacy, 400, 32, 1, 3, None, count_draw=0.3)
    b = plan_ledger(privacy, 401, 32, 1, 3, None, count_draw=0.2)
    assert a.released_count == b.released_count == 403
    assert (a.noise_multiplier, a.sample_rate) == (b.noise_multiplier, b.sample_rate)
    # ñ is charged when it first leaves (the first trained round) as the ledger's first
    # mechanism: (count_noise, q=1, one step), composed with DP-SGD by the accountant; the
    # planned total stays within the target
    assert a.history == [] and a.epsilon() == 0.0 and a.report()["sample_rate"] is None
    a.record_round(13 * 3)
    assert a.history == [(10.0, 1.0, 1), (a.noise_multiplier, a.sample_rate, 39)]
    assert a.steps == 39 and a.report()["sample_rate"] == a.sample_rate
    assert a.epsilon() <= privacy["target_epsilon"]
    alone = PrivacyLedger(accountant="rdp", delta=a.delta, noise_multiplier=a.noise_multiplier,
                          sample_rate=a.sample_rate)
    alone.record_round(13 * 3)
    assert a.epsilon() > alone.epsilon()  # the count is charged, not free
    again = PrivacyLedger.from_dict(json.loads(json.dumps(a.to_dict())))
    assert again.released_count == 403 and again.epsilon() == a.epsilon()


@pytest.mark.slow
def test_a_simulation_whose_sites_require_dp_refuses_privacy_off_end_to_end(tmp_path):
    """The issue's command: every simulated site refuses, the reason reaches report.json,
    report.md and the console, and no baseline trains on the sites' data either."""
    from tests.helpers import run_simulation_cli

    report = run_simulation_cli(tmp_path, "task=tabular", "privacy=off", "site.require_dp=true",
                                "num_hospitals=3", "rounds=1", "baselines=[local]")
    (only,) = report["rounds"]
    assert sorted(only["refused"]) == ["hospital_01", "hospital_02", "hospital_03"]
    assert all("requires DP-SGD" in why for why in only["refused"].values())
    assert not only["train"]
    assert report["baselines"]["computed"] is False
    assert "requires DP-SGD" in report["baselines"]["reason"]
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.count("this site requires DP-SGD (require_dp)") >= 3


def test_the_threat_model_document_names_only_attacks_tested_here():
    """docs/threat_model.md's attack table cites tests of this file; each must exist."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "threat_model.md").read_text(encoding="utf-8")
    cited = set(re.findall(r"`(test_\w+)`", doc))
    defined = set(re.findall(r"^def (test_\w+)", Path(__file__).read_text(), re.M))
    assert len(cited) >= 15 and cited <= defined, sorted(cited - defined)
