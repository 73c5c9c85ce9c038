"""What federation is worth: each hospital trained alone, and one model on all data pooled.

A federated model is only worth its protocol if it beats what a hospital gets by itself, and it
is judged against what pooling every record would give (possible only in simulation: the upper
reference). Both baselines are trained here, on the server's side of the simulation, after the
rounds, and land in report.json ``baselines`` (report.md: "Federated vs each hospital alone vs
pooled").

What makes the comparison fair (each point is a way it could silently stop being one):

- the same initial model as the federation (``server.app.initial_model``), model config and
  local training settings (the ``train`` settings the server sends every site);
- the same budget: ``rounds`` chunks of ``local_epochs`` passes over the training data, each
  chunk with a fresh optimizer as a federated site starts every round. *Local* is exactly a
  federation of one: round r at a hospital uses the seed its federated round r uses
  (``client.training.site_seed``);
- DP on or off as the run. With ``privacy=dp`` σ is planned once for the whole budget, exactly as
  a site plans it (``client.privacy_budget.plan_ledger``: its sample rate, δ from
  ``privacy.delta`` or the default for its own size), every step goes through a
  :class:`~privacy.accounting.PrivacyLedger`, and the ε reported is the accountant's. A round
  that would go past ``privacy.max_epsilon`` is declined, as the site would;
- the same test splits: each hospital's own (read by the same task loader the site uses), and
  for the pooled model also exactly the test pool of the federated global metrics
  (``simulations.global_evaluation.pooled_sites``).

FedProx's proximal term pulls a site towards the round's global model; a model trained alone
has none, so the baselines train without it. Tasks that normalise with a site's own training
statistics (tabular, vitals) keep doing so: the pooled set is the union of the records as each
hospital prepares them.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from client.evaluation import evaluate
from client.privacy_budget import plan_ledger, train_private_round
from client.tasks import SiteData, get_task
from client.training import (
    LocalTrainingConfig,
    local_training_config,
    resolve_device,
    site_seed,
    train_local,
)
from privacy.accounting import PrivacyLedger
from server import settings as run_settings
from server.app import initial_model
from server.report import client_mean
from server.site_summary import NEVER_TRAINED
from simulations.global_evaluation import pooled_sites

# The name the pooled model's seeds are derived from (site_seed), as a site's are from its id.
POOLED = "all sites pooled"


@dataclass(frozen=True)
class TrainedBaseline:
    """One baseline model done, for the console: ``site`` is None for the pooled model."""

    kind: str  # local | pooled
    site: str | None
    metrics: Mapping[str, float]  # on the site's own test split, or the global test pool
    privacy: Mapping[str, Any]
    seconds: float
    done: int
    total: int


OnTrained = Callable[[TrainedBaseline], None]


def training_config(cfg: Mapping[str, Any], train: TensorDataset) -> LocalTrainingConfig:
    """One round of local training, read from the ``train`` settings the server sends every
    site by the same function a site uses (client.training.local_training_config), with the
    class prior of ``train`` where logit adjustment is on; no proximal term (see module doc)."""
    return local_training_config(
        run_settings.site_settings(cfg).train, dp=cfg["privacy"]["name"] != "off",
        train_labels=train.tensors[-1].numpy(),
        num_classes=int(cfg["task"]["spec"]["num_classes"]),
        public_prior=cfg["task"].get("class_prior"))


def train_baseline(
    cfg: Mapping[str, Any], train: TensorDataset, seed_name: str, device: str
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A model trained on ``train`` alone for the federation's budget; returns it and its
    privacy entry (a DP ledger's report, or ``{"dp": False}``)."""
    with warnings.catch_warnings():
        # Opacus's PRV accountant sizes its numerical domain with an RDP bound and warns when
        # that bound's best order is the largest it tries: a looser domain, not a looser ε,
        # and on the server's console it would drown the progress lines.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return _train_baseline(cfg, train, seed_name, device)


def _train_baseline(
    cfg: Mapping[str, Any], train: TensorDataset, seed_name: str, device: str
) -> tuple[torch.nn.Module, dict[str, Any]]:
    config = training_config(cfg, train)
    rounds, seed = int(cfg["rounds"]), int(cfg["seed"])
    model = initial_model(cfg)
    ledger = _plan(cfg, len(train), config) if cfg["privacy"]["name"] != "off" else None
    for server_round in range(1, rounds + 1):
        round_seed = site_seed(seed, seed_name, server_round)
        if ledger is None:
            train_local(model, train, config, seed=round_seed, device=device)
            continue
        train_private_round(model, train, config, ledger, cfg["privacy"], seed=round_seed,
                            device=device)  # a round past max_epsilon is declined, as a site's
    if ledger is None:
        return model, {"dp": False}
    if ledger.steps == 0:  # every round declined: no records used, so no ε to claim
        return model, {**ledger.report(), "epsilon": None, "privacy": NEVER_TRAINED}
    return model, ledger.report()


