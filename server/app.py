"""The ServerApp: build the global model and Flower's strategy from config, run the rounds,
write the report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from models import build_model
from privacy import protocol
from privacy.compat import bounded_reply_downloads
from server import settings as run_settings
from server.checkpoint import Checkpoint, load_checkpoint, resumable_config, save_checkpoint
from server.history import RunHistory
from server.report import build_report, collapse_warnings, write_report
from server.rounds import RoundCallback, run_rounds
from server.secure_aggregation import SecAggSettings, SecureAggregation
from server.site_dp import HospitalPrivacy
from server.stopping import StoppableGrid, StopRequested, StopSignal
from server.strategy import build_strategy
from server.validation import UpdateBounds

log = logging.getLogger("flwr.medsilo.server")

# (server_round, arrays) -> metrics of the global model on data the server may see
GlobalEvaluate = Callable[[int, ArrayRecord], Mapping[str, float]]
# run config -> report.json ``baselines`` (None: off); simulation only (simulations/baselines.py)
Baselines = Callable[[Mapping[str, Any]], Mapping[str, Any] | None]


def initial_model(cfg: Mapping[str, Any]) -> torch.nn.Module:
    torch.manual_seed(int(cfg["seed"]))
    return build_model(cfg["model"], cfg["task"]["spec"])


def build_server_app(
    cfg: Mapping[str, Any] | None = None,
    *,
    output_dir: Path | None = None,
    global_evaluate: GlobalEvaluate | None = None,
    on_round: RoundCallback | None = None,
    baselines: Baselines | None = None,
    stop: StopSignal | None = None,
) -> ServerApp:
    """The ServerApp. The simulation passes its composed ``cfg``, a pooled-test-set evaluation,
    a progress callback, the baselines to train after the rounds and the signal its Ctrl-C sets
    (server/stopping.py); deployed (``cfg=None``) it composes ``conf/`` with the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        started = time.perf_counter()
        if cfg is None:  # deployed: replies pulled from the SuperLink, none lost at a timeout
            grid = StoppableGrid(grid, stop, poll_s=1.0)
        elif stop is not None:  # simulated: from memory, often, so that a stop is seen at once
            grid = StoppableGrid(grid, stop, poll_s=0.1)
        config = cfg if cfg is not None else run_settings.compose(
            run_settings.overrides_from_run_config(context.run_config)
        )
        resume_dir = config.get("resume")
        checkpoint = load_checkpoint(Path(resume_dir)) if resume_dir else None
        if checkpoint is not None:
            config = resumable_config(checkpoint.config, config)
        out = Path(resume_dir or output_dir or config.get("report_dir")
                   or f"outputs/run-{context.run_id}")
        history = checkpoint.history if checkpoint else RunHistory()
        strategy = build_strategy(config["strategy"], int(config["num_hospitals"]),
                                  bounds=UpdateBounds.from_config(config.get("validation")),
                                  sites_per_round=run_settings.sites_per_round(config),
                                  seed=int(config["seed"]),
                                  final_round=(int(config["rounds"]) if config.get(
                                      "final_evaluation", "all") == "all" else None),
                                  min_sites=int(config["min_sites"]),
                                  connect_timeout_s=float(config.get("connect_timeout_s", 120)))

        def after_round(server_round: int, arrays: ArrayRecord) -> None:
            save_checkpoint(out, Checkpoint(
                round=server_round, model={k: a.numpy() for k, a in arrays.items()},
                strategy_state=strategy.state_arrays(), history=history, config=config))

        site_config = protocol.encode_run_settings(run_settings.site_settings(config))
        if checkpoint is not None:
            arrays = ArrayRecord({k: Array(v) for k, v in checkpoint.model.items()})
            strategy.load_state_arrays(checkpoint.strategy_state)
        else:
            arrays = ArrayRecord(initial_model(config).state_dict())
        hospital_privacy = hospital_privacy_for(config, arrays, history, checkpoint)
        secure_aggregation = None
        if config["secagg"]["name"] == "on":
            secure_aggregation = SecureAggregation(SecAggSettings.from_config(config["secagg"]),
                                                   seed=int(config["seed"]),
                                                   hospital_privacy=hospital_privacy)
        # a site lost while uploading a reply costs a wait of upload_timeout_s, not Flower's 2 h
        with bounded_reply_downloads(float(config.get("upload_timeout_s", 120))):
            outcome = run_rounds(
                strategy, grid, history, arrays,
                first_round=checkpoint.round + 1 if checkpoint else 1,
                num_rounds=int(config["rounds"]),
                timeout=float(config["simulation"]["round_timeout_s"]),
                train_config=site_config,
                evaluate_config=ConfigRecord(dict(site_config)),
                min_sites=int(config["min_sites"]),
                # None (deployment): the sites' example-weighted mean stands for global metrics
                evaluate_fn=global_evaluate,
                after_round=after_round,
                on_round=on_round,
                secure_aggregation=secure_aggregation,
            )
        duration_s = time.perf_counter() - started  # the federation's, without baselines
        report = build_report(
            config, history, duration_s=duration_s,
            baselines=baselines_for_report(baselines, config, deployed=cfg is None, stop=stop),
            global_evaluation="pooled" if global_evaluate else "site_weighted_mean",
            pooled_sites=getattr(global_evaluate, "sites", None),
            stopped=outcome.stopped,
            hospital_privacy=hospital_privacy.section(history) if hospital_privacy else None,
        )
        write_report(out, report, outcome.arrays.to_torch_state_dict())
        if stop is not None:
            stop.finished.set()
        for warning in collapse_warnings(report):  # deployment: on the ServerApp's console
            log.warning(warning)

    return app


