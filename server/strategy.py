"""Strategies by name, all of them Flower's own (``flwr.serverapp.strategy``).

The only addition is :class:`RecordingMixin`: it records each site's metrics into the run
history and hands Flower the replies in site order, then lets Flower aggregate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi, Strategy

from server.history import RunHistory

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,  # the site adds the proximal term (client/training.py)
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
}


class TooFewSites(RuntimeError):
    """Fewer sites than ``min_sites`` trained in a round: the run stops cleanly."""


class RecordingMixin:
    history: RunHistory
    min_sites: int = 1
    last_arrays: ArrayRecord | None = None  # the global model sent out in the latest round

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        self.last_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ordered = self.history.record_replies(server_round, replies, stage="train")
        if len(ordered) < self.min_sites:
            record = self.history.round(server_round)
            raise TooFewSites(
                f"round {server_round}: {len(ordered)} site(s) trained, fewer than "
                f"min_sites={self.min_sites} (declined: {record.declined or 'none'}; "
                f"failed: {len(record.failures)})"
            )
        return super().aggregate_train(server_round, ordered)  # type: ignore[misc]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        ordered = self.history.record_replies(server_round, replies, stage="evaluate")
        aggregated = super().aggregate_evaluate(server_round, ordered)  # type: ignore[misc]
        # Flower's example-weighted mean of the sites' metrics: the "global" metrics where the
        # server has no pooled test set (deployment).
        self.history.round(server_round).site_weighted = dict(aggregated or {})
        return aggregated


def build_strategy(
    strategy_cfg: Mapping[str, Any], num_sites: int, history: RunHistory, min_sites: int = 1
) -> Strategy:
    """Flower's strategy ``strategy_cfg.name`` with the remaining keys as its arguments.

    The server waits until all ``num_sites`` hospitals are connected before the first round.
    """
    params = dict(strategy_cfg)
    name = params.pop("name")
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    base = STRATEGIES[name]
    recording = type(f"Recorded{base.__name__}", (RecordingMixin, base), {})
    fraction_train = float(params.get("fraction_train", 1.0))
    fraction_evaluate = float(params.get("fraction_evaluate", 1.0))
    params.setdefault("min_available_nodes", num_sites)
    params.setdefault("min_train_nodes", max(1, math.ceil(fraction_train * num_sites)))
    params.setdefault("min_evaluate_nodes", max(1, math.ceil(fraction_evaluate * num_sites)))
    strategy = recording(**params)
    strategy.history = history
    strategy.min_sites = min_sites
    return strategy
