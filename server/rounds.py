"""The federated round loop: Flower's ``Strategy.start``, made resumable and fault-tolerant.

The body of each round is Flower's own (configure_train → send_and_receive → aggregate_train →
configure_evaluate → send_and_receive → aggregate_evaluate → server-side evaluation). Two
things ``Strategy.start`` cannot do and a multi-day collaboration needs:

- start at round ``first_round`` with a restored model and strategy state, keeping the real
  round numbers (sites derive their seeds from them, FedAdam its bias correction), so a
  resumed run equals an uninterrupted one;
- skip a round that has too few usable updates (timeouts, failures, rejected updates) instead
  of ending the run, and stop cleanly only when declined privacy budgets make further rounds
  impossible.

``after_round`` is called once a round is complete (the checkpoint is written there).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.history import RunHistory
from server.strategy import TooFewSites

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
# How the training messages of a round are exchanged: Grid.send_and_receive, or the four
# stages of secure aggregation (server/secure_aggregation.py).
Exchange = Callable[[Grid, list[Message], float], list[Message]]


def plain_exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    return list(grid.send_and_receive(messages, timeout=timeout))


@dataclass
class RunOutcome:
    arrays: ArrayRecord
    stopped: str | None = None  # why the run ended before its last round, if it did


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    history: RunHistory,
    arrays: ArrayRecord,
    *,
    first_round: int,
    num_rounds: int,
    timeout: float,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    evaluate_fn: EvaluateFn | None = None,
    after_round: Callable[[int, ArrayRecord], None] | None = None,
    exchange: Exchange = plain_exchange,
) -> RunOutcome:
    if first_round == 1 and evaluate_fn is not None:
        evaluate_fn(0, arrays)
    for server_round in range(first_round, num_rounds + 1):
        started, clock = time.time(), time.perf_counter()
        messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
        history.round(server_round).started_at = started
        history.round(server_round).asked = len(messages)
        replies = exchange(grid, messages, timeout)
        history.record_timeouts(server_round, [m.metadata.dst_node_id for m in messages],
                                replies)
        try:
            aggregated, _ = strategy.aggregate_train(server_round, replies)
        except TooFewSites as err:
            history.round(server_round).skipped_round = str(err)
            if err.permanent:
                return RunOutcome(arrays, stopped=str(err))
            aggregated = None  # the global model stays as it was; the run goes on
        if aggregated is not None:
            arrays = aggregated
        messages = list(strategy.configure_evaluate(server_round, arrays, evaluate_config,
                                                    grid))
        if messages:
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            strategy.aggregate_evaluate(server_round, replies)
        if evaluate_fn is not None:
            evaluate_fn(server_round, arrays)
        history.round(server_round).duration_s = time.perf_counter() - clock
        if after_round is not None:
            after_round(server_round, arrays)
    return RunOutcome(arrays)
