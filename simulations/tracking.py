"""Experiment tracking: a finished run's folder, logged to MLflow (``tracking=mlflow``).

One MLflow run per medsilo run, read from what the run wrote (report.json, report.md,
sites.csv, plots/, model.pt and Hydra's .hydra/), so a run logged as it ends and a folder
logged months later (``python -m simulations.tracking DIR...``) give the same MLflow run:

- params: the resolved config, flattened to dotted keys (``privacy.target_epsilon``);
- metrics, step = round: ``global/<metric>`` (round 0 = the initial model),
  ``site/<site>/<metric>`` (each site's own test split), ``epsilon/<site>`` (the site's
  cumulative ε after the round), ``epsilon/max`` and, with privacy=site_dp,
  ``hospital_epsilon``; single values: ``final/<metric>``, ``final_hospital_epsilon``,
  ``final_client_mean/<metric>``, ``baseline_local/<metric>``, ``baseline_pooled/<metric>``;
- artifacts: the report, sites.csv, plots, model and Hydra config; never ``sites/`` (privacy
  ledgers, simulated SecAgg keys) nor the checkpoint;
- the run's description: report.md, rendered by ``mlflow ui``.

A ``-m`` sweep logs one run per job into one experiment, tagged with the sweep's folder.
MLflow is an optional extra and is imported only here, only when a run is logged: ``check``
answers a configuration mistake without it (issue 18: start-up loads nothing heavy).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import re
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from server.settings import CONF_DIR, ConfigError

INSTALL_HINT = "tracking=mlflow needs the optional extra: pip install -e '.[tracking]'"
# What a run folder shares with the tracking store. Not sites/ (each simulated site's privacy
# ledger and, with secagg=on, its private signing key) and not checkpoint.npz (resume state).
ARTIFACT_FILES = ("report.json", "report.md", "sites.csv", "model.pt")
ARTIFACT_DIRS = {"plots": "plots", ".hydra": "hydra"}  # folder in the run -> in MLflow
TAG_PREFIX = "medsilo."
# MLflow's limits (mlflow.utils.validation), repeated so check() needs no MLflow
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
_METRIC_NAME_UNSAFE = re.compile(r"[^\w.\- /]")


class TrackingError(RuntimeError):
    """Logging to the tracking store failed; the run's own folder is complete and can be
    logged again later with ``python -m simulations.tracking DIR``."""


# -- configuration ------------------------------------------------------------------------
def check(cfg: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the ``tracking`` key that is wrong, before a run
    starts (not after an hour of training). Imports nothing of MLflow."""
    tracking = cfg.get("tracking") or {"name": "off"}
    name = tracking.get("name")
    if name == "off":
        return
    if name != "mlflow":
        raise ConfigError(f"tracking must be 'off' or 'mlflow', got {name!r}")
    for key in ("uri", "experiment"):
        value = tracking.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"tracking.{key} must be a non-empty string, got {value!r}")
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(INSTALL_HINT)


def tracking_uri(uri: str, base: Path | None = None) -> str:
    """``tracking.uri`` as MLflow takes it: a plain path is a local SQLite file (relative to
    ``base``, default the working directory), anything with a scheme is used as it is.

    SQLite, not a folder of files: MLflow 3 refuses its file store (``./mlruns``) unless
    MLFLOW_ALLOW_FILE_STORE=true ("maintenance mode", features missing) and defaults to
    ``sqlite:///mlflow.db`` itself."""
    if "://" in uri or uri.startswith(("databricks", "file:")):
        return uri
    path = Path(uri).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return f"sqlite:///{path.resolve().as_posix()}"  # sqlite:////abs/path: four slashes


def default_settings(task: str) -> dict[str, str]:
    """conf/tracking/mlflow.yaml's uri and experiment for a run of ``task`` (the CLI's
    defaults, so the command and ``tracking=mlflow`` fill the same store)."""
    from omegaconf import OmegaConf

    conf = OmegaConf.merge({"task": {"name": task}},
                           {"tracking": OmegaConf.load(CONF_DIR / "tracking" / "mlflow.yaml")})
    resolved = OmegaConf.to_container(conf, resolve=True)["tracking"]  # type: ignore[index]
    return {"uri": resolved["uri"], "experiment": resolved["experiment"]}


