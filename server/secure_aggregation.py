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

A site that refuses or does not answer the key advertisement leaves the round before anything is
shared: key agreement runs once more among the sites that sent keys, so the threshold fits the
sites that are there. Sites that drop later (no answer within ``secagg.stage_timeout_s``, or
the round timeout for the masked input, which trains first; a decline for their privacy budget;
a failure) are recovered from the survivors' shares; with fewer than the threshold the round
aborts before anything is revealed, is reported, and the run continues.

The result (:class:`SecureRound`) holds the sites' own replies of stage 3 (status, training
loss, privacy ledger, never weights) and refusals of stage 1, the stages' failures, what the
round cost (:class:`SecureRoundRecord`), and the aggregate: the global model plus the
example-weighted mean delta, with the total example weight. server/rounds.py records it and hands
the aggregate to the strategy (Flower's FedAvg, FedProx, FedAdam, FedYogi take it as the one
update of the round).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from privacy import protocol
from privacy.secagg import SecAggAborted, SecAggServer, setup
from privacy.secagg.update import decode_mean, mean_error_bound
from server.history import destinations, node_label, replier
from server.site_dp import HospitalPrivacy

_T = TypeVar("_T")


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
    """report.json ``rounds[].secure_aggregation``."""

    aggregated: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    aborted: str | None = None
    upload_bytes: dict[str, int] = field(default_factory=dict)  # site -> all its stage replies
    plaintext_update_bytes: int = 0  # the fp32 model a plain round would upload per site
    error_bound: float | None = None  # max abs error per coordinate of the mean delta
    update_norm: float | None = None  # ||aggregate - global model||, checked like a site's
    rejected: str | None = None  # why the server's update checks refused the aggregate
    # wall seconds of each stage (sending, the sites' answers, the server's own work on
    # them) and of decoding the sum: where a secure round's time goes
    stage_s: dict[str, float] = field(default_factory=dict)
    # privacy=site_dp: survivors summed, the round's clip, the noise report (server/site_dp.py)
    site_dp: dict[str, Any] | None = None


@dataclass
class SecureAggregate:
    """The unmasked result: the global model moved by the survivors' weighted mean delta."""

    arrays: ArrayRecord
    # Σ min(n_i, cap) over the survivors: whole numbers, recovered exactly from Σ w (~1e-9)
    total_weight: int


@dataclass
class SecureRound:
    """What the secure exchange of one round came to."""

    record: SecureRoundRecord | None = None  # None: no site was asked
    # the sites' own replies: refusals at stage 1; status, loss, ledger of stage 3 (no arrays)
    replies: list[Message] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)  # stage replies with errors
    node_sites: dict[int, str] = field(default_factory=dict)  # Flower node id -> site id
    aggregate: SecureAggregate | None = None  # None: the round aborted
    # site -> Flower's content id of its masked-input reply as it was sent: the id its egress
    # log holds (``replies`` above are stripped of the masked vector, so their ids differ)
    content_ids: dict[str, str] = field(default_factory=dict)
    timed_out: set[int] = field(default_factory=set)  # nodes that did not answer a stage in time


class SecureAggregation:
    """``exchange(grid, train_messages, timeout)`` replaces ``grid.send_and_receive`` for the
    training step of a round."""

    def __init__(self, settings: SecAggSettings, seed: int,
                 hospital_privacy: HospitalPrivacy | None = None) -> None:
        self.settings = settings
        self.seed = seed
        # privacy=site_dp: the sites send noised shares; decoded by server/site_dp.py
        self.hospital_privacy = hospital_privacy

    def exchange(self, grid: Grid, messages: Iterable[Message], timeout: float) -> SecureRound:
        messages = sorted(messages, key=lambda msg: msg.metadata.dst_node_id)
        if not messages:
            return SecureRound()
        # the key-agreement stages wait stage_timeout_s; the masked input (local training
        # first) as long as a plain round's train message
        stages = _Stages(self.settings, grid, messages, min(timeout, self.settings.stage_timeout_s),
                         train_timeout=timeout)
        stages.hospital_privacy = self.hospital_privacy
        try:
            total = stages.run(self.seed)
        except SecAggAborted as err:
            stages.abort(str(err))
            return stages.result
        stages.timed("decode", stages.finish, total)
        return stages.result


