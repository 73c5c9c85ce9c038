"""The privacy audit of one federated run, on the real code path (issue 7).

One simulation (``simulations.run.simulate``: Flower's engine, the real ClientApp, DP-SGD, the
site's privacy ledger) with canaries planted at one auditing site, then four checks:

1. One-run canary audit (Steinke, Nasr, Jagielski 2023) at the auditing site, ε lower bound
   beside that site's accountant ε from its privacy ledger (report.json → privacy.<site>):
   - white-box: Dirac gradient canaries appended to Opacus's ``p.grad_sample`` at every local
     step of the site (``client.training.StepHook``), each included canary drawn at the loader's
     Poisson rate like a real record; score = the global model's descent along the canary's
     coordinate from the initial to the final global model;
   - black-box: canary records written into the site's training files in the task's own format
     (:mod:`.canary_records`); score = minus their loss under the final global model.
   Each canary is included with probability ½ for the whole run: it is one record of the site,
   so the site's (ε, δ) over all its rounds covers it, and FedAvg with the other sites is
   post-processing. A DP run must give ε_lb ≤ ε (at the stated confidence).
2. Membership inference on the final global model, per site: training records vs the site's
   held-out records; loss threshold, and offline LiRA with shadow models trained on held-out
   records set aside for them (never on the targets).
3. Gradient inversion of one training scan of the auditing site from its single-record update
   at the round-1 global model, as the server would see it: plaintext, DP-noised, SecAgg-masked.
4. The report (:mod:`.report`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from client.tasks import get_task
from client.training import LocalTrainingConfig, StepHook, train_local
from models import build_model
from server.app import initial_model
from server.settings import ConfigError
from simulations.audit.canary import GradientCanaries, canary_inclusion
from simulations.audit.canary_records import CanaryUnsupported, write_canary_site
from simulations.audit.inversion import (
    METHODS,
    dp_noised_gradient,
    masked_upload_view,
    reconstruct,
    record_gradient,
)
from simulations.audit.lower_bound import audit_epsilon
from simulations.audit.membership import (
    MembershipResult,
    calibrated_attack_scores,
    loss_attack_scores,
    membership_metrics,
)
from simulations.audit.report import AuditReport, CanaryCheck
from simulations.sites import site_folders

WHITE_BOX, BLACK_BOX = "white-box", "black-box"


class AuditAborted(RuntimeError):
    """The audited run gave nothing to audit (the auditing site never trained)."""


# --------------------------------------------------------------------------- settings


def check_audit_settings(audit: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the first bad ``audit.*`` value."""

    def check(ok: bool, key: str, expected: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"audit.{key}: expected {expected}, got {value!r}")

    canaries, membership = audit["canaries"], audit["membership"]
    inversion = audit["inversion"]
    for key in (WHITE_BOX, BLACK_BOX):
        m = canaries[key.replace("-", "_")]
        check(isinstance(m, int) and (m == 0 or m >= 2), f"canaries.{key.replace('-', '_')}",
              "0 (off) or an integer >= 2", m)
    guesses = canaries["guesses"]
    check(guesses is None or (isinstance(guesses, int) and guesses >= 2 and guesses % 2 == 0),
          "canaries.guesses", "null (sweep a grid) or an even integer >= 2", guesses)
    check(isinstance(canaries["clip_norm"], int | float) and canaries["clip_norm"] > 0,
          "canaries.clip_norm", "a number > 0", canaries["clip_norm"])
    check(isinstance(audit["seed"], int) and audit["seed"] >= 0, "seed", "an integer >= 0",
          audit["seed"])
    check(isinstance(audit["confidence"], float) and 0 < audit["confidence"] < 1, "confidence",
          "a number in (0, 1)", audit["confidence"])
    check(isinstance(audit["delta"], float) and 0 < audit["delta"] < 1, "delta",
          "a number in (0, 1)", audit["delta"])
    shadows = membership["shadow_models"]
    check(isinstance(shadows, int) and (shadows == 0 or shadows >= 2),
          "membership.shadow_models", "0 (loss attack only) or an integer >= 2", shadows)
    check(isinstance(inversion["enabled"], bool), "inversion.enabled", "true or false",
          inversion["enabled"])
    check(inversion["method"] in METHODS, "inversion.method", f"one of {list(METHODS)}",
          inversion["method"])
    check(isinstance(inversion["iterations"], int) and inversion["iterations"] >= 1,
          "inversion.iterations", "an integer >= 1", inversion["iterations"])
    # σ = 0 would label the plaintext update "dp-noised"
    check(isinstance(inversion["noise_multiplier"], int | float)
          and inversion["noise_multiplier"] > 0, "inversion.noise_multiplier", "a number > 0",
          inversion["noise_multiplier"])


