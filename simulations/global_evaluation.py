"""In simulation the server may evaluate on the union of all sites' test splits.

That is what a research simulation wants to compare strategies; in deployment no such pool
exists and the report uses the example-weighted mean of the sites' own evaluations instead.

With many sites (``simulation.pooled_eval_sites``, default 50) the pool is the test splits of a
seeded sample of that many sites, fixed for the whole run: every round is scored on the same
records, and the server's memory and evaluation time stay those of 50 sites at 1000.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from torch.utils.data import ConcatDataset

from client.evaluation import evaluate
from client.tasks import get_task
from models import build_model


def pooled_sites(cfg: Mapping[str, Any], site_ids: list[str]) -> list[str]:
    """The sites whose test splits make the pool: all, or a seeded sample of
    ``simulation.pooled_eval_sites`` of them (in site order)."""
    cap = cfg["simulation"].get("pooled_eval_sites")
    if cap is None or len(site_ids) <= int(cap):
        return list(site_ids)
    draw = random.Random(f"medsilo-pooled-evaluation:{cfg['seed']}")
    return sorted(draw.sample(sorted(site_ids), int(cap)))


def pooled_test_evaluation(cfg: Mapping[str, Any], folders: Mapping[str, Path],
                           prepare: Callable[[str], Path] | None = None):
    """``prepare(site)`` first writes a synthetic site that does not exist yet.

    Everything the first evaluation needs is done here, before the simulation starts Ray (the
    ServerApp evaluates the initial model before round 1): the pool's sites written and read,
    and scikit-learn, which scores them, imported (1-2 s with scipy). Done in the ServerApp, this
    work competed for the CPU with Ray's processes starting (each site worker importing torch)
    and delayed round 1 by 2-3 times as long (measured on 2 cores)."""
    task_cfg = cfg["task"]
    task = get_task(task_cfg["name"])
    names = pooled_sites(cfg, list(folders))
    if prepare is not None:
        for site in names:
            prepare(site)
    sites = [task.load_site(folders[site], task_cfg, site) for site in names]
    pooled = ConcatDataset([s.test for s in sites])
    num_classes = int(task_cfg["spec"]["num_classes"])
    import sklearn.metrics  # noqa: F401  (client.evaluation imports it when it first scores)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        model = build_model(cfg["model"], task.input_spec(task_cfg))
        model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(model, pooled, num_classes)

    evaluate_global.sites = names  # type: ignore[attr-defined]  # named in the report
    return evaluate_global