# -- what a run folder holds, as MLflow entities --------------------------------------------
def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys -> string values, as MLflow params; lists as JSON. ``tracking.*`` is left
    out: where a run was logged is not a setting of the run (the same run logged after the
    fact would otherwise differ)."""
    params: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if name == "tracking":
            continue
        if isinstance(value, Mapping):
            params.update(flatten_config(value, f"{name}."))
            continue
        text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        if len(text) > MAX_PARAM_LENGTH:  # MLflow refuses longer values; report.json has it
            text = text[:MAX_PARAM_LENGTH - 40] + " ... (truncated: see report.json)"
        params[name] = text
    return params


def metric_key(*parts: str) -> str:
    """A metric name MLflow accepts: site names are ours to choose, MLflow allows only
    letters, digits, ``_ - . /`` and spaces."""
    return "/".join(_METRIC_NAME_UNSAFE.sub("_", str(p)) for p in parts)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)  # NaN is kept: MLflow stores it, and an undefined AUROC is a fact


def round_metrics(report: Mapping[str, Any]) -> list[tuple[str, float, int, float | None]]:
    """``(key, value, step, time_s)`` for every global, per-site and ε value of every round;
    time_s is when the round ended (None when the report does not say)."""
    rows: list[tuple[str, float, int, float | None]] = []
    initial = (report.get("initial") or {}).get("global") or {}
    first = (report.get("rounds") or [{}])[0].get("started_at")
    for name, value in initial.items():
        if (v := _number(value)) is not None:
            rows.append((metric_key("global", name), v, 0, first))
    epsilons = epsilon_by_round(report)
    hospital = hospital_epsilon_by_round(report)
    for entry in report.get("rounds", []):
        step = int(entry["round"])
        ended = (entry["started_at"] + (entry.get("duration_s") or 0.0)
                 if entry.get("started_at") is not None else None)
        for name, value in (entry.get("global") or {}).items():
            if (v := _number(value)) is not None:
                rows.append((metric_key("global", name), v, step, ended))
        for site, metrics in sorted((entry.get("sites") or {}).items()):
            for name, value in metrics.items():
                if (v := _number(value)) is not None:
                    rows.append((metric_key("site", site, name), v, step, ended))
        spent = epsilons.get(step, {})
        for site, epsilon in sorted(spent.items()):
            rows.append((metric_key("epsilon", site), epsilon, step, ended))
        if spent:
            rows.append(("epsilon/max", max(spent.values()), step, ended))
        if (v := _number(hospital.get(step))) is not None:
            rows.append(("hospital_epsilon", v, step, ended))
    return rows


def hospital_epsilon_by_round(report: Mapping[str, Any]) -> dict[int, float]:
    """privacy=site_dp: the hospital-level ε after each released round (report.json
    ``hospital_privacy.rounds[].epsilon_after``); empty otherwise."""
    section = report.get("hospital_privacy") or {}
    return {int(r["round"]): r["epsilon_after"] for r in section.get("rounds") or []
            if r.get("epsilon_after") is not None}


def epsilon_by_round(report: Mapping[str, Any]) -> dict[int, dict[str, float]]:
    """round -> site -> cumulative ε after that round, for the sites that trained in it.

    A round's own ``privacy`` (site -> ledger) is used when the report has one. Otherwise
    each site's ``epsilon_per_round`` (one entry per round it TRAINED, privacy/accounting.py)
    is laid on the rounds listing it under ``train``; a site whose count of entries differs
    (a reply lost after training spends ε the server never saw) gets no per-round series
    rather than a shifted one: its final ε is still logged (``final_epsilon/<site>``)."""
    rounds = report.get("rounds", [])
    out: dict[int, dict[str, float]] = {}
    if any(isinstance(r.get("privacy"), Mapping) for r in rounds):
        for entry in rounds:
            for site, led in (entry.get("privacy") or {}).items():
                value = _number(led.get("epsilon") if isinstance(led, Mapping) else led)
                if value is not None:
                    out.setdefault(int(entry["round"]), {})[site] = value
        return out
    for site, led in (report.get("privacy") or {}).items():
        series = led.get("epsilon_per_round") if led.get("dp") else None
        trained = [int(r["round"]) for r in rounds if site in (r.get("train") or {})]
        if not series or len(series) != len(trained):
            continue
        for step, value in zip(trained, series, strict=True):
            out.setdefault(step, {})[site] = float(value)
    return out


def summary_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """One value each, for comparing runs side by side in ``mlflow ui``'s table."""
    out: dict[str, float] = {}
    final = report.get("final") or {}
    for prefix, metrics in (("final", final.get("global")),
                            ("final_client_mean", final.get("client_mean"))):
        for name, value in (metrics or {}).items():
            if (v := _number(value)) is not None:
                out[metric_key(prefix, name)] = v
    for site, led in sorted((report.get("privacy") or {}).items()):
        if led.get("dp") and (v := _number(led.get("epsilon"))) is not None:
            out[metric_key("final_epsilon", site)] = v
    if (v := _number((report.get("hospital_privacy") or {}).get("epsilon"))) is not None:
        out["final_hospital_epsilon"] = v  # privacy=site_dp: the whole federation's
    baselines = report.get("baselines") or {}
    for kind, section in (("baseline_local", (baselines.get("local") or {}).get("client_mean")),
                          ("baseline_pooled", (baselines.get("pooled") or {}).get("global"))):
        for name, value in (section or {}).items():
            if (v := _number(value)) is not None:
                out[metric_key(kind, name)] = v
    if (v := _number((report.get("run") or {}).get("duration_s"))) is not None:
        out["run/duration_s"] = v
    return out


