"""The site's side of secure aggregation: five ``train.<action>`` handlers on the ClientApp.

The server drives the stages (server/secure_aggregation.py); the cryptography is in
``privacy/secagg/``. Between messages the site's secret state (its private keys until stage 3,
then the shares it holds) lives only in Flower's ``Context.state`` at the site. Every reply
leaves through ``client/egress.py`` like any other, with its content kind: ``secagg-keys``
(also the survivor-set signature of the consistency stage), ``secagg-shares``,
``masked-update`` and ``secagg-unmask``.

The site does not trust the server: it signs its keys with its provisioned identity key and
checks everyone else's against the CA-signed roster (site.toml ``identity_key``, ``roster``,
``ca_cert``; privacy/secagg/identity.py). Fail closed: a site without them refuses secure
aggregation, naming the missing setting, as it refuses a threshold below its floor.

Stage 3 trains exactly as a plain round does (the same function, DP-SGD and budget checks
included), then sends only the *masked* update: the model delta clipped to ``clip`` per
coordinate, weighted by ``min(1, n / max_site_examples)``, with that weight appended, quantized
into Z_2^32 and masked (privacy/secagg/update.py). A site that declines (privacy budget) or
refuses answers with its status and no vector; the others' sum is recovered without it.
With ``privacy=site_dp`` the vector is instead the site's noised share of hospital-level DP,
planned and checked by the site itself (client/site_dp.py), and no metric is sent in the clear.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client import site_dp
from client.site import SiteSettings
from client.training import TrainOutcome, site_seed
from privacy import protocol
from privacy.secagg import (
    IdentityError,
    SecAggProtocolError,
    SiteIdentity,
    advertise_keys,
    confirm_survivors,
    masked_input,
    share_keys,
    unmask,
)
from privacy.secagg.update import encode_difference, site_weight

STATE = "secagg-state"  # the site's protocol secrets, in Context.state (never sent)
PUBLIC = "secagg-public"  # the round's public encoding parameters, in Context.state


IDENTITY_SETTINGS = ("identity_key", "roster", "ca_cert")  # site.toml keys


def identity_refusal(site: SiteSettings) -> str | None:
    """Why this site cannot take part in secure aggregation at all, or None."""
    missing = [name for name in IDENTITY_SETTINGS if getattr(site, name) is None]
    if missing:
        return (f"secure aggregation needs this site's identity, but its settings lack "
                f"{', '.join(missing)} (site.toml: identity_key = the bundle's supernode.key, "
                "roster = roster.json, ca_cert = ca.crt, from `python -m server.provision`)")
    return None


def site_identity(site: SiteSettings) -> SiteIdentity:
    """The site's signing key and the CA-checked roster (IdentityError names a bad file)."""
    if (reason := identity_refusal(site)) is not None:
        raise IdentityError(reason)
    return SiteIdentity.load(site.site_id, site.identity_key, site.roster, site.ca_cert,
                             site.secagg_min_threshold)


TrainRound = Callable[[Message, Context, SiteSettings], TrainOutcome]
Reply = Callable[..., Message]  # client/app.py's reply builder: every reply goes through egress


