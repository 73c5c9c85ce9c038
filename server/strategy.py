"""Strategies by name, all of them Flower's own (``flwr.serverapp.strategy``).

The only addition is :class:`ScreeningMixin`. It samples the sites of a round, reads the sites'
replies into explicit per-site results (:class:`SiteReplies`, :class:`TrainScreening`), checks
every update before aggregation, and hands Flower the accepted replies in site order; Flower
then aggregates (or, with secure aggregation, takes the one secure mean as its update). It writes
nothing: server/rounds.py writes what it returns into the round's record.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from privacy import protocol
from server.history import destinations, replier
from server.secure_aggregation import SecureAggregate
from server.validation import UpdateBounds, check_update, reference_arrays

log = logging.getLogger("flwr.medsilo.server")

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,  # the site adds the proximal term (client/training.py)
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    # Robust aggregation against a broken or hostile site (issue 8): coordinate-wise median,
    # trimmed mean (beta cut at each end), Krum (the update closest to its neighbours).
    "fedmedian": FedMedian,
    "trimmedavg": FedTrimmedAvg,
    "krum": Krum,
}

# Server-side optimiser state that must survive a restart (FedAdam/FedYogi moments).
STATEFUL_ATTRIBUTES = ("m_t", "v_t")


@dataclass
class SiteReplies:
    """What the sites' replies of one stage said, site by site."""

    answered: list[Message] = field(default_factory=list)  # sites that sent a usable status
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # sites that took part
    declined: dict[str, str] = field(default_factory=dict)  # privacy budget: site -> reason
    refused: dict[str, str] = field(default_factory=dict)  # the run itself: site -> reason
    failures: list[dict[str, Any]] = field(default_factory=list)  # replies carrying errors
    node_sites: dict[int, str] = field(default_factory=dict)  # Flower node id -> site id
    # site -> Flower's content id of its reply: the value the site's egress log holds
    received: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)  # records left out
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)  # ledger summaries
    count: int = 0  # replies received, failed ones included

    @property
    def ordered(self) -> list[Message]:
        """The replies of the sites that took part, sorted by site id: aggregation order (and so
        floating-point sums) does not depend on arrival order."""
        return sorted(self.answered, key=_site_of)


def read_replies(replies: Iterable[Message], stage: str,
                 sent: Iterable[Message] = ()) -> SiteReplies:
    """``sent``: the messages these replies answer (names the node of Flower's error replies)."""
    read, sent_to = SiteReplies(), destinations(sent)
    for msg in replies:
        read.count += 1
        if msg.has_error():
            read.failures.append({"stage": stage, "node_id": replier(msg, sent_to),
                                  "reason": msg.error.reason})
            continue
        status = msg.content[protocol.SITE]
        site = _site_of(msg)
        read.node_sites[msg.metadata.src_node_id] = site
        read.received[site] = msg.content.object_id
        skipped = {k[len(protocol.SKIPPED_PREFIX):]: int(v) for k, v in status.items()
                   if k.startswith(protocol.SKIPPED_PREFIX)}
        if skipped:
            read.skipped[site] = skipped
        if protocol.PRIVACY in msg.content:
            read.privacy[site] = protocol.decode_ledger(msg.content[protocol.PRIVACY])
        state = status.get(protocol.STATUS, protocol.STATUS_OK)
        if state == protocol.STATUS_DECLINED:
            read.declined[site] = str(status.get(protocol.REASON, "declined"))
            continue  # a declined site is left out of aggregation, never a zero update
        if state == protocol.STATUS_REFUSED:
            # e.g. the site has not approved this app version: it read none of its data
            read.refused[site] = str(status.get(protocol.REASON, "refused"))
            continue
        read.metrics[site] = {k: float(v) for k, v in msg.content[protocol.METRICS].items()}
        read.answered.append(msg)
    return read


def _site_of(msg: Message) -> str:
    return str(msg.content[protocol.SITE][protocol.SITE_ID])


@dataclass
class TrainScreening:
    """A round's training replies after validation: ``accepted`` go to Flower in site order."""

    replies: SiteReplies
    accepted: list[Message] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # site -> why its update was refused
    update_norms: dict[str, float] = field(default_factory=dict)  # site -> ||w_site - w_global||

    @property
    def trained(self) -> dict[str, dict[str, float]]:
        """Train metrics of the sites whose update was not rejected."""
        return {s: m for s, m in self.replies.metrics.items() if s not in self.rejected}


@dataclass
class SecureScreening:
    """The secure mean after validation: ``accepted`` None when it was rejected."""

    accepted: SecureAggregate | None
    update_norm: float | None
    rejected: str | None


