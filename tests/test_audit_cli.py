"""`python -m simulations.audit`: a real federated run audited end to end (issue 7).

Real simulations (Flower's engine, the real ClientApp and DP-SGD) on small tabular sites with an
over-parameterised MLP, so that without DP the final global model remembers its training
records; the same run with DP at ε = 1 must stay below its accountant's ε; and a run whose DP
path is broken on purpose (noise off while the site's ledger still counts σ) must fail.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from torch import nn

from server.settings import ConfigError
from simulations.audit.federated import WhiteBoxCanaries, check_audit_settings

ROOT = Path(__file__).resolve().parents[1]
SMALL_RUN = [
    "task=tabular", "num_hospitals=2", "rounds=1", "local_epochs=40", "lr=0.01",
    "task.synthetic.train_size=50", "task.synthetic.test_size=50",
    "model.hidden=[256,256]", "model.dropout=0",
    # the audit's calibration is on plain Adam steps, also under privacy=dp (not the tuned DP
    # defaults of conf/training/mlp_dp.yaml)
    "optimizer=adam", "batch_size=32", "model.activation=relu",
    "audit.canaries.white_box=200", "audit.canaries.black_box=40",
    "audit.membership.shadow_models=2",
]


def run_audit_command(out_dir: Path, cache: Path, *overrides: str,
                      noise_off: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDSILO_CACHE": str(cache)}
    command = [sys.executable, "-m", "simulations.audit"]
    if noise_off:  # the same command with the broken DP path of this module installed first
        command = [sys.executable, "-c", "import test_audit_cli; test_audit_cli.audit_noise_off()"]
        # the simulation's Ray workers inherit PYTHONPATH, so they can unpickle this module's hook
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"),
                                                          env.get("PYTHONPATH")]))
    return subprocess.run(
        [*command, *SMALL_RUN, *overrides, f"hydra.run.dir={out_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


# ---- a broken DP path, built only here ---------------------------------------------------

def dp_optimizer_of(model: nn.Module):
    """The Opacus DPOptimizer training ``model`` in this process (the step hook sees only the
    model; the optimizer is found by the parameters it holds)."""
    from opacus.optimizers import DPOptimizer

    mine = {id(p) for p in model.parameters()}
    found = [o for o in gc.get_objects() if isinstance(o, DPOptimizer)
             and any(id(p) in mine for group in o.param_groups for p in group["params"])]
    if len(found) != 1:
        raise RuntimeError(f"expected one DPOptimizer training this model, found {len(found)}")
    return found[0]


class SilencedNoise:
    """A step hook that switches the site's DP-SGD noise off (σ = 0 in the optimizer; clipping
    stays on), then injects the audit's canaries. The site's privacy ledger is untouched and
    still accounts the planned σ: exactly the bug the white-box audit exists to catch."""

    def __init__(self, inject) -> None:
        self.inject, self.silenced = inject, False

    def __call__(self, model: nn.Module, sample_rate: float, batch_size: int) -> None:
        if not self.silenced:
            dp_optimizer_of(model).noise_multiplier = 0.0
            self.silenced = True
        self.inject(model, sample_rate, batch_size)


@dataclass(frozen=True)
class NoiseOffCanaries(WhiteBoxCanaries):
    """The audit's own canary hook, with the auditing site's noise switched off. Pickled to the
    simulation's Ray workers like the real one, so the broken mode runs where the site trains."""

    def __call__(self, site_id: str, server_round: int):
        inject = super().__call__(site_id, server_round)
        return None if inject is None else SilencedNoise(inject)


