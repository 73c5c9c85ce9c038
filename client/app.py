"""The ClientApp each hospital runs: receive the global model, train or evaluate, reply.

Handlers stay protocol-shaped and short; the work is done by plain functions in
``client/training.py`` and ``client/evaluation.py``. Before anything touches the site's data a
handler checks that the site accepts the run (an approved app version, the site's own task);
otherwise it replies with a refusal. Every reply, refusals and errors included, leaves through
``client/egress.py``, which logs it.

In deployment the SuperNode starts a fresh process for every message, and each imports this
module: the secure-aggregation stages that only exchange keys and shares, refusals and error
replies need no torch and must not wait seconds for it. So torch, the tasks' loaders and the
models are imported where a handler reads the site's data (``_prepare``), and the modules used
here (training, evaluation, the privacy ledger) import torch, scikit-learn and Opacus inside the
functions that train, evaluate or account (tests/test_import_cost.py holds this).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import egress
from client.evaluation import evaluate
from client.policy import apply_noise_floor, enforced_budget, refusal_reason, site_privacy
from client.privacy_budget import (
    count_noise_draw,
    load_ledger,
    plan_ledger,
    released_size,
    save_ledger,
    train_private_round,
)
from client.secure_aggregation import register_secure_aggregation
from client.site import (
    PARTITION_ID,
    SITE_CONFIG,
    SiteSettings,
    import_plugins,
    plugin_refusal,
    simulated_site_from_root,
)
from client.training import (
    LocalTrainingConfig,
    StepHook,
    TrainOutcome,
    local_training_config,
    resolve_device,
    site_seed,
    train_local,
)
from privacy import protocol
from privacy.run_settings import RunSettings

if TYPE_CHECKING:
    import torch

    from client.tasks import SiteData

# A child of Flower's logger: refusals show on the SuperNode's console like Flower's own lines.
log = logging.getLogger("flwr.medsilo.site")

SiteHandler = Callable[[Message, Context, SiteSettings], Message]


@lru_cache(maxsize=64)
def _load_site_cached(task_name: str, data_path: str, task_json: str, site_id: str) -> SiteData:
    from client.tasks import get_task

    return get_task(task_name).load_site(Path(data_path), json.loads(task_json), site_id)


def load_site_data(site: SiteSettings, task_cfg: Mapping[str, Any]) -> SiteData:
    """Parse the site's files once per process (simulation actors serve many rounds)."""
    task_json = json.dumps(dict(task_cfg), sort_keys=True)
    return _load_site_cached(task_cfg["name"], str(site.data_path), task_json, site.site_id)


def _prepare(
    msg: Message, site: SiteSettings, settings: RunSettings
) -> tuple[SiteData, torch.nn.Module, str]:
    import torch

    from client.tasks import get_task
    from models import build_model

    if site.threads > 0:
        torch.set_num_threads(site.threads)
    # the run's own model/task register on import, in this process (a Ray worker or a
    # deployed ClientApp process does not share the driver's imports); allowed by _refusal
    import_plugins(settings.plugins)
    task_cfg = settings.task
    data = load_site_data(site, task_cfg)
    model = build_model(settings.model, get_task(task_cfg["name"]).input_spec(task_cfg))
    model.load_state_dict(msg.content[protocol.ARRAYS].to_torch_state_dict())
    return data, model, resolve_device(site.device)


def _reply(
    msg: Message,
    context: Context,
    site: SiteSettings,
    metrics: Mapping[str, float],
    model: torch.nn.Module | None = None,
    *,
    ledger: Mapping[str, Any] | None = None,
    declined: str | None = None,
    refused: str | None = None,
    skipped: Mapping[str, int] | None = None,
    arrays: ArrayRecord | None = None,
    secagg: Mapping[str, Any] | None = None,
    kind: str | None = None,
    hospital_epsilon: float | None = None,
) -> Message:
    """The site's reply, built in one place and sent through the egress door.

    ``model`` (plain update) or ``arrays`` (e.g. a masked update) become the ``arrays`` record;
    ``secagg`` a secure-aggregation stage's record; ``kind`` names the content for the egress
    log (default: update / metrics; a decline or refusal always logs as such).
    """
    status: dict[str, Any] = {protocol.SITE_ID: site.site_id, protocol.STATUS: protocol.STATUS_OK}
    # counts only (never the records): what the site's loader left out and why
    status.update({f"{protocol.SKIPPED_PREFIX}{k}": int(v) for k, v in (skipped or {}).items()})
    if kind is None:
        kind = "update" if model is not None or arrays is not None else "metrics"
    if declined is not None:
        status.update({protocol.STATUS: protocol.STATUS_DECLINED, protocol.REASON: declined})
        kind = "privacy-ledger"
    if refused is not None:
        # every refusal (train, evaluate, a SecAgg stage) is logged at the site, here
        log.warning("site %s refuses %s: %s", site.site_id, msg.metadata.message_type, refused)
        status.update({protocol.STATUS: protocol.STATUS_REFUSED, protocol.REASON: refused})
        kind = "refusal"
    content = RecordDict(
        {
            protocol.METRICS: MetricRecord(dict(metrics)),
            protocol.SITE: ConfigRecord(status),
        }
    )
    if model is not None:
        content[protocol.ARRAYS] = ArrayRecord(model.cpu().state_dict())
    elif arrays is not None:
        content[protocol.ARRAYS] = arrays
    if ledger is not None:
        content[protocol.PRIVACY] = protocol.encode_ledger(ledger)
    if secagg is not None:
        content[protocol.SECAGG] = ConfigRecord(dict(secagg))
    return egress.send(msg, content, kind=kind, site=site, context=context,
                       hospital_epsilon=hospital_epsilon)


