"""Secure aggregation driven over Flower's Grid: the server learns only the sum of the updates.

With ``secagg=on`` the training exchange of a round (``server/rounds.py``) is not one ``train``
message per site but the five SecAgg stages (Bonawitz et al. 2017; SecAgg+ neighbour graph of
Bell et al. 2020 with ``secagg.neighbours``), each a ``train.<action>`` message answered by the
handlers in ``client/secure_aggregation.py``:

1. advertise keys (signed with each site's provisioned identity key) → 2. share keys
   (encrypted Shamir shares, routed, unreadable here) →
3. masked input: the site trains, then sends its clipped, weighted, quantized model delta
   masked with pairwise and self masks (privacy/secagg/update.py says exactly what) →
3b. consistency: every survivor signs the survivor set; a survivor that does not sign aborts
   the round (its self mask cannot be removed) →
4. unmask: survivors reveal what removes the masks of the sum, and nothing more.

The sites check everything routed here against the CA-signed roster (client/secure_aggregation
.py); this driver needs no roster. Which site took which index is what the sites signed.

Sites that drop (no answer within ``secagg.stage_timeout_s``, a decline for their privacy budget,
a failure) after sharing keys are recovered from the survivors' shares; with fewer than the
threshold the round aborts before anything is revealed, is reported, and the run continues.

What the strategy then sees is one reply marked ``protocol.SECURE_AGGREGATE``: the global model
plus the example-weighted mean delta, with the total example count. Flower's FedAvg, FedAdam,
FedYogi, FedProx aggregate it unchanged (the mean of one reply is itself). The per-site replies
of stage 3 (status, training loss, privacy ledger, never weights) go to the run history.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from privacy import protocol
from privacy.secagg import SecAggAborted, SecAggServer, setup
from privacy.secagg.update import decode_mean, mean_error_bound
from server.history import RunHistory, node_label


@dataclass(frozen=True)
class SecAggSettings:
    """``conf/secagg/on.yaml`` (its comments say what each value means)."""

    threshold: int | None
    neighbours: int | None
    clip: float
    max_site_examples: int
    stage_timeout_s: float

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SecAggSettings:
        return cls(threshold=cfg["threshold"], neighbours=cfg["neighbours"],
                   clip=float(cfg["clip"]), max_site_examples=int(cfg["max_site_examples"]),
                   stage_timeout_s=float(cfg["stage_timeout_s"]))


@dataclass
class SecureRoundRecord:
    aggregated: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    aborted: str | None = None
    upload_bytes: dict[str, int] = field(default_factory=dict)  # site -> all its stage replies
    plaintext_update_bytes: int = 0  # the fp32 model a plain round would upload per site
    error_bound: float | None = None  # max abs error per coordinate of the mean delta


class SecureAggregation:
    """``exchange(grid, train_messages, timeout)`` replaces ``grid.send_and_receive`` for the
    training step of a round."""

    def __init__(self, settings: SecAggSettings, history: RunHistory, seed: int) -> None:
        self.settings = settings
        self.history = history
        self.seed = seed

    def exchange(self, grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
        messages = sorted(messages, key=lambda msg: msg.metadata.dst_node_id)
        if not messages:
            return []
        template = messages[0]
        server_round = int(template.content[protocol.CONFIG].get(protocol.SERVER_ROUND, 0))
        record = SecureRoundRecord()
        try:
            return self._exchange(grid, messages, timeout, server_round, record)
        finally:
            self.history.round(server_round).secure_aggregation = asdict(record)

    def _exchange(self, grid: Grid, messages: list[Message], timeout: float, server_round: int,
                  record: SecureRoundRecord) -> list[Message]:
        template = messages[0]
        global_arrays: ArrayRecord = template.content[protocol.ARRAYS]
        plaintext = RecordDict({protocol.ARRAYS: global_arrays})
        record.plaintext_update_bytes = protocol.content_size(plaintext)[0]
        nodes = [msg.metadata.dst_node_id for msg in messages]
        index_of = {node: i for i, node in enumerate(nodes)}
        site_of: dict[int, str] = {}
        timeout = min(timeout, self.settings.stage_timeout_s)
        num_sites = len(nodes)

        def send(action: str, payloads: Mapping[int, RecordDict]) -> dict[int, Message]:
            """One stage: send to the listed participants, collect answers by index."""
            out = [Message(content, dst_node_id=nodes[i], message_type=f"train.{action}",
                           group_id=str(server_round))
                   for i, content in sorted(payloads.items())]
            received: dict[int, Message] = {}
            for reply in grid.send_and_receive(out, timeout=timeout):
                index = index_of.get(reply.metadata.src_node_id)
                if index is None:
                    continue
                if reply.has_error():
                    self.history.round(server_round).failures.append(
                        {"stage": f"train.{action}", "node_id": reply.metadata.src_node_id,
                         "reason": reply.error.reason})
                    continue
                site = str(reply.content[protocol.SITE][protocol.SITE_ID])
                site_of[index] = site
                self.history.node_sites[reply.metadata.src_node_id] = site
                record.upload_bytes[site] = (record.upload_bytes.get(site, 0)
                                             + protocol.content_size(reply.content)[0])
                received[index] = reply
            return received

        def fields(reply: Message) -> dict[str, Any]:
            return dict(reply.content[protocol.SECAGG]) if protocol.SECAGG in reply.content \
                else {}

        public = {protocol.SECAGG_CLIP: self.settings.clip,
                  protocol.SECAGG_MAX_EXAMPLES: self.settings.max_site_examples,
                  protocol.SECAGG_NUM_SITES: num_sites}
        site_replies: list[Message] = []
        try:
            plan = setup(num_sites, threshold=self.settings.threshold,
                         neighbours=self.settings.neighbours, seed=self.seed + server_round)
            server = SecAggServer(plan)
            configs = server.site_configs()
            replies = send(protocol.SECAGG_ADVERTISE_KEYS, {
                i: RecordDict({protocol.SECAGG: ConfigRecord({**config, **public}),
                               protocol.CONFIG: template.content[protocol.CONFIG]})
                for i, config in configs.items()})
            routed = server.route_public_keys(
                {i: fields(r) for i, r in replies.items() if _is_ok(r)}, drop_invalid=True)
            site_replies += [r for r in replies.values() if not _is_ok(r)]  # refusals
            replies = send(protocol.SECAGG_SHARE_KEYS, {
                i: RecordDict({protocol.SECAGG: ConfigRecord(msg)}) for i, msg in routed.items()})
            routed = server.route_shares({i: fields(r) for i, r in replies.items()},
                                         drop_invalid=True)
            replies = send(protocol.SECAGG_MASKED_INPUT, {
                i: RecordDict({protocol.SECAGG: ConfigRecord(msg),
                               protocol.ARRAYS: messages[i].content[protocol.ARRAYS],
                               protocol.CONFIG: messages[i].content[protocol.CONFIG]})
                for i, msg in routed.items()})
            masked = {i: r for i, r in replies.items() if _is_ok(r)
                      and protocol.ARRAYS in r.content}
            for reply in replies.values():  # status, loss, ledger: never the masked vector
                site_replies.append(_without_arrays(reply))
            shapes = [a.numpy().shape for a in global_arrays.values()]
            length = int(sum(np.prod(s) for s in shapes)) + 1
            checks = server.request_consistency(
                {i: fields(r) for i, r in masked.items()},
                {i: r.content[protocol.ARRAYS][protocol.MASKED_UPDATE].numpy()
                 for i, r in masked.items()},
                length, drop_invalid=True)
            replies = send(protocol.SECAGG_CONSISTENCY, {
                i: RecordDict({protocol.SECAGG: ConfigRecord(msg)}) for i, msg in checks.items()})
            requests = server.request_unmask({i: fields(r) for i, r in replies.items()},
                                             drop_invalid=True)
            replies = send(protocol.SECAGG_UNMASK, {
                i: RecordDict({protocol.SECAGG: ConfigRecord(msg)})
                for i, msg in requests.items()})
            total = server.unmask({i: fields(r) for i, r in replies.items()}, drop_invalid=True)
        except SecAggAborted as err:
            record.aborted = str(err)
            record.dropped = sorted(site_of.get(i, node_label(n)) for i, n in enumerate(nodes))
            return site_replies
        survivors = sorted(server.survivors)
        record.aggregated = sorted(site_of[i] for i in survivors)
        record.dropped = sorted(site_of.get(i, node_label(nodes[i]))
                                for i in range(num_sites) if i not in server.survivors)
        mean_delta, weight_sum = decode_mean(
            total, shapes, clip=self.settings.clip, num_sites=num_sites,
            num_summed=len(survivors))
        record.error_bound = mean_error_bound(clip=self.settings.clip, num_sites=num_sites,
                                              num_summed=len(survivors), weight_sum=weight_sum)
        new_arrays = ArrayRecord({
            key: Array(np.asarray(array.numpy() + delta, dtype=array.numpy().dtype))
            for (key, array), delta in zip(global_arrays.items(), mean_delta)})
        aggregate = RecordDict({
            protocol.ARRAYS: new_arrays,
            protocol.METRICS: MetricRecord({
                # Σ min(n_i, cap): whole numbers, recovered exactly from Σ w (error ~1e-9)
                protocol.NUM_EXAMPLES: int(round(weight_sum * self.settings.max_site_examples))}),
            protocol.SITE: ConfigRecord({protocol.SITE_ID: protocol.SECURE_AGGREGATE,
                                         protocol.STATUS: protocol.STATUS_OK}),
        })
        return [*site_replies,
                Message(content=aggregate, metadata=masked[survivors[0]].metadata)]


def _is_ok(reply: Message) -> bool:
    return reply.content[protocol.SITE].get(protocol.STATUS, protocol.STATUS_OK) \
        == protocol.STATUS_OK


def _without_arrays(reply: Message) -> Message:
    content = RecordDict({k: v for k, v in reply.content.items()
                          if k not in (protocol.ARRAYS, protocol.SECAGG)})
    return Message(content=content, metadata=reply.metadata)


def is_secure_aggregate(reply: Message) -> bool:
    return (not reply.has_error() and protocol.SITE in reply.content
            and reply.content[protocol.SITE].get(protocol.SITE_ID) == protocol.SECURE_AGGREGATE)