class SampledGrid:
    """A view of Flower's Grid that shows only the sites sampled for one stage of a round; the
    strategy's own configure_train/configure_evaluate then address exactly those (everything
    else is Flower's Grid)."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._node_ids = grid, node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class TooFewSites(RuntimeError):
    """Fewer than ``min_sites`` hospitals are connected after waiting ``connect_timeout_s``:
    the run stops cleanly (server/rounds.py) instead of waiting for a site that is gone."""


class ScreeningMixin:
    bounds: UpdateBounds = UpdateBounds()
    # How long a round waits for sites to connect: before this process's first round for every
    # hospital (num_sites), later only while fewer than min_sites are connected. Never forever:
    # a lost SuperNode must not hang the federation (Flower's own sampling waits indefinitely).
    connect_timeout_s: float = 120.0
    min_sites: int = 1
    _waited_for_all: bool = False
    _min_nodes: tuple[int, int, int] = (1, 1, 1)  # Flower's minimums as configured
    last_arrays: ArrayRecord | None = None  # the global model sent out in the latest round
    # Per-round sampling (issue 9): None = every site. The sample is drawn from the sorted node
    # ids with a generator seeded by (seed, round, stage), so the same seed picks the same
    # sites (simulated node ids are seeded too: simulations/engine.py).
    num_sites: int = 1  # hospitals the server waits for before the first round
    sites_per_round: int | None = None
    sample_seed: int = 0
    final_round: int | None = None  # its evaluation asks every site (complete final table)

    def _connected(self, grid: Grid, server_round: int) -> list[int]:
        """The connected sites, after waiting at most ``connect_timeout_s`` (module above)."""
        wanted = self.min_sites if self._waited_for_all else self.num_sites
        deadline = time.monotonic() + self.connect_timeout_s
        while len(nodes := sorted(grid.get_node_ids())) < wanted \
                and time.monotonic() < deadline:
            log.info("round %d: %d of %d sites connected, waiting up to %.0f s more",
                     server_round, len(nodes), wanted, deadline - time.monotonic())
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        self._waited_for_all = True
        if len(nodes) < self.min_sites:
            raise TooFewSites(
                f"round {server_round}: {len(nodes)} of {self.num_sites} sites connected after "
                f"waiting connect_timeout_s={self.connect_timeout_s:g} s, fewer than "
                f"min_sites={self.min_sites}")
        if len(nodes) < self.num_sites:
            log.warning("round %d goes on with the %d of %d sites connected", server_round,
                        len(nodes), self.num_sites)
        # Flower's strategies wait (forever) for their configured minimums: no more than are here
        self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes = (
            min(n, len(nodes)) for n in self._min_nodes)
        return nodes

    def _sample(self, grid: Grid, server_round: int, stage: str) -> Grid:
        nodes = self._connected(grid, server_round)
        if self.sites_per_round is None:
            return SampledGrid(grid, nodes)
        if stage == "evaluate" and server_round == self.final_round:
            return SampledGrid(grid, nodes)
        draw = random.Random(f"medsilo-sample:{self.sample_seed}:{server_round}:{stage}")
        return SampledGrid(grid, sorted(draw.sample(nodes, min(self.sites_per_round,
                                                               len(nodes)))))

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        self.last_arrays = arrays
        grid = self._sample(grid, server_round, "train")
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        grid = self._sample(grid, server_round, "evaluate")
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]

    def _reference(self) -> dict[str, np.ndarray] | None:
        return reference_arrays(self.last_arrays) if self.last_arrays is not None else None

    def screen_train(self, replies: Iterable[Message], *, with_updates: bool = True,
                     sent: Iterable[Message] = ()) -> TrainScreening:
        """Read a round's training replies (to the messages ``sent``) and check every update
        against the global model. ``with_updates=False`` (secure aggregation): the replies
        carry status, loss and ledger only; the one update is the secure mean
        (:meth:`screen_secure`)."""
        screening = TrainScreening(read_replies(replies, stage="train", sent=sent))
        if not with_updates:
            return screening
        reference = self._reference()
        for msg in screening.replies.ordered:
            site = _site_of(msg)
            reason, norm = check_update(msg, reference, self.bounds)
            if norm is not None:
                screening.update_norms[site] = norm
            if reason is None:
                screening.accepted.append(msg)
            else:
                screening.rejected[site] = reason
        return screening

    def screen_secure(self, aggregate: SecureAggregate) -> SecureScreening:
        """The secure mean passes the same checks as a site's update."""
        reason, norm = check_update(_as_reply(aggregate), self._reference(), self.bounds)
        return SecureScreening(aggregate if reason is None else None, norm, reason)

    def aggregate_updates(self, server_round: int, accepted: list[Message]
                          ) -> ArrayRecord | None:
        """Flower's own aggregation of the accepted updates (in site order)."""
        arrays, _ = super().aggregate_train(server_round, accepted)  # type: ignore[misc]
        return _same_dtypes(arrays, self.last_arrays)

    def aggregate_secure(self, server_round: int, aggregate: SecureAggregate
                         ) -> ArrayRecord | None:
        """Flower's strategy takes the secure mean as the one update of the round: FedAvg and
        FedProx return it unchanged (the weighted mean of one update is itself), FedAdam and
        FedYogi take their server-side optimiser step from it."""
        return self.aggregate_updates(server_round, [_as_reply(aggregate)])

    def weighted_evaluation(self, server_round: int, answered: list[Message]
                            ) -> dict[str, float]:
        """Flower's example-weighted mean of the sites' metrics: the "global" metrics where the
        server has no pooled test set (deployment)."""
        aggregated = super().aggregate_evaluate(server_round, answered)  # type: ignore[misc]
        return dict(aggregated or {})

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Server-side optimiser state as flat ``attribute/key`` arrays (for checkpoints)."""
        state = {}
        for attribute in STATEFUL_ATTRIBUTES:
            for key, value in (getattr(self, attribute, None) or {}).items():
                state[f"{attribute}/{key}"] = np.asarray(value)
        return state

    def load_state_arrays(self, state: Mapping[str, np.ndarray]) -> None:
        for attribute in STATEFUL_ATTRIBUTES:
            values = {k.split("/", 1)[1]: np.asarray(v) for k, v in state.items()
                      if k.split("/", 1)[0] == attribute}
            if values:
                setattr(self, attribute, values)


def _as_reply(aggregate: SecureAggregate) -> Message:
    """The secure mean in the shape Flower's strategies aggregate: a model and its weight.
    Made here, for Flower's API only; it never passes through the exchange or the history."""
    return Message(RecordDict({
        protocol.ARRAYS: aggregate.arrays,
        protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: aggregate.total_weight}),
    }), dst_node_id=0, message_type="train")


