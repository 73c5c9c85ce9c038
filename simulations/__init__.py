"""Local simulation of many hospitals on one machine (Flower's Ray engine), and audits.

From Python (a script or a notebook)::

    from simulations import simulate
    report = simulate(["task=tabular", "rounds=2", "privacy=dp"])
    report["final"]["global"]["auroc"], report["privacy"]["hospital_01"]["epsilon"]

``simulate`` takes the overrides ``python -m simulations.run`` takes, composes the same Hydra
config (``conf/``), validates it (a bad value raises ``server.settings.ConfigError`` naming the
key), runs the simulation and returns report.json as a dict; the run directory is ``out_dir``
(default ``outputs/<date>/<time>``, as on the command line). Code the sites run (a model or a
task of your own) must be importable by Ray's workers: docs/extending.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["simulate"]


def simulate(overrides: Sequence[str] = (), out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one simulation with these Hydra overrides; return its report (report.json)."""
    import time

    from server.settings import compose
    from simulations.run import simulate as run_simulation
    from simulations.run import track
    from simulations.tracking import check as check_tracking

    if isinstance(overrides, str):
        raise TypeError("overrides is a list of strings, e.g. ['task=tabular', 'rounds=2']")
    cfg = compose(list(overrides))
    check_tracking(cfg)
    if cfg.get("resume"):  # the interrupted run's folder, as on the command line
        out = Path(cfg["resume"])
    elif out_dir is not None:
        out = Path(out_dir)
    else:
        out = Path("outputs", time.strftime("%Y-%m-%d"), time.strftime("%H-%M-%S"))
    out.mkdir(parents=True, exist_ok=True)
    report = run_simulation(cfg, out)
    track(cfg, out)  # tracking=mlflow: the finished run logged (docs/tracking.md)
    return report