def hydra_job(out_dir: Path) -> dict[str, Any]:
    """The overrides of the Hydra job that wrote ``out_dir`` (its .hydra/ folder) and, in a
    ``-m`` sweep, the sweep's folder and the keys it varied (its multirun.yaml); empty for a
    run made without Hydra (tests, ``flwr run``)."""
    path = out_dir / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    hydra = OmegaConf.load(path).hydra
    job: dict[str, Any] = {
        "overrides": list(OmegaConf.select(hydra, "overrides.task", default=[]) or [])}
    if not str(OmegaConf.select(hydra, "mode", default="")).endswith("MULTIRUN"):
        return job
    job["job_num"] = OmegaConf.select(hydra, "job.num", default=None)
    job["sweep_dir"] = str(OmegaConf.select(hydra, "sweep.dir", default=""))
    sweep_file = next((p / "multirun.yaml" for p in out_dir.parents
                       if (p / "multirun.yaml").is_file()), None)
    if sweep_file is not None:
        job["sweep_dir"] = str(sweep_file.parent)
        swept = OmegaConf.select(OmegaConf.load(sweep_file), "hydra.overrides.task") or []
        job["varied"] = sorted({o.split("=", 1)[0] for o in swept if _is_sweep(o)})
    return job


def _is_sweep(override: str) -> bool:
    """``lr=0.01,0.1``, ``seed=range(3)``, ``lr=choice(...)``: a key a ``-m`` sweep varies."""
    value = override.split("=", 1)[-1]
    return "," in value or value.startswith(("range(", "choice(", "interval(", "glob("))


def run_name(report: Mapping[str, Any], out_dir: Path, job: Mapping[str, Any]) -> str:
    """What the sweep varied (``lr=0.01,privacy=dp``), else the run's own overrides, else the
    task and the run's folder."""
    chosen = [o for o in job.get("overrides", [])
              if not o.lstrip("+~").startswith(("hydra.", "tracking"))]
    varied = [o for o in chosen if o.lstrip("+~").split("=", 1)[0] in job.get("varied", [])]
    if varied or chosen:
        return ",".join(varied or chosen)
    return f"{(report.get('run') or {}).get('task', 'run')} {out_dir.parent.name}/{out_dir.name}"


