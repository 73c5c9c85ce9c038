"""Strategies by name, all of them Flower's own (``flwr.serverapp.strategy``).

The only addition is :class:`RecordingMixin`: it records each site's metrics into the run
history and hands Flower the replies in site order, then lets Flower aggregate.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
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
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from privacy import protocol
from server.history import RunHistory
from server.secure_aggregation import is_secure_aggregate
from server.validation import UpdateBounds, check_update, reference_arrays

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


class TooFewSites(RuntimeError):
    """Fewer usable updates than ``min_sites`` in a round: the round is skipped.

    ``permanent`` when the sites that declined for their privacy budget alone leave fewer
    than ``min_sites`` (a spent budget never comes back): the run then stops cleanly.
    """

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


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


class RecordingMixin:
    history: RunHistory
    min_sites: int = 1
    bounds: UpdateBounds = UpdateBounds()
    secure_aggregation: bool = False
    last_arrays: ArrayRecord | None = None  # the global model sent out in the latest round
    # Per-round sampling (issue 9): None = every site. The sample is drawn from the sorted node
    # ids with a generator seeded by (seed, round, stage), so the same seed picks the same
    # sites (simulated node ids are seeded too: simulations/engine.py).
    num_sites: int = 1  # hospitals the server waits for before the first round
    sites_per_round: int | None = None
    sample_seed: int = 0
    final_round: int | None = None  # its evaluation asks every site (complete final table)

    def _sample(self, grid: Grid, server_round: int, stage: str) -> Grid:
        if self.sites_per_round is None:
            return grid
        # Flower's own wait until every hospital is connected (it samples none here)
        _, connected = sample_nodes(grid, self.num_sites, 0)
        nodes = sorted(connected)
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

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        # secagg=on: one server-made reply carries the unmasked mean; the sites' replies carry
        # only their status, loss and privacy ledger (server/secure_aggregation.py)
        secure = [msg for msg in replies if is_secure_aggregate(msg)]
        replies = [msg for msg in replies if not is_secure_aggregate(msg)]
        ordered = self.history.record_replies(server_round, replies, stage="train")
        if self.secure_aggregation:
            ordered = secure
        record = self.history.round(server_round)
        accepted = []
        reference = reference_arrays(self.last_arrays) if self.last_arrays is not None else None
        for msg in ordered:
            site = str(msg.content[protocol.SITE][protocol.SITE_ID])
            reason, norm = check_update(msg, reference, self.bounds)
            if norm is not None:
                record.update_norms[site] = norm
            if reason is None:
                accepted.append(msg)
            else:
                record.rejected[site] = reason
                record.train.pop(site, None)
        usable = len(accepted)
        if self.secure_aggregation:  # one aggregate stands for the sites it summed
            usable = len((record.secure_aggregation or {}).get("aggregated", [])) if accepted \
                else 0
        if usable < self.min_sites:
            # declined (privacy budget) sites will decline again; failed, rejected and late
            # ones may come back next round
            could_train = (len(replies) + len(record.timed_out) - len(record.declined)
                           - len(record.refused))
            raise TooFewSites(
                f"round {server_round}: {usable} usable update(s), fewer than "
                f"min_sites={self.min_sites} (declined: {record.declined or 'none'}; "
                f"refused: {record.refused or 'none'}; "
                f"rejected: {record.rejected or 'none'}; failed: {len(record.failures)}; "
                f"timed out: {record.timed_out or 'none'}; secure aggregation aborted: "
                f"{(record.secure_aggregation or {}).get('aborted') or 'no'})",
                permanent=could_train < self.min_sites,
            )
        arrays, metrics = super().aggregate_train(server_round, accepted)  # type: ignore[misc]
        return _same_dtypes(arrays, self.last_arrays), metrics

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

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        ordered = self.history.record_replies(server_round, replies, stage="evaluate")
        aggregated = super().aggregate_evaluate(server_round, ordered)  # type: ignore[misc]
        # Flower's example-weighted mean of the sites' metrics: the "global" metrics where the
        # server has no pooled test set (deployment).
        self.history.round(server_round).site_weighted = dict(aggregated or {})
        return aggregated


def _same_dtypes(arrays: ArrayRecord | None, like: ArrayRecord | None) -> ArrayRecord | None:
    """Flower's FedAdam/FedYogi return float64 arrays for a float32 model; the global model
    keeps the model's own dtypes (sites train float32, updates are validated against them)."""
    if arrays is None or like is None:
        return arrays
    dtypes = {k: a.numpy().dtype for k, a in like.items()}
    return ArrayRecord({k: Array(np.asarray(a.numpy(), dtype=dtypes.get(k)))
                        for k, a in arrays.items()})


def build_strategy(
    strategy_cfg: Mapping[str, Any], num_sites: int, history: RunHistory, min_sites: int = 1,
    bounds: UpdateBounds | None = None, *, sites_per_round: int | None = None, seed: int = 0,
    final_round: int | None = None,
) -> Strategy:
    """Flower's strategy ``strategy_cfg.name`` with the remaining keys as its arguments.

    The server waits until all ``num_sites`` hospitals are connected before the first round.
    ``sites_per_round`` (fewer than ``num_sites``): each round trains and evaluates a seeded
    sample of that many sites; the evaluation of round ``final_round`` (if any) asks every site.
    """
    params = dict(strategy_cfg)
    name = params.pop("name")
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    base = STRATEGIES[name]
    recording = type(f"Recorded{base.__name__}", (RecordingMixin, base), {})
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
    strategy = recording(**params)
    strategy.history = history
    strategy.min_sites = min_sites
    strategy.bounds = bounds or UpdateBounds()
    strategy.num_sites = num_sites
    if sampled:
        strategy.sites_per_round, strategy.sample_seed = sites_per_round, seed
        strategy.final_round = final_round
    return strategy
