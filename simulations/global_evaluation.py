"""In simulation the server may evaluate on the union of all sites' test splits.

That is what a research simulation wants to compare strategies; in deployment no such pool
exists and the report uses the example-weighted mean of the sites' own evaluations instead.

With many sites (``simulation.pooled_eval_sites``, default 50) the pool is the test splits of a
seeded sample of that many sites, fixed for the whole run: every round is scored on the same
records, and the server's memory and evaluation time stay those of 50 sites at 1000.
"""

from __future__ import annotations

import random
import threading
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

    A user's sites (``prepare`` None) are read now, so that a bad file is refused before the
    simulation starts. Synthetic sites written on first use are written and read at the first
    evaluation instead: that runs in the ServerApp while Ray starts its processes (the main
    thread goes on to start Ray at once), not before Ray starts, which delayed round 1 by the
    whole pool (50 sites)."""
    task_cfg = cfg["task"]
    task = get_task(task_cfg["name"])
    names = pooled_sites(cfg, list(folders))
    num_classes = int(task_cfg["spec"]["num_classes"])

    def load_pool() -> ConcatDataset:
        if prepare is not None:
            for site in names:
                prepare(site)
        return ConcatDataset([task.load_site(folders[site], task_cfg, site).test
                              for site in names])

    pool: list[ConcatDataset] = [] if prepare is not None else [load_pool()]
    loading = threading.Lock()

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        with loading:
            if not pool:
                pool.append(load_pool())
        model = build_model(cfg["model"], task.input_spec(task_cfg))
        model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(model, pool[0], num_classes)

    evaluate_global.sites = names  # type: ignore[attr-defined]  # named in the report
    return evaluate_global
