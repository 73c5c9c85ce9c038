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

import torch
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
    """The server's evaluation of a global model on the pool's test splits.

    ``prepare(site)`` writes a synthetic site that does not exist yet; given it (synthetic sites
    written on first use, the default), the pool is written, read and scored on the first call,
    which the round loop makes while round 1's sites train (server/rounds.py
    ``InitialEvaluation``): at 1000 sites that work (50 sites written and read, scikit-learn
    and SciPy imported, ~1 s) no longer comes before round 1. Files of the user's (data.root,
    a split data.path) are read here, before anything starts, so that a bad one is refused in
    one line before Ray does (simulations/run.py)."""
    names = pooled_sites(cfg, list(folders))
    pool = _TestPool(cfg, folders, names, prepare)
    if prepare is None:
        pool.dataset()
    # The first call runs beside round 1's training, which may share this process (tests,
    # in-process sites) and seeds its dropout masks from torch's global RNG: scoring draws
    # nothing from it. The model is built once, here, its random initial weights drawn with the
    # global RNG's state restored afterwards; each call loads the weights to score into it.
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg["model"], pool.task.input_spec(cfg["task"]))
    own_rng = torch.Generator()

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(model, pool.dataset(), pool.num_classes, generator=own_rng)

    evaluate_global.sites = names  # type: ignore[attr-defined]  # named in the report
    return evaluate_global


class _TestPool:
    """The pooled test splits, written (``prepare``) and read once, when first needed."""

    def __init__(self, cfg: Mapping[str, Any], folders: Mapping[str, Path], names: list[str],
                 prepare: Callable[[str], Path] | None) -> None:
        self.task_cfg = cfg["task"]
        self.task = get_task(self.task_cfg["name"])
        self.num_classes = int(self.task_cfg["spec"]["num_classes"])
        self._folders, self._names, self._prepare = folders, names, prepare
        self._pooled: ConcatDataset | None = None
        self._lock = threading.Lock()

    def dataset(self) -> ConcatDataset:
        with self._lock:
            if self._pooled is None:
                if self._prepare is not None:
                    for site in self._names:
                        self._prepare(site)
                self._pooled = ConcatDataset([
                    self.task.load_site(self._folders[site], self.task_cfg, site).test
                    for site in self._names])
            return self._pooled