def register_secure_aggregation(
    app: ClientApp,
    handler: Callable[[Callable[[Message, Context, SiteSettings], Message]],
                      Callable[[Message, Context], Message]],
    train_round: TrainRound,
    reply: Reply,
    refusal: Callable[[SiteSettings, dict[str, Any]], str | None],
) -> None:
    """Add the five SecAgg stage handlers to ``app``. ``handler`` wraps a site handler (site
    settings resolved, failures logged and replied through egress); ``refusal`` says why the
    site will not take part in this run (unapproved app, another task), or None."""

    def save(context: Context, state: dict[str, Any]) -> None:
        context.state[STATE] = ConfigRecord(state)

    def load(context: Context) -> dict[str, Any]:
        if STATE not in context.state:
            raise RuntimeError("secure aggregation message out of order: this site has no "
                               "protocol state for the round (did it restart mid-round?)")
        return dict(context.state[STATE])

    def fields(msg: Message) -> dict[str, Any]:
        return dict(msg.content[protocol.SECAGG])

    @app.train(protocol.SECAGG_ADVERTISE_KEYS)
    @handler
    def advertise(msg: Message, context: Context, site: SiteSettings) -> Message:
        # an unapproved app or another task: refuse before taking part at all
        settings = protocol.decode_run_settings(msg.content[protocol.CONFIG])
        if (reason := refusal(site, settings)) is not None:
            return reply(msg, context, site, {protocol.NUM_EXAMPLES: 0}, refused=reason)
        try:  # no identity, a bad roster, a threshold below the floor: refuse, say why
            identity = site_identity(site)
            received = fields(msg)
            public_keys = (protocol.SECAGG_CLIP, protocol.SECAGG_MAX_EXAMPLES,
                           protocol.SECAGG_NUM_SITES)
            public = {k: received.pop(k) for k in public_keys}
            if protocol.SITE_DP_CLIP in received:  # privacy=site_dp, adaptive clipping
                public[protocol.SITE_DP_CLIP] = float(received.pop(protocol.SITE_DP_CLIP))
            state, out = advertise_keys(received, identity)
        except (IdentityError, SecAggProtocolError) as err:
            return reply(msg, context, site, {protocol.NUM_EXAMPLES: 0}, refused=str(err))
        context.state[PUBLIC] = ConfigRecord(public)
        save(context, state)
        return reply(msg, context, site, {}, secagg=out, kind="secagg-keys")

    @app.train(protocol.SECAGG_MASKED_INPUT)
    @handler
    def masked(msg: Message, context: Context, site: SiteSettings) -> Message:
        state = load(context)
        settings = protocol.decode_run_settings(msg.content[protocol.CONFIG])
        if settings.hospital_privacy is not None:  # privacy=site_dp: checked before training
            reason = site_dp.round_refusal(settings.hospital_privacy, settings, state,
                                           site_dp.contributions(context.state),
                                           site_dp.pinned_plan(context.state))
            if reason is None:  # and its budget over all runs (its state_dir ledger)
                dim = sum(math.prod(a.shape) for a in msg.content[protocol.ARRAYS].values())
                reason = site_dp.lifetime_refusal(
                    site, site_dp.site_plan(settings.hospital_privacy, settings.rounds, dim))
            if reason is not None:
                del context.state[STATE]
                return reply(msg, context, site, {protocol.NUM_EXAMPLES: 0}, refused=reason)
        outcome = train_round(msg, context, site)
        if outcome.model is None:  # declined or refused: no vector, a dropout to the others
            del context.state[STATE]
            return reply(msg, context, site, outcome.metrics, ledger=outcome.ledger,
                         declined=outcome.declined, refused=outcome.refused)
        public = dict(context.state[PUBLIC])
        # the weights before and after training, in the global model's key order; the delta
        # (after − before in float64) is formed inside the encoding, block by block
        global_arrays = msg.content[protocol.ARRAYS]
        state_dict = outcome.model.cpu().state_dict()
        before = [array.numpy() for array in global_arrays.values()]
        after = [state_dict[key].numpy() for key in global_arrays.keys()]
        if settings.hospital_privacy is not None:
            delta = [np.subtract(new, old, dtype=np.float64) for new, old in zip(after, before)]
            # its own noise share (planned at the site); nothing about the round in the clear
            vector, plan = site_dp.encode_share(delta, site, settings,
                                                public.get(protocol.SITE_DP_CLIP))
            try:  # charged before it leaves; refused if another run charged it since the check
                site_dp.record_lifetime(site, settings, plan, context.run_id)
            except site_dp.ChargeRefused as err:
                del context.state[STATE]
                return reply(msg, context, site, {protocol.NUM_EXAMPLES: 0}, refused=str(err))
            site_dp.record_contribution(context.state, settings)
            metrics: dict[str, Any] = {}
            hospital_epsilon: float | None = plan.planned_epsilon
        else:
            weight = site_weight(int(outcome.metrics[protocol.NUM_EXAMPLES]),
                                 int(public[protocol.SECAGG_MAX_EXAMPLES]))
            # stochastic rounding need not be secret (the masks hide the update): seeded, so
            # the same seed gives the same aggregate
            seed = site_seed(settings.seed, site.site_id, settings.server_round) + 2
            vector, clipped = encode_difference(
                after, before, weight, clip=float(public[protocol.SECAGG_CLIP]),
                num_sites=int(public[protocol.SECAGG_NUM_SITES]), rng=seed)
            # the example count stays inside the masked sum: it is not sent in the clear
            metrics = {k: v for k, v in outcome.metrics.items() if k != protocol.NUM_EXAMPLES}
            metrics["secagg_clipped_fraction"] = clipped
            hospital_epsilon = None
        state, header, masked_vector = masked_input(state, fields(msg), vector)
        save(context, state)
        return reply(msg, context, site, metrics, ledger=outcome.ledger, secagg=header,
                     arrays=ArrayRecord({protocol.MASKED_UPDATE: Array(masked_vector)}),
                     kind="masked-update", hospital_epsilon=hospital_epsilon)

    def protocol_stage(stage: Callable[..., tuple[dict[str, Any], dict[str, Any]]],
                       kind: str) -> Callable[[Message, Context, SiteSettings], Message]:
        """A stage that only advances the protocol: state in, (state, reply fields) out."""
        def run(msg: Message, context: Context, site: SiteSettings) -> Message:
            state, out = stage(load(context), fields(msg), site_identity(site))
            save(context, state)
            return reply(msg, context, site, {}, secagg=out, kind=kind)
        return run

    # encrypted shares; a signature over the survivor set (public, like the keys); the shares
    # the server needs to remove the masks of the sum
    for action, stage, kind in ((protocol.SECAGG_SHARE_KEYS, share_keys, "secagg-shares"),
                                (protocol.SECAGG_CONSISTENCY, confirm_survivors,
                                 "secagg-consistency"),
                                (protocol.SECAGG_UNMASK, unmask, "secagg-unmask")):
        app.train(action)(handler(protocol_stage(stage, kind)))