def hospital_privacy_for(config: Mapping[str, Any], arrays: ArrayRecord, history: RunHistory,
                         checkpoint: Checkpoint | None) -> HospitalPrivacy | None:
    """privacy=site_dp: the plan for this model (None otherwise). A resumed run keeps its
    planned rounds: the sites planned their noise for them, and the ledger composes one plan."""
    if not config.get("hospital_privacy"):
        return None
    if checkpoint is not None and int(checkpoint.config["rounds"]) != int(config["rounds"]):
        raise run_settings.ConfigError(
            f"rounds={config['rounds']}: a privacy=site_dp run resumes with its planned rounds "
            f"({checkpoint.config['rounds']}); every site planned its noise for them")
    dim = sum(int(a.numpy().size) for a in arrays.values())
    return HospitalPrivacy(config, dim, history)


def baselines_for_report(baselines: Baselines | None, config: Mapping[str, Any], *,
                         deployed: bool, stop: StopSignal | None = None
                         ) -> Mapping[str, Any] | None:
    """report.json ``baselines``. They need every site's data, which only a simulation's server
    holds: deployed, a run that asks for them is told they were not computed. A failure here
    must not cost the federated run its report: it is reported instead; nor does a stop asked
    for (``stop``; the baselines' progress callback checks it)."""
    kinds = run_settings.baseline_kinds(config)
    if stop is not None and stop.requested and kinds:
        return {"computed": False, "kinds": list(kinds),
                "reason": f"not computed: the run was stopped by {stop.reason}"}
    if baselines is not None:
        try:
            return baselines(config)
        except StopRequested as stopped:
            return {"computed": False, "kinds": list(kinds),
                    "reason": f"not computed: the run was stopped by {stopped.reason}"}
        except Exception as err:  # the rounds' results are written regardless
            log.exception("baselines failed")
            return {"computed": False, "reason": f"failed: {type(err).__name__}: {err}"}
    if deployed and kinds:
        return {"computed": False, "kinds": list(kinds),
                "reason": "deployment: the server holds no hospital's data (baselines are "
                          "computed in simulation only)"}
    return None


# Deployment entry point (pyproject [tool.flwr.app.components]).
app = build_server_app()