class _Stages:
    """The stages of one round, in order; each keeps what the server must remember."""

    def __init__(self, settings: SecAggSettings, grid: Grid, messages: list[Message],
                 timeout: float, train_timeout: float) -> None:
        self.settings, self.grid, self.messages = settings, grid, messages
        self.timeout, self.train_timeout = timeout, train_timeout
        self.template = messages[0]
        self.server_round = int(self.template.content[protocol.CONFIG].get(
            protocol.SERVER_ROUND, 0))
        self.global_arrays: ArrayRecord = self.template.content[protocol.ARRAYS]
        self.shapes = [a.numpy().shape for a in self.global_arrays.values()]
        self.nodes = [msg.metadata.dst_node_id for msg in messages]
        self.index_of = {node: i for i, node in enumerate(self.nodes)}
        self.site_of: dict[int, str] = {}
        self.content_id: dict[int, str] = {}  # index -> Flower's id of its reply, last stage
        self.record = SecureRoundRecord(
            plaintext_update_bytes=_plaintext_size(self.global_arrays))
        self.result = SecureRound(record=self.record)
        self.hospital_privacy: HospitalPrivacy | None = None

    def run(self, seed: int) -> np.ndarray:
        """All stages; the unmasked sum of the survivors' vectors."""
        routed = self.timed("advertise_keys", self.agree_on_keys, seed)
        routed = self.timed("share_keys", self.share_keys, routed)
        checks = self.timed("masked_input", self.masked_input, routed)
        requests = self.timed("consistency", self.consistency, checks)
        return self.timed("unmask", self.unmask, requests)

    def timed(self, stage: str, step: Callable[[Any], _T], arg: Any) -> _T:
        """``step(arg)``, its wall time recorded under ``stage``."""
        started = time.perf_counter()
        try:
            return step(arg)
        finally:
            self.record.stage_s[stage] = round(time.perf_counter() - started, 4)

    def send(self, action: str, payloads: Mapping[int, RecordDict],
             timeout: float | None = None) -> dict[int, Message]:
        """One stage: send to the listed participants, collect answers by index."""
        out = [Message(content, dst_node_id=self.nodes[i], message_type=f"train.{action}",
                       group_id=str(self.server_round))
               for i, content in sorted(payloads.items())]
        received: dict[int, Message] = {}
        answered: set[int] = set()
        self.content_id = {}
        replies = list(self.grid.send_and_receive(out, timeout=timeout or self.timeout))
        sent_to = destinations(out)  # message ids are set once the grid has pushed them
        for reply in replies:
            answered.add(replier(reply, sent_to))
            index = self.index_of.get(reply.metadata.src_node_id)
            if index is None:
                continue
            if reply.has_error():
                self.result.failures.append(
                    {"stage": f"train.{action}", "node_id": replier(reply, sent_to),
                     "reason": reply.error.reason})
                continue
            self._count(index, reply)
            received[index] = reply
        self.result.timed_out.update(self.nodes[i] for i in payloads
                                     if self.nodes[i] not in answered)
        return received

    def _count(self, index: int, reply: Message) -> None:
        site = str(reply.content[protocol.SITE][protocol.SITE_ID])
        self.site_of[index] = site
        self.result.node_sites[reply.metadata.src_node_id] = site
        # size and Flower's content id from one serialization (a masked update is 4 MB at 1M
        # parameters: hashing it twice, once per measure, cost the driver ~5 ms a site)
        size, _, self.content_id[index] = protocol.measure(reply.content)
        uploads = self.record.upload_bytes
        uploads[site] = uploads.get(site, 0) + size

    def agree_on_keys(self, seed: int) -> dict[int, dict[str, Any]]:
        """Stage 1, among every site asked; once more among those that sent keys if any
        refused or did not answer. The threshold t was chosen for all n asked: with a refusal
        (an unapproved app, a policy) it would leave the round no room for a dropout, and with
        a lost site it would wait for it again at every stage. Nothing secret was shared yet:
        the second key agreement is a new session, planned for the sites that are there."""
        keys = self.advertise_keys(seed)
        if len(keys) < len(self.nodes):
            if len(keys) < 2:
                raise SecAggAborted("advertise-keys", f"{len(keys)} of {len(self.nodes)} "
                                    "sites sent keys; secure aggregation needs at least 2",
                                    required=2, available=len(keys))
            self._keep(sorted(keys))
            keys = self.advertise_keys(seed)
        return self.server.route_public_keys(keys, drop_invalid=True)

    def _keep(self, indices: list[int]) -> None:
        """Only these participants from now on, renumbered 0..k-1 in the same order."""
        self.site_of = {new: self.site_of[old] for new, old in enumerate(indices)
                        if old in self.site_of}
        self.nodes = [self.nodes[i] for i in indices]
        self.messages = [self.messages[i] for i in indices]
        self.index_of = {node: i for i, node in enumerate(self.nodes)}

    def advertise_keys(self, seed: int) -> dict[int, dict[str, Any]]:
        """A new plan for the current participants; the key replies of those that sent keys."""
        threshold = self.settings.threshold
        if self.hospital_privacy is not None:  # every released sum needs the plan's survivors
            threshold = self.hospital_privacy.secagg_threshold(
                threshold, len(self.nodes), self.settings.neighbours)
        if threshold is not None and threshold > len(self.nodes):
            raise SecAggAborted("advertise-keys", f"{len(self.nodes)} sites take part, fewer "
                                f"than secagg.threshold={threshold}", required=threshold,
                                available=len(self.nodes))
        self.server = SecAggServer(setup(len(self.nodes), threshold=threshold,
                                         neighbours=self.settings.neighbours,
                                         seed=seed + self.server_round))
        public = {protocol.SECAGG_CLIP: self.settings.clip,
                  protocol.SECAGG_MAX_EXAMPLES: self.settings.max_site_examples,
                  protocol.SECAGG_NUM_SITES: len(self.nodes),
                  **(self.hospital_privacy.public_fields() if self.hospital_privacy else {})}
        config = self.template.content[protocol.CONFIG]
        replies = self.send(protocol.SECAGG_ADVERTISE_KEYS, {
            i: RecordDict({protocol.SECAGG: ConfigRecord({**site_config, **public}),
                           protocol.CONFIG: config})
            for i, site_config in self.server.site_configs().items()})
        self.result.replies += [r for r in replies.values() if not _is_ok(r)]  # refusals
        return {i: _fields(r) for i, r in replies.items() if _is_ok(r)}

    def share_keys(self, routed: Mapping[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        replies = self.send(protocol.SECAGG_SHARE_KEYS, _secagg_payloads(routed))
        return self.server.route_shares({i: _fields(r) for i, r in replies.items()},
                                        drop_invalid=True)

    def masked_input(self, routed: Mapping[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """The sites train and upload masked updates; the server keeps only their sum."""
        replies = self.send(protocol.SECAGG_MASKED_INPUT, {
            i: RecordDict({protocol.SECAGG: ConfigRecord(msg),
                           protocol.ARRAYS: self.messages[i].content[protocol.ARRAYS],
                           protocol.CONFIG: self.messages[i].content[protocol.CONFIG]})
            for i, msg in routed.items()}, timeout=self.train_timeout)
        masked = {i: r for i, r in replies.items() if _is_ok(r) and protocol.ARRAYS in r.content}
        # status, loss, ledger: never the masked vector
        self.result.replies += [_without_arrays(r) for r in replies.values()]
        # every reply send() returns was counted: its site and content id are known
        self.result.content_ids.update({self.site_of[i]: self.content_id[i] for i in replies})
        length = (self.hospital_privacy.vector_length if self.hospital_privacy
                  else int(sum(np.prod(s) for s in self.shapes)) + 1)
        return self.server.request_consistency(
            {i: _fields(r) for i, r in masked.items()},
            {i: masked_vector(r.content[protocol.ARRAYS][protocol.MASKED_UPDATE])
             for i, r in masked.items()},
            length, drop_invalid=True)

    def consistency(self, checks: Mapping[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        replies = self.send(protocol.SECAGG_CONSISTENCY, _secagg_payloads(checks))
        return self.server.request_unmask({i: _fields(r) for i, r in replies.items()},
                                          drop_invalid=True)

    def unmask(self, requests: Mapping[int, dict[str, Any]]) -> np.ndarray:
        replies = self.send(protocol.SECAGG_UNMASK, _secagg_payloads(requests))
        return self.server.unmask({i: _fields(r) for i, r in replies.items()},
                                  drop_invalid=True)

    def abort(self, reason: str) -> None:
        self.record.aborted = reason
        self.record.dropped = sorted(self.site_of.get(i, node_label(n))
                                            for i, n in enumerate(self.nodes))

    def finish(self, total: np.ndarray) -> None:
        """Decode the survivors' weighted mean delta and apply it to the global model."""
        record, num_sites = self.record, len(self.nodes)
        survivors = sorted(self.server.survivors)
        record.aggregated = sorted(self.site_of[i] for i in survivors)
        record.dropped = sorted(self.site_of.get(i, node_label(self.nodes[i]))
                                for i in range(num_sites) if i not in self.server.survivors)
        if self.hospital_privacy is not None:  # the unweighted noisy mean (DP-FedAvg)
            mean_delta, record.site_dp = self.hospital_privacy.decode(
                total, len(survivors), self.server_round, self.shapes)
            weight_sum = len(survivors) / self.settings.max_site_examples
        else:
            mean_delta, weight_sum = decode_mean(
                total, self.shapes, clip=self.settings.clip, num_sites=num_sites,
                num_summed=len(survivors))
            record.error_bound = mean_error_bound(
                clip=self.settings.clip, num_sites=num_sites, num_summed=len(survivors),
                weight_sum=weight_sum)
        arrays = ArrayRecord({
            key: Array(np.asarray(array.numpy() + delta, dtype=array.numpy().dtype))
            for (key, array), delta in zip(self.global_arrays.items(), mean_delta)})
        self.result.aggregate = SecureAggregate(
            arrays, int(round(weight_sum * self.settings.max_site_examples)))


_NUMPY_STYPE = Array(np.zeros(0, dtype=np.uint32)).stype  # how Array(ndarray) serializes


def masked_vector(array: Array) -> np.ndarray:
    """The masked vector a site sent: a read-only view of the bytes Flower delivered when they
    are what the site's ``Array(vector)`` writes (a 1-D little-endian uint32 .npy), else
    ``Array.numpy()`` (whose result the SecAgg server checks like any other). ``numpy()`` reads
    the bytes into a new array: 4 MB a site at 1M parameters, a few ms each on the driver,
    one site after another, at every round."""
    data = array.data
    if array.stype != _NUMPY_STYPE or not isinstance(data, bytes):
        return array.numpy()
    header = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(header)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran_order, dtype = read_header(header)
    except ValueError:  # not an .npy header numpy reads: numpy() says why
        return array.numpy()
    offset = header.tell()
    if (fortran_order or dtype != np.dtype("<u4") or len(shape) != 1
            or len(data) != offset + 4 * shape[0]):
        return array.numpy()
    return np.frombuffer(data, dtype="<u4", count=shape[0], offset=offset)


def _plaintext_size(arrays: ArrayRecord) -> int:
    """Bytes a plain round's upload of ``arrays`` would take (measured on a copy, so the global
    arrays that go to every site carry no cached chunk copies: ``protocol.unshared``)."""
    return protocol.content_size(RecordDict({protocol.ARRAYS: arrays}))[0]


def _secagg_payloads(messages: Mapping[int, dict[str, Any]]) -> dict[int, RecordDict]:
    return {i: RecordDict({protocol.SECAGG: ConfigRecord(msg)}) for i, msg in messages.items()}


def _fields(reply: Message) -> dict[str, Any]:
    return dict(reply.content[protocol.SECAGG]) if protocol.SECAGG in reply.content else {}


def _is_ok(reply: Message) -> bool:
    return reply.content[protocol.SITE].get(protocol.STATUS, protocol.STATUS_OK) \
        == protocol.STATUS_OK


def _without_arrays(reply: Message) -> Message:
    content = RecordDict({k: v for k, v in reply.content.items()
                          if k not in (protocol.ARRAYS, protocol.SECAGG)})
    return Message(content=content, metadata=reply.metadata)
