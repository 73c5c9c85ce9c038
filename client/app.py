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
from client.privacy_budget import load_ledger, plan_ledger, save_ledger, site_budget
from client.site import PARTITION_ID, SiteSettings, simulated_site_from_root
from client.tasks import SiteData, get_task
from client.training import (
    DPConfig,
    LocalTrainingConfig,
    dp_schedule,
    resolve_device,
    site_seed,
    train_local,
)
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


def _reply(
    msg: Message,
    site: SiteSettings,
    metrics: Mapping[str, float],
    model: torch.nn.Module | None = None,
    *,
    ledger: Mapping[str, Any] | None = None,
    declined: str | None = None,
    skipped: Mapping[str, int] | None = None,
) -> Message:
    status: dict[str, Any] = {protocol.SITE_ID: site.site_id, protocol.STATUS: protocol.STATUS_OK}
    # counts only (never the records): what the site's loader left out and why
    status.update({f"{protocol.SKIPPED_PREFIX}{k}": int(v) for k, v in (skipped or {}).items()})
    if declined is not None:
        status.update({protocol.STATUS: protocol.STATUS_DECLINED, protocol.REASON: declined})
    content = RecordDict(
        {
            protocol.METRICS: MetricRecord(dict(metrics)),
            protocol.SITE: ConfigRecord(status),
        }
    )
    if model is not None:
        content[protocol.ARRAYS] = ArrayRecord(model.cpu().state_dict())
    if ledger is not None:
        content[protocol.PRIVACY] = protocol.encode_ledger(ledger)
    return Message(content=content, reply_to=msg)


def _local_config(settings: Mapping[str, Any], msg: Message) -> LocalTrainingConfig:
    local = settings["train"]
    return LocalTrainingConfig(
        epochs=int(local["local_epochs"]),
        batch_size=int(local["batch_size"]),
        lr=float(local["lr"]),
        momentum=float(local.get("momentum", 0.0)),
        optimizer=str(local.get("optimizer", "sgd")),
        weight_decay=float(local.get("weight_decay", 0.0)),
        proximal_mu=float(msg.content[protocol.CONFIG].get(protocol.PROXIMAL_MU, 0.0)),
    )


def train_with_dp(
    msg: Message, context: Context, site: SiteSettings, settings: Mapping[str, Any],
    data: SiteData, model: torch.nn.Module, device: str,
) -> Message:
    """DP-SGD for one round, or a clear decline if the round would exceed the site's budget."""
    privacy_cfg, config = settings["privacy"], _local_config(settings, msg)
    ledger = load_ledger(site, context) or plan_ledger(
        privacy_cfg, len(data.train), config.batch_size, config.epochs,
        int(settings["plan"]["rounds"]), site_budget(site, privacy_cfg),
    )
    ledger.max_epsilon = site_budget(site, privacy_cfg)
    # q follows the site's current data; a changed q becomes a new accountant entry.
    ledger.sample_rate, steps = dp_schedule(len(data.train), config.batch_size, config.epochs)
    server_round = settings["server_round"]
    after = ledger.epsilon_after(steps)
    if ledger.max_epsilon is not None and after > ledger.max_epsilon:
        ledger.record_declined()
        save_ledger(site, context, ledger)
        reason = (f"round {server_round} would raise epsilon from {ledger.epsilon():.4g} to "
                  f"{after:.4g}, above this site's budget max_epsilon={ledger.max_epsilon:.4g}")
        return _reply(msg, site, {protocol.NUM_EXAMPLES: 0}, ledger=ledger.report(),
                      declined=reason)
    dp = DPConfig(noise_multiplier=ledger.noise_multiplier,
                  max_grad_norm=float(privacy_cfg["max_grad_norm"]),
                  secure_noise=bool(privacy_cfg.get("secure_noise", False)))
    seed = site_seed(int(settings["seed"]), site.site_id, server_round)
    result = train_local(model, data.train, config, seed=seed, device=device, dp=dp)
    if int(result["steps"]) != steps:  # the ledger must account for exactly what ran
        raise RuntimeError(f"DP-SGD ran {result['steps']} steps but {steps} were accounted")
    ledger.record_round(steps)
    save_ledger(site, context, ledger)
    metrics = {protocol.NUM_EXAMPLES: len(data.train), **result}
    return _reply(msg, site, metrics, model, ledger=ledger.report())


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
        elif "data-path" not in node_config and PARTITION_ID in node_config:
            # `flwr run .` on Flower's simulation engine: virtual SuperNodes have only a
            # partition id; the i-th sub-folder of the run's data.root is site i.
            node_config = simulated_site_from_root(context.run_config, node_config)
        return SiteSettings.from_node_config(node_config)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = site_of(context)
        settings, data, model, device = _prepare(msg, site)
        if settings.get("privacy", {}).get("name", "off") != "off":
            return train_with_dp(msg, context, site, settings, data, model, device)
        seed = site_seed(int(settings["seed"]), site.site_id, settings["server_round"])
        result = train_local(model, data.train, _local_config(settings, msg), seed=seed,
                             device=device)
        metrics = {protocol.NUM_EXAMPLES: len(data.train), **result}
        return _reply(msg, site, metrics, model)

    @app.evaluate()
    def evaluate_global(msg: Message, context: Context) -> Message:
        site = site_of(context)
        _, data, model, device = _prepare(msg, site)
        metrics = evaluate(model.to(device), data.test, data.num_classes, device=device)
        return _reply(msg, site, {protocol.NUM_EXAMPLES: len(data.test), **metrics},
                      skipped=data.skipped)

    return app


# Deployment entry point (pyproject [tool.flwr.app.components]).
app = build_client_app()