def _same_dtypes(arrays: ArrayRecord | None, like: ArrayRecord | None) -> ArrayRecord | None:
    """Flower's FedAdam/FedYogi return float64 arrays for a float32 model; the global model
    keeps the model's own dtypes (sites train float32, updates are validated against them)."""
    if arrays is None or like is None:
        return arrays
    dtypes = {k: a.numpy().dtype for k, a in like.items()}
    return ArrayRecord({k: Array(np.asarray(a.numpy(), dtype=dtypes.get(k)))
                        for k, a in arrays.items()})


def build_strategy(
    strategy_cfg: Mapping[str, Any], num_sites: int,
    bounds: UpdateBounds | None = None, *, sites_per_round: int | None = None, seed: int = 0,
    final_round: int | None = None, min_sites: int = 1, connect_timeout_s: float = 120.0,
) -> Strategy:
    """Flower's strategy ``strategy_cfg.name`` with the remaining keys as its arguments.

    Before the first round the server waits up to ``connect_timeout_s`` for all ``num_sites``
    hospitals, later rounds only while fewer than ``min_sites`` are connected; then it goes on
    with those connected, or raises :class:`TooFewSites` (the run stops cleanly).
    ``sites_per_round`` (fewer than ``num_sites``): each round trains and evaluates a seeded
    sample of that many sites; the evaluation of round ``final_round`` (if any) asks every site.
    """
    params = dict(strategy_cfg)
    name = params.pop("name")
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    base = STRATEGIES[name]
    screening = type(f"Screened{base.__name__}", (ScreeningMixin, base), {})
    sampled = sites_per_round is not None and sites_per_round < num_sites
    if sampled:
        # the mixin shows Flower exactly the sampled sites (fraction 1: Flower takes them all;
        # server/settings.py refuses a fraction below 1 together with sites_per_round)
        params.update(min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)
    fraction_train = float(params.get("fraction_train", 1.0))
    fraction_evaluate = float(params.get("fraction_evaluate", 1.0))
    params.setdefault("min_available_nodes", num_sites)
    params.setdefault("min_train_nodes", max(1, math.ceil(fraction_train * num_sites)))
    params.setdefault("min_evaluate_nodes", max(1, math.ceil(fraction_evaluate * num_sites)))
    strategy = screening(**params)
    strategy.bounds = bounds or UpdateBounds()
    strategy.num_sites, strategy.min_sites = num_sites, min_sites
    strategy.connect_timeout_s = connect_timeout_s
    strategy._min_nodes = (strategy.min_available_nodes, strategy.min_train_nodes,
                           strategy.min_evaluate_nodes)
    if sampled:
        strategy.sites_per_round, strategy.sample_seed = sites_per_round, seed
        strategy.final_round = final_round
    return strategy