# --------------------------------------------------------------------------- white-box canaries


class CanaryInjection:
    """One round of one site: called at every local step (``client.training.StepHook``).

    Under DP-SGD each sampled canary becomes one more row of ``p.grad_sample``, which the
    optimizer then clips, sums and noises like any record. Without DP there are no per-sample
    gradients: the canary is added to the batch-mean gradient as one more record (÷ batch size).
    """

    def __init__(self, canaries: GradientCanaries, included: np.ndarray, seed: int) -> None:
        self.canaries, self.included = canaries, included
        self.draws = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, sample_rate: float, batch_size: int) -> None:
        sampled = self.canaries.sample(self.included, sample_rate, self.draws)
        params = dict(model.named_parameters())
        if any(getattr(p, "grad_sample", None) is not None for p in params.values()):
            self.canaries.inject(model, sampled)
            return
        if not sampled:
            return
        for name, rows in self.canaries.rows(sampled).items():
            param = params[name]
            extra = rows.sum(dim=0).to(param.device, param.dtype) / max(batch_size, 1)
            param.grad = extra if param.grad is None else param.grad + extra


@dataclass(frozen=True)
class WhiteBoxCanaries:
    """``step_hook_for(site_id, server_round)`` of the run: injection at the auditing site only.

    Pickled to the simulation's Ray actors, so it holds only data; each (site, round) gets a
    fresh, deterministically seeded draw of which included canaries enter which step.
    """

    site_id: str
    canaries: GradientCanaries
    included: tuple[bool, ...]
    seed: int

    def __call__(self, site_id: str, server_round: int) -> StepHook | None:
        if site_id != self.site_id:
            return None
        return CanaryInjection(self.canaries, np.array(self.included, dtype=bool),
                               self.seed * 100_003 + server_round)


# --------------------------------------------------------------------------- scoring helpers


class RecordOutputs(nn.Module):
    """A model's logits on a fixed list of records, looked up by record index.

    The membership functions take one input tensor; tasks with several (values + masks, tokens +
    padding) are scored by handing them record indices and this table instead of the model.
    """

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.detach().float(), requires_grad=False)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.logits[index.long()]


@torch.no_grad()
def record_logits(model: nn.Module, records: Dataset, batch_size: int = 256) -> RecordOutputs:
    model.eval()
    chunks = [model(*inputs).float() for *inputs, _ in DataLoader(records, batch_size)]
    return RecordOutputs(torch.cat(chunks))


def record_labels(records: Dataset) -> torch.Tensor:
    return torch.cat([labels for *_, labels in DataLoader(records, batch_size=4096)]).long()


