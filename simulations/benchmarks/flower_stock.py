"""Flower stock, the many-sites benchmark's peer (simulations/benchmarks/many_sites.py).

``flwr.simulation.run_simulation`` with N virtual SuperNodes, Flower's own ``FedAvg`` sampling K
of them a round, and a ClientApp training an MLP of our model's shape on random tensors of a
synthetic site's size; nothing of medsilo runs. A module of its own so that the stock process
imports only this, Flower and torch (not the benchmark's rich, Hydra or our engine): its start-up
is what a stock Flower app's would be.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

STOCK_MARK = "flower-stock rounds: "  # the stock run's one line of results, on stderr


def stock_mlp(spec: dict[str, Any]):
    from torch import nn

    layers: list[nn.Module] = []
    width = spec["num_features"]
    for size in spec["hidden"]:
        layers += [nn.Linear(width, size), nn.Tanh() if spec["activation"] == "tanh"
                   else nn.ReLU()]
        if spec["dropout"] > 0:
            layers.append(nn.Dropout(spec["dropout"]))
        width = size
    return nn.Sequential(*layers, nn.Linear(width, spec["num_classes"]))


def flower_stock_apps(spec: dict[str, Any], num_sites: int, sites_per_round: int, rounds: int,
                      round_started_at: list[float]):
    """Flower's template app: a ClientApp that trains and evaluates on random tensors, a
    ServerApp running stock FedAvg. ``round_started_at`` gets the wall-clock start of each round
    (Strategy.start configures a round's training first thing in the round)."""
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    def site_data(context: Context, size: int, offset: int):
        generator = torch.Generator().manual_seed(context.node_id % 2**31 + offset)
        x = torch.randn(size, spec["num_features"], generator=generator)
        return x, torch.randint(0, spec["num_classes"], (size,), generator=generator)

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        model = stock_mlp(spec)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = site_data(context, spec["train_size"], 0)
        optimizer = (torch.optim.Adam if spec["optimizer"] == "adam"
                     else torch.optim.SGD)(model.parameters(), lr=spec["lr"])
        model.train()
        for _ in range(spec["local_epochs"]):
            for batch in torch.randperm(len(x)).split(spec["batch_size"]):
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
        metrics = MetricRecord({"train_loss": float(loss), "num-examples": len(x)})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": metrics}), reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        model = stock_mlp(spec)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = site_data(context, spec["test_size"], 1)
        model.eval()
        with torch.no_grad():
            logits = model(x)
        metrics = MetricRecord({
            "eval_loss": float(torch.nn.functional.cross_entropy(logits, y)),
            "eval_acc": float((logits.argmax(1) == y).float().mean()), "num-examples": len(x)})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    class TimedFedAvg(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            round_started_at.append(time.time())
            return super().configure_train(server_round, arrays, config, grid)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        fraction = sites_per_round / num_sites
        strategy = TimedFedAvg(fraction_train=fraction, fraction_evaluate=fraction,
                               min_train_nodes=sites_per_round,
                               min_evaluate_nodes=sites_per_round, min_available_nodes=num_sites)
        torch.manual_seed(spec["seed"])
        strategy.start(grid=grid, initial_arrays=ArrayRecord(stock_mlp(spec).state_dict()),
                       num_rounds=rounds)
        round_started_at.append(time.time())  # the end of the last round

    return server_app, client_app


def run_flower_stock(arguments: str) -> None:
    """The stock run's process (``python -c``): one ``run_simulation``, then one line on stderr
    with each round's wall-clock start and duration."""
    from flwr.simulation import run_simulation

    job = json.loads(arguments)
    marks: list[float] = []
    server_app, client_app = flower_stock_apps(job["spec"], job["num_sites"],
                                               job["sites_per_round"], job["rounds"], marks)
    run_simulation(server_app, client_app, num_supernodes=job["num_sites"], backend_config={
        "client_resources": {"num_cpus": job["spec"]["client_cpus"], "num_gpus": 0.0}})
    print(STOCK_MARK + json.dumps({"started_at": marks[:-1],
                                   "duration_s": [b - a for a, b in zip(marks, marks[1:])]}),
          file=sys.stderr, flush=True)