def _tags(report: Mapping[str, Any], out_dir: Path, job: Mapping[str, Any],
          digest: str) -> dict[str, str]:
    run = report.get("run") or {}
    tags = {
        f"{TAG_PREFIX}report_sha256": digest,  # the same report is never logged twice
        f"{TAG_PREFIX}run_dir": str(out_dir.resolve()),
        f"{TAG_PREFIX}task": str(run.get("task")),
        f"{TAG_PREFIX}privacy": str(run.get("privacy")),
        f"{TAG_PREFIX}stopped_early": str(run.get("stopped_early") or ""),
    }
    for package, version in (run.get("versions") or {}).items():
        tags[f"{TAG_PREFIX}version.{package}"] = str(version)
    if job.get("sweep_dir"):
        tags[f"{TAG_PREFIX}sweep_dir"] = job["sweep_dir"]
        tags[f"{TAG_PREFIX}job_num"] = str(job.get("job_num"))
    markdown = out_dir / "report.md"
    if markdown.is_file():  # mlflow ui shows the run's description as rendered Markdown
        note = markdown.read_text(encoding="utf-8")
        if len(note) > MAX_TAG_LENGTH:
            note = note[:MAX_TAG_LENGTH - 60] + "\n\n... (the whole report: artifact report.md)"
        tags["mlflow.note.content"] = note
    return tags


# -- logging ------------------------------------------------------------------------------
def log_run(cfg: Mapping[str, Any], out_dir: Path | str) -> str:
    """Log the finished run in ``out_dir`` as ``cfg['tracking']`` says; returns the MLflow run
    id. The hook simulations/run.py calls once a run has written its report."""
    check(cfg)
    tracking = cfg["tracking"]
    return log_report(out_dir, uri=tracking["uri"], experiment=tracking["experiment"])


def log_report(out_dir: Path | str, *, uri: str, experiment: str) -> str:
    """Log one run folder (its report.json and artifacts) as one MLflow run; the MLflow run
    id. A report already logged to this experiment (same SHA-256) is not logged again."""
    out_dir = Path(out_dir).resolve()
    report, raw = read_report(out_dir)
    if importlib.util.find_spec("mlflow") is None:
        raise TrackingError(INSTALL_HINT)
    try:
        return _log(report, out_dir, hashlib.sha256(raw).hexdigest(),
                    uri=tracking_uri(uri), experiment=experiment)
    except TrackingError:
        raise
    except Exception as err:  # MLflow's own errors (store unreachable, refused value, ...)
        raise TrackingError(
            f"logging {out_dir} to MLflow at {uri} failed: {type(err).__name__}: {err}. The "
            f"run's folder is complete; log it later with: python -m simulations.tracking "
            f"{out_dir} --uri {uri} --experiment {experiment}") from err


def read_report(out_dir: Path) -> tuple[dict[str, Any], bytes]:
    """The run folder's report.json, parsed, and its bytes (hashed to log a report once)."""
    report_path = out_dir / "report.json"
    if not report_path.is_file():
        raise TrackingError(f"{out_dir} holds no report.json: not a finished medsilo run "
                            "(the report is written last, once the run's outputs are complete)")
    raw = report_path.read_bytes()
    try:
        report = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TrackingError(f"{report_path} is not valid JSON ({err})") from err
    if not isinstance(report, dict) or not isinstance(report.get("rounds"), list):
        raise TrackingError(f"{report_path} is not a medsilo report: expected an object with "
                            "a 'rounds' list")
    return report, raw