def _loaded(cfg: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    task = get_task(cfg["task"]["name"])
    model = build_model(cfg["model"], task.input_spec(cfg["task"]))
    model.load_state_dict(state_dict)
    return model.eval()


# --------------------------------------------------------------------------- the audit


@dataclass
class _Planted:
    """What the auditor planted before the run (inclusion never leaves the auditor)."""

    data_root: Path  # the run's data.root: symlinks to the sites, the auditing site rewritten
    probe: Path  # the black-box canary records, scored after the run
    included_black: np.ndarray | None  # which black-box canaries were planted (None: off)
    hooks: WhiteBoxCanaries | None  # the white-box gradient canaries (None: off)
    initial: nn.Module  # the server's round-1 global model
    clip: float  # the canaries' clipping norm: the run's C under DP


def _plant_canaries(audit: Mapping[str, Any], run_cfg: Mapping[str, Any],
                    folders: Mapping[str, Path], site: str, out_dir: Path,
                    notes: dict[str, str]) -> _Planted:
    """Black-box canary records written into the auditing site's copy, white-box gradient
    canaries drawn for its training steps; the other sites are linked unchanged."""
    seed, task_cfg = int(audit["seed"]), run_cfg["task"]
    data_root, probe = out_dir / "audit_sites", out_dir / "audit_probe"
    data_root.mkdir(parents=True, exist_ok=True)
    m_black = int(audit["canaries"]["black_box"])
    included_black = canary_inclusion(m_black, seed + 11) if m_black else None
    for name, folder in folders.items():
        target = data_root / name
        if name == site and included_black is not None:
            try:
                write_canary_site(task_cfg, folder, target, probe, included_black, seed + 12)
                continue
            except CanaryUnsupported as why:
                notes[BLACK_BOX] = f"skipped: {why}"
                included_black = None
        if not target.exists():
            os.symlink(Path(folder).resolve(), target, target_is_directory=True)
    if m_black == 0:
        notes[BLACK_BOX] = "off (audit.canaries.black_box=0)"
    initial = initial_model(run_cfg)  # the server's round-1 global model (same seed)
    dp = run_cfg["privacy"]["name"] != "off"
    clip = float(run_cfg["privacy"]["max_grad_norm"] if dp else audit["canaries"]["clip_norm"])
    m_white = int(audit["canaries"]["white_box"])
    hooks = None
    if m_white:
        canaries = GradientCanaries.for_model(initial, m_white, seed=seed + 21, clip_norm=clip)
        included_white = canary_inclusion(m_white, seed + 22)
        hooks = WhiteBoxCanaries(site, canaries, tuple(bool(b) for b in included_white),
                                 seed + 23)
    else:
        notes[WHITE_BOX] = "off (audit.canaries.white_box=0)"
    return _Planted(data_root, probe, included_black, hooks, initial, clip)


def _score_canaries(report: AuditReport, planted: _Planted, before: Mapping[str, torch.Tensor],
                    final: nn.Module, run_cfg: Mapping[str, Any], audit: Mapping[str, Any],
                    site: str, delta: float, claimed: float | None,
                    timings: dict[str, float]) -> None:
    """ε lower bounds from the canaries the final model remembers (white box, then black)."""
    guesses = audit["canaries"]["guesses"]
    grid = None if guesses is None else (int(guesses),)
    confidence = float(audit["confidence"])
    mark = time.perf_counter()
    if planted.hooks is not None:
        scores = planted.hooks.canaries.scores(before, final.state_dict())
        report.canaries.append(CanaryCheck(site, WHITE_BOX, audit_epsilon(
            scores, np.array(planted.hooks.included), delta, confidence=confidence, grid=grid),
            claimed))
        timings["canaries_white_box_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
    if planted.included_black is not None:
        m_black = len(planted.included_black)
        task_cfg = run_cfg["task"]
        canary_records = get_task(task_cfg["name"]).load_site(planted.probe, task_cfg, site).test
        if len(canary_records) != m_black:
            raise RuntimeError(f"the probe site holds {len(canary_records)} canaries, "
                               f"expected {m_black}")
        table = record_logits(final, canary_records)
        scores = loss_attack_scores(table, torch.arange(m_black), record_labels(canary_records))
        report.canaries.append(CanaryCheck(site, BLACK_BOX, audit_epsilon(
            scores, planted.included_black, delta, confidence=confidence, grid=grid), claimed))
        timings["canaries_black_box_s"] = time.perf_counter() - mark


def _invert(report: AuditReport, planted: _Planted, run_cfg: Mapping[str, Any],
            audit: Mapping[str, Any], folders: Mapping[str, Path], site: str,
            ledger: Mapping[str, Any], notes: dict[str, str], timings: dict[str, float]) -> None:
    """Reconstruct one training record from a single-record update (DP-noised under DP)."""
    if not audit["inversion"]["enabled"]:
        notes["inversion"] = "off (audit.inversion.enabled=false)"
        return
    mark = time.perf_counter()
    sigma = float(ledger["noise_multiplier"]) if ledger.get("dp") \
        else float(audit["inversion"]["noise_multiplier"])
    outcome = invert_one_update(run_cfg, planted.initial, folders[site], site,
                                audit["inversion"], planted.clip, sigma, int(audit["seed"]))
    if isinstance(outcome, str):
        notes["inversion"] = outcome
    else:
        report.inversion_truth, report.inversion = outcome
        notes["inversion"] = (f"record 0 of {site}'s training split, single-record update "
                              f"at the round-1 global model; DP-noised: C={planted.clip:g}, "
                              f"σ={sigma:.4g}; the attacker is given the true label")
    timings["inversion_s"] = time.perf_counter() - mark


def _rounds_trained(run_report: Mapping[str, Any], site: str, federated_dir: Path) -> int:
    """Rounds the auditing site trained; none would pass every canary check vacuously."""
    rounds_trained = sum(site in r.get("train", {}) for r in run_report.get("rounds", []))
    if rounds_trained == 0:
        reasons = {f["reason"][:200] for r in run_report.get("rounds", [])
                   for f in r.get("failures", [])}
        raise AuditAborted(f"the auditing site {site} trained in no round of the run, so "
                           f"nothing can be audited; failures: {sorted(reasons) or 'none'} "
                           f"(see {federated_dir / 'report.md'})")
    return rounds_trained


def run_audit(cfg: Mapping[str, Any], out_dir: Path) -> AuditReport:
    """Run the federated simulation with canaries and every check; returns the report (the
    caller writes it with :func:`~simulations.audit.report.write_audit_report`)."""
    from simulations.run import simulate

    started = time.perf_counter()
    out_dir = Path(out_dir)
    audit = cfg["audit"]
    check_audit_settings(audit)
    run_cfg = {k: v for k, v in cfg.items() if k != "audit"}
    if run_cfg.get("resume"):
        raise ConfigError("resume: an audit is one whole run from the initial model; got "
                          f"resume={run_cfg['resume']!r}")
    folders = site_folders(run_cfg)
    site = audit["site"] or next(iter(folders))
    if site not in folders:
        raise ConfigError(f"audit.site: expected one of {list(folders)}, got {site!r}")
    notes: dict[str, str] = {}
    timings: dict[str, float] = {}

    # Canaries, planted before the run. The auditor keeps the seeds: inclusion never leaves here.
    planted = _plant_canaries(audit, run_cfg, folders, site, out_dir, notes)
    before = {k: v.detach().clone() for k, v in planted.initial.state_dict().items()}
    federated_dir = out_dir / "federated"
    fed_cfg = {**run_cfg, "data": {**run_cfg["data"], "root": str(planted.data_root),
                                   "path": None},
               "baselines": []}  # the audit asks about privacy, not what federation is worth
    mark = time.perf_counter()
    timings["setup_s"] = mark - started  # canary records written, canaries drawn
    run_report = simulate(fed_cfg, federated_dir, step_hook_for=planted.hooks)
    timings["federated_run_s"] = time.perf_counter() - mark
    rounds_trained = _rounds_trained(run_report, site, federated_dir)
    saved = torch.load(federated_dir / "model.pt", map_location="cpu", weights_only=True)
    final = _loaded(run_cfg, saved["state_dict"])
    ledger = run_report.get("privacy", {}).get(site, {})
    claimed = float(ledger["epsilon"]) if ledger.get("dp") else None
    delta = float(ledger["delta"]) if ledger.get("dp") else float(audit["delta"])

    report = AuditReport()
    # The canary audits cost the run above plus this scoring (the canaries ride along in it).
    _score_canaries(report, planted, before, final, run_cfg, audit, site, delta, claimed,
                    timings)
    mark = time.perf_counter()
    report.membership = membership_inference(run_cfg, final, folders,
                                             int(audit["membership"]["shadow_models"]),
                                             int(audit["seed"]))
    timings["membership_s"] = time.perf_counter() - mark
    _invert(report, planted, run_cfg, audit, folders, site, ledger, notes, timings)

    timings["total_s"] = time.perf_counter() - started
    report.run = {
        "task": run_cfg["task"]["name"], "model": run_cfg["model"]["name"],
        "privacy": run_cfg["privacy"]["name"], "secagg": run_cfg["secagg"]["name"],
        "rounds": run_cfg["rounds"], "sites": list(folders), "auditing_site": site,
        "auditing_site_rounds_trained": rounds_trained,
        "accountant_epsilon": claimed, "delta": delta, "site_ledger": ledger,
        "federated_run": str(federated_dir), "final_global": run_report["final"]["global"],
        "notes": notes, "timings_s": timings, "audit": dict(audit),
    }
    return report


def membership_inference(cfg: Mapping[str, Any], model: nn.Module, folders: Mapping[str, Path],
                         shadow_models: int, seed: int) -> dict[str, list[MembershipResult]]:
    """Per site: its training records (members) vs its held-out records (non-members).

    With shadow models, each site's held-out split is halved at random: one half stays the
    non-member targets, the other half (of every site, pooled) trains the shadow models, which
    thus never see a target (offline LiRA needs only such "out" models). Shadow models train
    centrally without DP for rounds × local_epochs epochs with the sites' local settings.
    """
    task = get_task(cfg["task"]["name"])
    sites = {name: task.load_site(folder, cfg["task"], name) for name, folder in folders.items()}
    rng = np.random.default_rng([seed, 31])
    targets_out: dict[str, Dataset] = {}
    shadow_pool: list[Dataset] = []
    for name, data in sites.items():
        order = rng.permutation(len(data.test))
        if shadow_models:
            half = len(order) // 2
            targets_out[name] = Subset(data.test, order[:half].tolist())
            shadow_pool.append(Subset(data.test, order[half:].tolist()))
        else:
            targets_out[name] = data.test
    shadows = _train_shadow_models(cfg, ConcatDataset(shadow_pool), shadow_models, seed) \
        if shadow_models else []
    results: dict[str, list[MembershipResult]] = {}
    for name, data in sites.items():
        targets = ConcatDataset([data.train, targets_out[name]])
        members = len(data.train)
        if len(targets) == members:
            continue  # no held-out records: nothing to compare with
        index, labels = torch.arange(len(targets)), record_labels(targets)
        loss = loss_attack_scores(record_logits(model, targets), index, labels)
        results[name] = [membership_metrics(loss[:members], loss[members:], attack="loss")]
        if shadows:
            calibrated = calibrated_attack_scores(
                record_logits(model, targets), [record_logits(s, targets) for s in shadows],
                index, labels)
            results[name].append(membership_metrics(
                calibrated[:members], calibrated[members:],
                attack=f"calibrated (offline LiRA, {len(shadows)} shadows)"))
    return results


def _train_shadow_models(cfg: Mapping[str, Any], pool: Dataset, count: int,
                         seed: int) -> list[nn.Module]:
    task = get_task(cfg["task"]["name"])
    local = LocalTrainingConfig(
        epochs=int(cfg["rounds"]) * int(cfg["local_epochs"]), batch_size=int(cfg["batch_size"]),
        lr=float(cfg["lr"]), momentum=float(cfg["momentum"]), optimizer=str(cfg["optimizer"]))
    models = []
    for k in range(count):
        chosen = np.random.default_rng([seed, 37, k]).permutation(len(pool))[:len(pool) // 2]
        torch.manual_seed(seed * 1_000 + k)
        shadow = build_model(cfg["model"], task.input_spec(cfg["task"]))
        train_local(shadow, Subset(pool, chosen.tolist()), local, seed=seed * 1_000 + k)
        models.append(shadow.eval())
    return models


class FromPixels(nn.Module):
    """The attacker works in pixel space [0, 1]; the images task feeds the model pixels scaled
    to [-1, 1] (client/tasks/images.py). No parameters: gradients are the model's own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels * 2.0 - 1.0)


def invert_one_update(cfg: Mapping[str, Any], global_model: nn.Module, folder: Path, site: str,
                      settings: Mapping[str, Any], clip: float, sigma: float, seed: int
                      ) -> tuple[torch.Tensor, dict] | str:
    """(true image, {case: Reconstruction}) or why inversion does not apply to this task."""
    if cfg["task"]["name"] != "images":
        return (f"skipped: gradient inversion is measured on scans (task=images); PSNR means "
                f"nothing for task={cfg['task']['name']}")
    data = get_task("images").load_site(folder, cfg["task"], site)
    image, label = data.train[0]
    truth, label = (image + 1.0) / 2.0, int(label)
    attacked = FromPixels(global_model).eval()
    gradient = record_gradient(attacked, truth, label)
    views: dict[str, Sequence[torch.Tensor]] = {
        "plaintext": gradient,
        "dp-noised": dp_noised_gradient(gradient, clip, sigma,
                                        torch.Generator().manual_seed(seed + 41)),
        "secagg-masked": masked_upload_view(gradient, seed + 42),
    }
    return truth, {case: reconstruct(attacked, view, truth.shape, truth=truth, label=label,
                                     method=str(settings["method"]),
                                     iterations=int(settings["iterations"]), seed=seed)
                   for case, view in views.items()}