def _plan(cfg: Mapping[str, Any], num_train: int, config: LocalTrainingConfig) -> PrivacyLedger:
    """σ for the whole budget at this training set's size and sample rate, as a site plans it
    (δ: ``privacy.delta``, else the default for ``num_train`` records)."""
    if num_train == 0:
        raise ValueError("DP-SGD needs at least one training record (the sample rate is "
                         "1 / number of batches)")
    privacy = dict(cfg["privacy"])
    budget = privacy.get("max_epsilon")
    return plan_ledger(privacy, num_train, config.batch_size, config.epochs, int(cfg["rounds"]),
                       float(budget) if budget is not None else None)


def _union(datasets: list[TensorDataset]) -> TensorDataset:
    """One dataset holding every record of ``datasets``, in order."""
    return TensorDataset(*(torch.cat(parts) for parts in zip(*(d.tensors for d in datasets))))


def _scored(model: torch.nn.Module, test: TensorDataset, num_classes: int, device: str
            ) -> dict[str, float]:
    return {**evaluate(model.to(device), test, num_classes, device=device),
            "num_examples": len(test)}


def compute_baselines(
    cfg: Mapping[str, Any],
    folders: Mapping[str, Path],
    kinds: tuple[str, ...] = run_settings.BASELINES,
    *,
    pool: list[str] | None = None,
    prepare: Callable[[str], Path] | None = None,
    on_trained: OnTrained | None = None,
) -> dict[str, Any]:
    """report.json ``baselines`` for ``kinds`` (some of ``local``, ``pooled``).

    ``pool``: the sites whose test splits the federated global metrics pool (default:
    ``pooled_sites(cfg, sites)``, as the simulation's global evaluation chooses them).
    ``prepare(site)`` first writes a synthetic site that does not exist yet.
    """
    started = time.perf_counter()
    task_cfg = cfg["task"]
    task = get_task(task_cfg["name"])
    num_classes = int(task_cfg["spec"]["num_classes"])
    device = resolve_device(str(cfg.get("device", "cpu")))
    pool = pooled_sites(cfg, list(folders)) if pool is None else list(pool)
    total = len(folders) * ("local" in kinds) + ("pooled" in kinds)
    done = 0

    def report_progress(kind: str, site: str | None, metrics: Mapping[str, float],
                        privacy: Mapping[str, Any], since: float) -> None:
        nonlocal done
        done += 1
        if on_trained is not None:
            on_trained(TrainedBaseline(kind, site, metrics, privacy,
                                       time.perf_counter() - since, done, total))

    data: dict[str, SiteData] = {}
    for site, folder in folders.items():
        if prepare is not None:
            prepare(site)
        data[site] = task.load_site(Path(folder), task_cfg, site)
    dp = cfg["privacy"]["name"] != "off"
    out: dict[str, Any] = {"computed": True, "kinds": list(kinds),
                           "epochs": int(cfg["rounds"]) * int(cfg["local_epochs"])}
    if "local" in kinds:
        sites, privacy = {}, {}
        for site, site_data in data.items():
            mark = time.perf_counter()
            model, privacy[site] = train_baseline(cfg, site_data.train, site, device)
            sites[site] = _scored(model, site_data.test, num_classes, device)
            report_progress("local", site, sites[site], privacy[site], mark)
        out["local"] = {"sites": sites, "client_mean": client_mean(sites),
                        "privacy": privacy if dp else {"dp": False}}
    if "pooled" in kinds:
        mark = time.perf_counter()
        train = _union([d.train for d in data.values()])
        model, privacy = train_baseline(cfg, train, POOLED, device)
        sites = {site: _scored(model, d.test, num_classes, device) for site, d in data.items()}
        pooled_global = _scored(model, _union([data[site].test for site in pool]), num_classes,
                                device)
        out["pooled"] = {"global": pooled_global, "sites": sites, "client_mean": client_mean(sites),
                         "num_train": len(train), "privacy": privacy}
        report_progress("pooled", None, pooled_global, privacy, mark)
    out["duration_s"] = round(time.perf_counter() - started, 3)
    return out


def run_baselines(
    folders: Mapping[str, Path],
    *,
    pool: list[str] | None = None,
    prepare: Callable[[str], Path] | None = None,
    on_trained: OnTrained | None = None,
) -> Callable[[Mapping[str, Any]], dict[str, Any] | None]:
    """The ServerApp's ``baselines`` hook for a simulation over ``folders``: called with the
    run's config after the rounds; None when the config turns baselines off. ``pool``: the
    sites the federated global evaluation pools (its ``sites``)."""

    def baselines(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
        kinds = run_settings.baseline_kinds(cfg)
        if not kinds:
            return None
        # the baselines train on the sites' data: only if the sites' own policy (site.<key>,
        # the same for every simulated site) accepts this run
        from client.policy import refusal_reason
        from client.site import SiteSettings

        first = next(iter(folders.values()))
        site = SiteSettings.from_node_config(
            {"data-path": str(first), **run_settings.site_node_config(cfg)}, simulation=True)
        if (reason := refusal_reason(site, run_settings.site_settings(cfg))) is not None:
            return {"computed": False, "kinds": list(kinds),
                    "reason": f"the sites' own policy refuses this run: {reason}"}
        return compute_baselines(cfg, folders, kinds, pool=pool, prepare=prepare,
                                 on_trained=on_trained)

    return baselines