def audit_noise_off() -> None:
    """``python -m simulations.audit`` with :class:`NoiseOffCanaries` in place of the real hook
    (run in a subprocess by :func:`run_audit_command`; never in the test process)."""
    import runpy

    from simulations.audit import federated

    federated.WhiteBoxCanaries = NoiseOffCanaries
    runpy.run_module("simulations.audit", run_name="__main__", alter_sys=True)  # = python -m


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
def test_without_dp_the_audit_measures_what_an_attacker_gets(tmp_path, cache):
    done = run_audit_command(tmp_path, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["failed"] is False  # nothing was claimed, so nothing can be contradicted
    white = next(c for c in audit["canaries"] if c["variant"] == "white-box")
    assert white["accountant_epsilon"] is None and white["m"] == 200
    # the canaries' gradients reach the global model unnoised: (nearly) every guess is right
    assert white["epsilon_lb"] > 2.5, white
    assert white["correct"] >= 0.95 * white["guesses"]
    site = audit["run"]["auditing_site"]
    loss_auc = audit["membership"][site][0]
    assert loss_auc["attack"] == "loss" and loss_auc["auc"] > 0.65, audit["membership"]
    assert {v["verdict"] for v in audit["verdicts"]} == {"info"}
    markdown = (tmp_path / "audit.md").read_text()
    assert "no DP claimed" in markdown and f"{white['epsilon_lb']:.2f}" in markdown
    assert "Without DP a small lower bound is not privacy" in markdown
    timings = audit["run"]["timings_s"]  # each check's wall time, for the benchmark
    assert {"federated_run_s", "canaries_white_box_s", "canaries_black_box_s", "membership_s",
            "total_s"} <= set(timings) and "## Time" in markdown
    assert (tmp_path / "plots" / "audit_epsilon.png").is_file()
    assert (tmp_path / "plots" / "membership_roc.png").is_file()
    assert (tmp_path / "federated" / "report.json").is_file()  # the audited run's own report


@pytest.mark.slow
def test_with_dp_the_lower_bound_stays_below_the_accountant_and_the_command_passes(
        tmp_path, cache):
    done = run_audit_command(tmp_path, cache, "privacy=dp", "privacy.target_epsilon=1",
                             "local_epochs=10")
    assert done.returncode == 0, done.stderr[-3000:]
    audit = json.loads((tmp_path / "audit.json").read_text())
    run = json.loads((tmp_path / "federated" / "report.json").read_text())
    site = audit["run"]["auditing_site"]
    claimed = run["privacy"][site]["epsilon"]
    assert 0.5 < claimed <= 1.0 + 1e-9  # the site's own ledger, read from the run's report
    assert audit["failed"] is False
    for check in audit["canaries"]:
        assert check["accountant_epsilon"] == pytest.approx(claimed)
        assert check["delta"] == run["privacy"][site]["delta"]
        assert check["epsilon_lb"] <= claimed, check
    verdicts = {v["check"]: v["verdict"] for v in audit["verdicts"]}
    assert verdicts[f"canaries white-box · {site}"] == "pass"
    assert verdicts[f"canaries black-box · {site}"] == "pass"
    # DP leaves an attacker close to a coin flip (few records: a loose margin)
    assert audit["membership"][site][0]["auc"] < 0.65, audit["membership"]
    dp_markdown = (tmp_path / "audit.md").read_text()
    assert "pass" in done.stderr and "≤ accountant ε" in dp_markdown
    assert "Without DP a small lower bound" not in dp_markdown


@pytest.mark.slow
def test_noise_switched_off_at_the_site_while_its_ledger_counts_it_fails_the_audit(
        tmp_path, cache):
    done = run_audit_command(tmp_path, cache, "privacy=dp", "privacy.target_epsilon=1",
                             "local_epochs=10", "audit.canaries.black_box=0",
                             "audit.membership.shadow_models=0", noise_off=True)
    assert done.returncode == 3, done.stderr[-3000:]  # EXIT_AUDIT_FAILED
    audit = json.loads((tmp_path / "audit.json").read_text())
    run = json.loads((tmp_path / "federated" / "report.json").read_text())
    site = audit["run"]["auditing_site"]
    claimed = run["privacy"][site]["epsilon"]
    assert 0.5 < claimed <= 1.0 + 1e-9  # the ledger still claims a modest ε: it counted σ
    assert run["privacy"][site]["noise_multiplier"] > 1.0
    white = next(c for c in audit["canaries"] if c["variant"] == "white-box")
    assert white["accountant_epsilon"] == pytest.approx(claimed)
    assert white["epsilon_lb"] > claimed + 1.0, white  # caught, well beyond the claim
    assert audit["failed"] is True
    verdicts = {v["check"]: v["verdict"] for v in audit["verdicts"]}
    assert verdicts[f"canaries white-box · {site}"] == "FAIL"
    assert "AUDIT FAILED" in done.stderr and "FAILED" in (tmp_path / "audit.md").read_text()


def test_bad_audit_settings_are_named():
    settings = {"site": None, "seed": 0, "confidence": 0.95, "delta": 1e-5,
                "canaries": {"white_box": 1, "black_box": 0, "clip_norm": 1.0, "guesses": None},
                "membership": {"shadow_models": 0},
                "inversion": {"enabled": False, "method": "dlg", "iterations": 10,
                              "noise_multiplier": 1.0}}
    with pytest.raises(ConfigError, match="audit.canaries.white_box"):
        check_audit_settings(settings)
    settings["canaries"]["white_box"] = 10
    settings["membership"]["shadow_models"] = 1
    with pytest.raises(ConfigError, match="audit.membership.shadow_models"):
        check_audit_settings(settings)
    settings["membership"]["shadow_models"] = 0
    settings["inversion"]["noise_multiplier"] = 0  # the plaintext labelled "dp-noised"
    with pytest.raises(ConfigError, match="audit.inversion.noise_multiplier"):
        check_audit_settings(settings)


def test_canaries_are_injected_only_at_the_auditing_site_and_travel_by_pickle():
    import pickle

    import numpy as np
    import torch
    from torch import nn

    from simulations.audit.canary import GradientCanaries
    from simulations.audit.federated import WhiteBoxCanaries

    model = nn.Linear(4, 3)
    canaries = GradientCanaries.for_model(model, 6, seed=1, clip_norm=1.0)
    hooks = pickle.loads(pickle.dumps(WhiteBoxCanaries("hospital_02", canaries,
                                                       (True,) * 6, seed=5)))
    assert hooks("hospital_01", 1) is None
    inject = hooks("hospital_02", 1)
    model(torch.randn(2, 4)).sum().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    inject(model, 1.0, 2)  # no DP: sampled canaries join the batch-mean gradient
    moved = sum(int((p.grad != before[n]).sum()) for n, p in model.named_parameters())
    assert moved == 6  # every included canary drawn at rate 1, each on its own coordinate
    scores = canaries.scores_from_update(
        {n: -(p.grad - before[n]) for n, p in model.named_parameters()})
    assert np.allclose(scores, 0.5)  # C / batch size along each canary's coordinate