HOSPITAL_DP_ONLY_MASKED = (
    "privacy=site_dp: this site sends its update only as a noised share inside secure "
    "aggregation (the masked-input stage), never in a plain train reply")


def _refusal(site: SiteSettings, settings: RunSettings) -> str | None:
    """The site's policy (client/policy.py), then its plugins: checked before any data is read
    and before any plugin is imported."""
    return refusal_reason(site, settings) or plugin_refusal(site, settings.plugins)


def refuse(msg: Message, context: Context, site: SiteSettings, reason: str) -> Message:
    """A clear refusal the server reports; nothing of the site's data was read."""
    return _reply(msg, context, site, {protocol.NUM_EXAMPLES: 0}, refused=reason)


def _local_config(settings: RunSettings, msg: Message, data: SiteData, *,
                  dp: bool) -> LocalTrainingConfig:
    return local_training_config(
        settings.train, dp=dp, train_labels=data.train_labels, num_classes=data.num_classes,
        proximal_mu=float(msg.content[protocol.CONFIG].get(protocol.PROXIMAL_MU, 0.0)),
        public_prior=settings.task.get("class_prior"))


def train_with_dp(
    msg: Message, context: Context, site: SiteSettings, settings: RunSettings,
    data: SiteData, model: torch.nn.Module, device: str, step_hook: StepHook | None = None,
) -> TrainOutcome:
    """DP-SGD for one round, or a clear decline if the round would exceed the site's budget."""
    # the site's policy (client/policy.py): its own δ, its budget caps the target ε
    privacy_cfg = site_privacy(site, settings.privacy)
    config = _local_config(settings, msg, data, dp=True)
    server_round = settings.server_round
    seed = site_seed(settings.seed, site.site_id, server_round)
    ledger = load_ledger(site, context)
    if ledger is None:  # planned once, at this site's first DP round; σ fixed from then on
        try:
            ledger = plan_ledger(privacy_cfg, len(data.train), config.batch_size, config.epochs,
                                 settings.rounds,
                                 enforced_budget(site, privacy_cfg, None, planning=True),
                                 count_draw=count_noise_draw(seed, bool(privacy_cfg.get(
                                     "secure_noise", False))),
                                 # the server's δ is capped unless the site chose its own
                                 cap_delta=not site.simulated and site.delta is None)
        except RuntimeError as err:  # the budget cannot cover even the count release
            # nothing was released or trained: nothing is charged, the site declines
            budget = enforced_budget(site, privacy_cfg, None, planning=True)
            return TrainOutcome(
                None, {protocol.NUM_EXAMPLES: 0}, declined=(
                    f"round {server_round}: no noise multiplier keeps this site within its "
                    f"budget max_epsilon={budget} ({err})"),
                ledger={"accountant": privacy_cfg.get("accountant", "prv"),
                        "delta": privacy_cfg.get("delta"),  # None: not reported
                        "epsilon": 0.0, "max_epsilon": budget, "rounds_trained": 0,
                        "rounds_declined": 1, "epsilon_per_round": []})
        ledger.noise_multiplier = apply_noise_floor(site, ledger.noise_multiplier)
    else:
        ledger.max_epsilon = enforced_budget(site, privacy_cfg, ledger.max_epsilon,
                                             planning=False)
    result, declined = train_private_round(model, data.train, config, ledger, privacy_cfg,
                                           seed=seed, device=device, step_hook=step_hook)
    save_ledger(site, context, ledger)
    if result is None:
        return TrainOutcome(None, {protocol.NUM_EXAMPLES: 0}, ledger=ledger.report(),
                            declined=f"round {server_round} {declined}")
    # the weight the server sees is ñ, the noisy count charged to the ledger, never n
    metrics = {protocol.NUM_EXAMPLES: released_size(ledger, len(data.train)), **result}
    return TrainOutcome(model, metrics, ledger=ledger.report())


