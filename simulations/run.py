"""The main job: ``python -m simulations.run [overrides]`` simulates hospitals on this machine.

One virtual SuperNode per hospital on Flower's Ray engine, each reading only its own folder;
progress per round on the terminal; report.json, report.md, plots/ and model.pt in the Hydra
run directory (``hydra.run.dir=PATH``).
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# Only Hydra, rich and server.settings at the top: `--help` and a configuration error are
# answered before torch, Flower, Opacus and Ray load (5-20 s; issue 18). What runs a
# simulation is imported in simulate() and main(), after validate().
from server.settings import ConfigError, baseline_kinds, site_node_config, to_dict, validate
from simulations.tracking import check as check_tracking  # loads no MLflow

if TYPE_CHECKING:
    from client.training import StepHook
    from server.history import RoundRecord
    from server.stopping import StopSignal
    from simulations.baselines import TrainedBaseline

console = Console(stderr=True)
_job_started = False  # set once Hydra has composed the config and called main()
_existing_run_dirs: set[Path] = set()  # hydra.run.dir folders that existed before the run


def simulate(cfg: dict[str, Any], out_dir: Path, *,
             step_hook_for: Callable[[str, int], StepHook | None] | None = None,
             stop: StopSignal | None = None) -> dict[str, Any]:
    """Run one simulation and return the report (also written to ``out_dir``).
    ``step_hook_for``: see ``client.app.build_client_app`` (the privacy audit's canaries).
    ``stop``: set by Ctrl-C/SIGTERM while the run lasts; the run then stops at the round in
    progress (dropped), its report written and the last complete round checkpointed."""
    from client.app import build_client_app
    from server.app import build_server_app
    from server.checkpoint import load_checkpoint, resumable_config
    from server.report import is_collapsed
    from simulations.baselines import run_baselines
    from simulations.global_evaluation import pooled_test_evaluation
    from simulations.identities import simulation_identities
    from simulations.sites import lazy_synthetic_sites, site_folders

    lazy = lazy_synthetic_sites(cfg)  # synthetic sites written when first needed, or None
    if lazy is None and not cfg["data"].get("root"):  # every site written before the header
        console.print(_preparing_line(cfg), soft_wrap=True)
    folders = lazy.folders() if lazy is not None else site_folders(cfg)
    cfg = {**cfg, "num_hospitals": len(folders)}  # data.root decides the number of sites
    first_round = 1
    if cfg.get("resume"):  # refuse before anything starts if this is not the same run
        checkpoint = load_checkpoint(out_dir)
        resumable_config(checkpoint.config, cfg)
        first_round = checkpoint.round + 1
    sites = {
        partition: {"site-id": site, "data-path": str(folder), "device": cfg["device"],
                    "threads": max(1, int(cfg["simulation"]["client_cpus"])),
                    # each simulated site keeps its own records (privacy ledger) here
                    "state-dir": str(out_dir / "sites" / site),
                    # the site's own policy (site.<key>=...), as its site.toml would set it
                    **site_node_config(cfg)}
        for partition, (site, folder) in enumerate(folders.items())
    }
    if cfg["secagg"]["name"] == "on":  # each site signs its SecAgg keys: a simulated CA + roster
        identities = simulation_identities(out_dir, folders)
        for node_config in sites.values():
            node_config.update(identities[node_config["site-id"]])
    console.print(f"[bold]medsilo[/] {cfg['task']['name']} · {len(folders)} hospitals · "
                  f"{cfg['rounds']} rounds · strategy {cfg['strategy']['name']} · "
                  f"privacy {privacy_label(cfg)} → {out_dir}")
    progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), console=console)

    def on_round(record: RoundRecord) -> None:
        g = record.global_metrics or {}
        failed = f", [red]{len(record.failures)} failed[/]" if record.failures else ""
        if record.declined:
            failed += f", [yellow]{len(record.declined)} declined (privacy budget)[/]"
        if record.privacy:
            eps = [led["epsilon"] for led in record.privacy.values()]
            failed += f" · ε max {max(eps):.2f}"
        hospital = (record.secure_aggregation or {}).get("site_dp") or {}
        if hospital.get("epsilon_after") is not None:  # privacy=site_dp: the federation's ε
            failed += f" · hospital-level ε {hospital['epsilon_after']:.2f}"
        if is_collapsed(g):
            failed += " · [bold red]collapsed: one class predicted for every example[/]"
        progress.console.print(
            f"round {record.round}: loss {g.get('loss', float('nan')):.4f} · accuracy "
            f"{g.get('accuracy', float('nan')):.3f} · AUROC {g.get('auroc', float('nan')):.3f}"
            f" · {len(record.train)} sites trained{failed}", soft_wrap=True,
        )
        progress.advance(bar)

    def on_baseline(trained: TrainedBaseline) -> None:
        m, led = trained.metrics, trained.privacy
        what = (f"{trained.site} alone" if trained.site is not None
                else "all sites pooled (global test pool)")
        progress.console.print(
            f"baseline {trained.done}/{trained.total} · {what}: AUROC "
            f"{m.get('auroc', float('nan')):.3f} · balanced accuracy "
            f"{m.get('balanced_accuracy', float('nan')):.3f}"
            + (f" · ε {led['epsilon']:.2f}" if led.get("dp") else "")
            + f" · {trained.seconds:.1f} s", soft_wrap=True)
        progress.advance(baseline_bar)
        if stop is not None:
            stop.check()  # stopped between two baselines: the report says they were not computed

    def on_stop(name: str) -> None:
        progress.console.print(
            f"[bold yellow]{name}:[/] stopping at the round in progress; the last complete round "
            "is checkpointed (press Ctrl-C again to end at once, without a report)")

    global_evaluate = pooled_test_evaluation(cfg, folders, prepare=lazy and lazy.ensure)
    server_app = build_server_app(
        cfg, output_dir=out_dir, global_evaluate=global_evaluate, on_round=on_round,
        # trained after the rounds, in the ServerApp, so report.json is still written once
        baselines=run_baselines(folders, pool=global_evaluate.sites,
                                prepare=lazy and lazy.ensure, on_trained=on_baseline),
        stop=stop,
    )
    kinds = baseline_kinds(cfg)
    with progress:
        bar = progress.add_task("federated rounds", total=cfg["rounds"],
                                completed=first_round - 1)
        if kinds:
            baseline_bar = progress.add_task(
                "baselines (" + ", ".join(kinds) + ")",
                total=len(folders) * ("local" in kinds) + ("pooled" in kinds))
        # the first round line comes only after Ray and its worker processes are up
        progress.console.print(
            f"starting Flower's simulation engine (Ray) for {len(folders)} hospitals; round 1 "
            "follows once its workers have loaded torch (10-30 s on a laptop)", soft_wrap=True)
        run_in_process(
            server_app, build_client_app(sites, step_hook_for=step_hook_for,
                                         prepare_site=lazy and lazy.ensure), len(folders),
            client_cpus=float(cfg["simulation"]["client_cpus"]),
            client_gpus=float(cfg["simulation"]["client_gpus"]),
            ray_address=cfg["simulation"].get("ray_address"),
            object_store_mb=cfg["simulation"].get("object_store_mb"),
            seed=int(cfg["seed"]),
            stop=stop, on_stop=on_stop,
        )
    report_path = out_dir / "report.json"
    if not report_path.is_file() and stop is not None and stop.requested:
        return {}  # stopped before the ServerApp wrote its report: the caller says so
    if not report_path.is_file():
        raise RuntimeError(f"the simulation ended without writing {report_path}; see the log above")
    return json.loads(report_path.read_text())


def _preparing_line(cfg: dict[str, Any]) -> str:
    """What runs before the header when every site's folder is written first (it can take a
    while: the user sees that something happens, also in a log file)."""
    if cfg["data"].get("path"):
        return (f"splitting data.path={escape(str(cfg['data']['path']))} into "
                f"{cfg['num_hospitals']} hospitals ({cfg['data']['partition']}) ...")
    return (f"writing {cfg['num_hospitals']} synthetic {cfg['task']['name']} hospitals "
            "(data.generate=upfront; reused by later runs) ...")


def privacy_label(cfg: Mapping[str, Any]) -> str:
    """The header's privacy mode: record level (off | dp) and, with privacy=site_dp, the
    hospital-level target (to_dict splits site_dp into privacy + hospital_privacy)."""
    label = cfg["privacy"]["name"]
    hospital = cfg.get("hospital_privacy")
    if hospital:
        label = (f"site_dp (hospital-level ε target {hospital['target_epsilon']:g})"
                 + (f" + record-level {label}" if label != "off" else ""))
    return label


def run_in_process(*args: Any, **kwargs: Any) -> None:
    """``simulations.engine.run_in_process`` (Flower's Ray engine), imported when a run starts.
    Tests replace this name with an in-process grid (tests/in_process_grid.py)."""
    from simulations.engine import run_in_process as run_on_ray

    run_on_ray(*args, **kwargs)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(hydra_cfg: DictConfig) -> None:
    global _job_started
    _job_started = True
    _release_stderr(show=True)  # what Hydra said while composing, if anything, in its place
    run_dir = Path(HydraConfig.get().runtime.output_dir)  # made by Hydra, holding .hydra/
    try:
        validate(hydra_cfg)
        check_tracking(hydra_cfg)  # tracking=mlflow without the extra: refused before the run
    except ConfigError as err:
        _exit_bad_input(err, run_dir)
    cfg = to_dict(hydra_cfg)
    # resume: the interrupted run's folder (its checkpoint and its sites' privacy ledgers)
    out_dir = Path(cfg["resume"]) if cfg.get("resume") else run_dir
    report = _run(cfg, out_dir, run_dir, list(HydraConfig.get().overrides.task))
    _print_summary(report, out_dir)
    track(cfg, out_dir)


def track(cfg: dict[str, Any], out_dir: Path) -> None:
    """tracking=mlflow: log the finished run's folder (simulations/tracking.py). A tracking
    failure is a warning: the run and its report stand, and the printed command logs it later."""
    if cfg.get("tracking", {}).get("name") != "mlflow":
        return
    from simulations.tracking import TrackingError, log_run

    try:
        console.print(f"MLflow: run {log_run(cfg, out_dir)} in experiment "
                      f"{escape(cfg['tracking']['experiment'])} at "
                      f"{escape(cfg['tracking']['uri'])}", soft_wrap=True)
    except TrackingError as err:
        console.print(f"[bold yellow]warning:[/] {escape(str(err))}", soft_wrap=True)


def _run(cfg: dict[str, Any], out_dir: Path, run_dir: Path,
         overrides: list[str]) -> dict[str, Any]:
    """``simulate`` from the command line: a bad input exits 2 with one line (no folder left),
    Ctrl-C / SIGTERM with the shell's status for the signal after saying how to continue."""
    # the config is valid: now what runs it (client.tasks loads torch, server.stopping Flower)
    from client.tasks import DataError
    from server.checkpoint import CheckpointError
    from server.stopping import StopSignal

    stop = StopSignal()
    stop.before_exit = lambda: _report_stop(out_dir, overrides)
    try:
        report = simulate(cfg, out_dir, stop=stop)
    except (ConfigError, DataError, CheckpointError) as err:
        _exit_bad_input(err, run_dir)
    if stop.requested:
        _report_stop(out_dir, overrides)
        sys.exit(128 + signal.Signals[stop.reason or "SIGINT"].value)
    return report


def _print_summary(report: dict[str, Any], out_dir: Path) -> None:
    """Warnings, refusals and the last line: the final scores and the run's duration, the
    figure report.json and report.md hold (``run.duration_s``)."""
    from server.report import collapse_warnings

    final = report["final"]["global"] or {}
    for warning in collapse_warnings(report):
        console.print(f"[bold yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    refused = {site: why for r in report["rounds"] for site, why in r.get("refused", {}).items()}
    for site, why in sorted(refused.items()):
        console.print(f"[bold yellow]refused by {escape(site)}:[/] {escape(why)}", soft_wrap=True)
    scores = " · ".join(f"{k} {final[k]:.3f}" for k in ("accuracy", "auroc")
                        if final.get(k) is not None)
    console.print(
        f"[bold green]done[/] in {report['run']['duration_s']:.1f} s · "
        + (f"final global {scores}" if scores else "no model was trained")
        + f"\nreport: {out_dir / 'report.md'}"
    )


def _exit_bad_input(err: Exception, run_dir: Path | None = None) -> NoReturn:
    """One line naming what is wrong, exit 2. A run refused before it did anything leaves no
    output folder behind: Hydra made ``run_dir`` (``outputs/<date>/<time>``) and wrote only
    its ``.hydra/`` there; they are removed (a folder holding anything else is kept)."""
    if run_dir is not None:
        _remove_unused_run_dir(run_dir)
    # escape: a path or list in the message ("[a, b]") is not rich markup; soft_wrap: the
    # message stays on one line, so a file name is never broken across lines
    console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
    sys.exit(2)


def _remove_unused_run_dir(run_dir: Path) -> None:
    """Remove Hydra's ``.hydra/`` in ``run_dir``, then ``run_dir`` and its parents while they
    are empty (``outputs/<date>/<time>``), never the working directory, a folder above it, or
    a ``hydra.run.dir`` that existed before the run (``cli`` notes those)."""
    import shutil

    run_dir = run_dir.resolve()
    if not run_dir.is_dir() or any(p.name != ".hydra" for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    if run_dir in _existing_run_dirs or run_dir == Path.cwd().resolve():
        return
    folder = run_dir
    while True:
        try:
            folder.rmdir()
        except OSError:  # not empty: another run's, or the user's
            return
        folder = folder.parent
        if Path.cwd().resolve() not in folder.parents:  # only folders below the working one
            return


def _report_stop(out_dir: Path, overrides: list[str]) -> None:
    """What stopped, and the command that continues the run (the same overrides + resume)."""
    import shlex

    path = out_dir / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else None
    reason = report["run"]["stopped_early"] if report else "stopped before the report was written"
    after = f" after {report['run']['duration_s']:.1f} s" if report else ""
    console.print(f"[bold yellow]stopped[/]{after}: {escape(reason or 'stop requested')}",
                  soft_wrap=True)
    if (out_dir / "checkpoint.npz").is_file():
        again = [o for o in overrides if not o.startswith("resume=")] + [f"resume={out_dir}"]
        console.print("continue with: " + escape(shlex.join(
            [Path(sys.executable).name, "-m", "simulations.run", *again])), soft_wrap=True)
    console.print(f"report: {out_dir / 'report.md'}")


def cli() -> None:
    """``main`` with one exit code and one line for every bad configuration value: 2.

    A typo gets a did-you-mean (``unknown config key 'roudns'; did you mean 'rounds'?``) instead
    of Hydra's dump: when Hydra cannot compose the command line, what it printed is held back and
    simulations/overrides.py names the mistake. A valid line is composed by Hydra alone (twice
    already: once to read ``hydra.mode``, once to run; a third compose to check it first cost
    ~0.1 s of every start, issue 18); a value our checks refuse is refused in ``main`` before
    anything runs, the folder Hydra made removed. With Hydra's own flags (``--help``, ``--cfg``,
    ``--multirun`` ...) Hydra answers alone; should it still reject the line, it prints why and
    exits 1, the code of a crash, made 2 here.
    """
    arguments = sys.argv[1:]
    for arg in arguments:  # a run directory the user made is never removed (_exit_bad_input)
        if arg.startswith("hydra.run.dir=") and Path(arg.split("=", 1)[1]).is_dir():
            _existing_run_dirs.add(Path(arg.split("=", 1)[1]).resolve())
    plain = not any(arg.startswith("-") for arg in arguments)
    if plain:  # released by main() as soon as Hydra calls it
        _hold_stderr()
    try:
        main()
    except (SystemExit, Exception) as stop:
        if _job_started:
            raise
        hydra_said = _release_stderr(show=False)
        if plain:
            _explain_overrides(arguments)  # exits 2 with one line if it finds the mistake
        sys.stderr.write(hydra_said)
        if isinstance(stop, SystemExit) and stop.code == 1:
            console.print("[bold red]error:[/] the configuration could not be composed (the "
                          "message above names the key); `python -m simulations.run --help` "
                          "lists the config groups and their choices", soft_wrap=True)
            sys.exit(2)
        raise
    finally:
        _release_stderr(show=True)


def _explain_overrides(arguments: list[str]) -> None:
    """The one line simulations/overrides.py gives for a command line Hydra refused, exit 2."""
    from simulations.overrides import check_overrides

    try:
        check_overrides(arguments)
    except ConfigError as err:
        _exit_bad_input(err)


_held: list[Any] = []  # [the real sys.stderr, the buffer in its place] while Hydra composes


def _hold_stderr() -> None:
    import io

    _held[:] = [sys.stderr, io.StringIO()]
    sys.stderr = _held[1]


def _release_stderr(*, show: bool) -> str:
    """Put the real stderr back; what was held is written to it (``show``) or returned."""
    if not _held:
        return ""
    real, buffer = _held
    _held.clear()
    sys.stderr = real
    said = buffer.getvalue()
    if show and said:
        real.write(said)
    return "" if show else said


if __name__ == "__main__":
    cli()