def _log(report: Mapping[str, Any], out_dir: Path, digest: str, *, uri: str,
         experiment: str) -> str:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, uri, experiment)
    done = client.search_runs([experiment_id],
                              f"tags.`{TAG_PREFIX}report_sha256` = '{digest}'", max_results=1)
    if done:
        return done[0].info.run_id
    job = hydra_job(out_dir)
    now = time.time()
    rounds = report.get("rounds") or []
    started = next((r["started_at"] for r in rounds if r.get("started_at") is not None), None)
    run = client.create_run(experiment_id, run_name=run_name(report, out_dir, job),
                            start_time=int((started or now) * 1000))
    run_id = run.info.run_id
    config = (report.get("run") or {}).get("config") or {}
    metrics = [Metric(key, value, int((at or now) * 1000), step)
               for key, value, step, at in round_metrics(report)]
    last = max((int(r["round"]) for r in rounds), default=0)
    metrics += [Metric(key, value, int(now * 1000), last)
                for key, value in summary_metrics(report).items()]
    client.log_batch(
        run_id, metrics=metrics,
        params=[Param(k, v) for k, v in sorted(flatten_config(config).items())],
        tags=[RunTag(k, v) for k, v in _tags(report, out_dir, job, digest).items()])
    for name in ARTIFACT_FILES:
        if (out_dir / name).is_file():
            client.log_artifact(run_id, str(out_dir / name))
    for folder, artifact_path in ARTIFACT_DIRS.items():
        if (out_dir / folder).is_dir():
            client.log_artifacts(run_id, str(out_dir / folder), artifact_path)
    # a run stopped early (Ctrl-C, no site able to train) still ended: its report is complete
    client.set_terminated(run_id, "FINISHED",
                          end_time=int(((started or now) + _duration(report)) * 1000))
    return run_id


def _duration(report: Mapping[str, Any]) -> float:
    value = _number((report.get("run") or {}).get("duration_s"))
    return value if value is not None and math.isfinite(value) else 0.0


def _experiment_id(client: Any, uri: str, name: str) -> str:
    """The experiment's id, created on first use. In a local SQLite store its artifacts go
    beside the database (``mlartifacts/``), not into whatever folder the command ran in."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        location = None
        if uri.startswith("sqlite:///"):
            database = Path(uri.removeprefix("sqlite:///")).resolve()
            database.parent.mkdir(parents=True, exist_ok=True)
            location = (database.parent / "mlartifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # a parallel sweep job created it first
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        raise TrackingError(
            f"MLflow experiment {name!r} was deleted in {uri}: restore it (mlflow experiments "
            "restore --experiment-id " + found.experiment_id + ") or choose another with "
            "tracking.experiment=NAME")
    return found.experiment_id


# -- after the fact ------------------------------------------------------------------------
def run_folders(paths: list[Path]) -> Iterator[Path]:
    """Each path that is a run folder (holds report.json), or the run folders below it (a
    sweep's folder, outputs/), in sorted order."""
    for path in paths:
        if not path.is_dir():
            raise TrackingError(f"{path} is not a folder (expected a run folder holding "
                                "report.json, or a folder of runs such as a sweep's)")
        if (path / "report.json").is_file():
            yield path
            continue
        found = sorted(p.parent for p in path.rglob("report.json"))
        if not found:
            raise TrackingError(f"{path} holds no report.json, nor does any folder below it: "
                                "no finished medsilo run to log")
        yield from found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.tracking",
        description="Log finished medsilo runs (folders holding report.json, or folders of "
                    "them such as a sweep's) to MLflow, one MLflow run each; a run already "
                    "logged to the experiment is skipped.")
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    parser.add_argument("--uri", default=None,
                        help="MLflow tracking URI or a SQLite file path (default: "
                             "conf/tracking/mlflow.yaml's, outputs/mlflow.db)")
    parser.add_argument("--experiment", default=None,
                        help="MLflow experiment (default: medsilo-<the run's task>)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("mlflow") is None:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    stores = []
    try:
        for folder in run_folders(args.dirs):
            report, _ = read_report(folder)
            defaults = default_settings(str((report.get("run") or {}).get("task", "run")))
            uri = tracking_uri(args.uri or defaults["uri"])
            experiment = args.experiment or defaults["experiment"]
            run_id = log_report(folder, uri=uri, experiment=experiment)
            print(f"{folder} -> {uri} · experiment {experiment} · run {run_id}")
            stores += [uri] * (uri not in stores)
    except TrackingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for uri in stores:
        if uri.startswith("sqlite:"):
            print(f"browse: mlflow ui --backend-store-uri {uri}  (needs '.[tracking-ui]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
