"""The ClientApp each hospital runs: receive the global model, train or evaluate, reply.

Handlers stay protocol-shaped and short; the work is done by plain functions in
``client/training.py`` and ``client/evaluation.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.evaluation import evaluate
from client.site import PARTITION_ID, SiteSettings
from client.tasks import SiteData, get_task
from client.training import LocalTrainingConfig, resolve_device, site_seed, train_local
from models import build_model
from privacy import protocol


@lru_cache(maxsize=64)
def _load_site_cached(task_name: str, data_path: str, task_json: str, site_id: str) -> SiteData:
    return get_task(task_name).load_site(Path(data_path), json.loads(task_json), site_id)


def load_site_data(site: SiteSettings, task_cfg: Mapping[str, Any]) -> SiteData:
    """Parse the site's files once per process (simulation actors serve many rounds)."""
    task_json = json.dumps(dict(task_cfg), sort_keys=True)
    return _load_site_cached(task_cfg["name"], str(site.data_path), task_json, site.site_id)


def _prepare(
    msg: Message, site: SiteSettings
) -> tuple[dict[str, Any], SiteData, torch.nn.Module, str]:
    if site.threads > 0:
        torch.set_num_threads(site.threads)
    settings = protocol.decode_run_settings(msg.content[protocol.CONFIG])
    task_cfg = settings["task"]
    data = load_site_data(site, task_cfg)
    model = build_model(settings["model"], get_task(task_cfg["name"]).input_spec(task_cfg))
    model.load_state_dict(msg.content[protocol.ARRAYS].to_torch_state_dict())
    return settings, data, model, resolve_device(site.device)


def _reply(msg: Message, site: SiteSettings, metrics: Mapping[str, float],
           model: torch.nn.Module | None = None) -> Message:
    content = RecordDict(
        {
            protocol.METRICS: MetricRecord(dict(metrics)),
            protocol.SITE: ConfigRecord({protocol.SITE_ID: site.site_id}),
        }
    )
    if model is not None:
        content[protocol.ARRAYS] = ArrayRecord(model.cpu().state_dict())
    return Message(content=content, reply_to=msg)


def build_client_app(
    simulated_sites: Mapping[int, Mapping[str, Any]] | None = None,
) -> ClientApp:
    """The ClientApp. ``simulated_sites`` maps a simulation partition-id to that site's node
    config; in deployment it is ``None`` and the SuperNode's own node config is used."""
    app = ClientApp()

    def site_of(context: Context) -> SiteSettings:
        node_config: Mapping[str, Any] = context.node_config
        if simulated_sites is not None:
            node_config = simulated_sites[int(node_config[PARTITION_ID])]
        return SiteSettings.from_node_config(node_config)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = site_of(context)
        settings, data, model, device = _prepare(msg, site)
        local = settings["train"]
        config = LocalTrainingConfig(
            epochs=int(local["local_epochs"]),
            batch_size=int(local["batch_size"]),
            lr=float(local["lr"]),
            momentum=float(local.get("momentum", 0.0)),
            optimizer=str(local.get("optimizer", "sgd")),
            weight_decay=float(local.get("weight_decay", 0.0)),
            proximal_mu=float(msg.content[protocol.CONFIG].get(protocol.PROXIMAL_MU, 0.0)),
        )
        seed = site_seed(int(settings["seed"]), site.site_id, settings["server_round"])
        result = train_local(model, data.train, config, seed=seed, device=device)
        metrics = {protocol.NUM_EXAMPLES: len(data.train), **result}
        return _reply(msg, site, metrics, model)

    @app.evaluate()
    def evaluate_global(msg: Message, context: Context) -> Message:
        site = site_of(context)
        _, data, model, device = _prepare(msg, site)
        metrics = evaluate(model.to(device), data.test, data.num_classes, device=device)
        return _reply(msg, site, {protocol.NUM_EXAMPLES: len(data.test), **metrics})

    return app


# Deployment entry point (pyproject [tool.flwr.app.components]).
app = build_client_app()