def train_round(
    msg: Message, context: Context, site: SiteSettings,
    step_hook_for: Callable[[str, int], StepHook | None] | None = None,
) -> TrainOutcome:
    """One local round on the global model in ``msg``: refused, declined, or trained (plain or
    DP-SGD). Shared by the plain ``train`` handler and secure aggregation's masked-input stage."""
    settings = protocol.decode_run_settings(msg.content[protocol.CONFIG])
    if (reason := _refusal(site, settings)) is not None:
        return TrainOutcome(None, {protocol.NUM_EXAMPLES: 0}, refused=reason)
    data, model, device = _prepare(msg, site, settings)
    step_hook = (step_hook_for(site.site_id, settings.server_round)
                 if step_hook_for is not None else None)
    if settings.privacy.name != "off":
        return train_with_dp(msg, context, site, settings, data, model, device, step_hook)
    seed = site_seed(settings.seed, site.site_id, settings.server_round)
    result = train_local(model, data.train, _local_config(settings, msg, data, dp=False), seed=seed,
                         device=device, step_hook=step_hook)
    return TrainOutcome(model, {protocol.NUM_EXAMPLES: len(data.train), **result})


def site_handler(
    site_of: Callable[[Context], SiteSettings],
    prepare_site: Callable[[str], Any] | None = None,
) -> Callable[[SiteHandler], Callable[[Message, Context], Message]]:
    """Turn ``handler(msg, context, site)`` into a Flower handler whose failures, too, leave
    only through the egress log (as the error reply Flower would have sent).
    ``prepare_site(site_id)`` runs first (simulation: write a synthetic site on first use)."""

    def decorate(handler: SiteHandler) -> Callable[[Message, Context], Message]:
        @functools.wraps(handler)
        def run(msg: Message, context: Context) -> Message:
            site = site_of(context)
            try:
                if prepare_site is not None:
                    # simulation: the site's synthetic generator may come from a plugin
                    import_plugins(site.plugins)
                    prepare_site(site.site_id)
                return handler(msg, context, site)
            except Exception as err:  # any failure becomes a logged error reply
                return egress.send_error(msg, err, site=site, context=context)

        return run

    return decorate


def build_client_app(
    simulated_sites: Mapping[int, Mapping[str, Any]] | None = None,
    *,
    step_hook_for: Callable[[str, int], StepHook | None] | None = None,
    prepare_site: Callable[[str], Any] | None = None,
) -> ClientApp:
    """The ClientApp. ``simulated_sites`` maps a simulation partition-id to that site's node
    config; in deployment it is ``None`` and the SuperNode's own node config (or the site
    configuration file it names) is used, with app approval required unless the site turns it
    off. Simulated sites skip approval unless their node config asks for it.
    ``step_hook_for(site_id, server_round)`` (simulation only: the privacy audit) gives the
    hook run at every local training step of that site and round, or None.
    ``prepare_site(site_id)`` (simulation only) writes a synthetic site's files the first time
    the site is asked for anything (simulations/sites.py)."""
    app = ClientApp()

    def site_of(context: Context) -> SiteSettings:
        node_config: Mapping[str, Any] = context.node_config
        if simulated_sites is not None:
            node_config = simulated_sites[int(node_config[PARTITION_ID])]
            return SiteSettings.from_node_config(node_config, simulation=True)
        if "data-path" not in node_config and SITE_CONFIG not in node_config \
                and PARTITION_ID in node_config:
            # `flwr run .` on Flower's simulation engine: virtual SuperNodes have only a
            # partition id; the i-th sub-folder of the run's data.root is site i.
            node_config = simulated_site_from_root(context.run_config, node_config)
            return SiteSettings.from_node_config(node_config, simulation=True)
        return SiteSettings.from_node_config(node_config)

    @app.train()
    @site_handler(site_of, prepare_site)
    def train(msg: Message, context: Context, site: SiteSettings) -> Message:
        if protocol.decode_run_settings(msg.content[protocol.CONFIG]).hospital_privacy \
                is not None:  # a plain train message would carry the update without the noise
            return refuse(msg, context, site, HOSPITAL_DP_ONLY_MASKED)
        outcome = train_round(msg, context, site, step_hook_for)
        return _reply(msg, context, site, outcome.metrics, outcome.model, ledger=outcome.ledger,
                      declined=outcome.declined, refused=outcome.refused)

    # secagg=on: the same training, reached through the four secure-aggregation stages
    register_secure_aggregation(
        app, site_handler(site_of, prepare_site),
        lambda msg, context, site: train_round(msg, context, site, step_hook_for), _reply,
        _refusal)

    @app.evaluate()
    @site_handler(site_of, prepare_site)
    def evaluate_global(msg: Message, context: Context, site: SiteSettings) -> Message:
        settings = protocol.decode_run_settings(msg.content[protocol.CONFIG])
        if (reason := _refusal(site, settings)) is not None:
            return refuse(msg, context, site, reason)
        data, model, device = _prepare(msg, site, settings)
        metrics = evaluate(model.to(device), data.test, data.num_classes, device=device)
        return _reply(msg, context, site, {protocol.NUM_EXAMPLES: len(data.test), **metrics},
                      skipped=data.skipped)

    return app


# Deployment entry point (pyproject [tool.flwr.app.components]).
app = build_client_app()
