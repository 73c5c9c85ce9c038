"""In simulation the server may evaluate on the union of all sites' test splits.

That is what a research simulation wants to compare strategies; in deployment no such pool
exists and the report uses the example-weighted mean of the sites' own evaluations instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from torch.utils.data import ConcatDataset

from client.evaluation import evaluate
from client.tasks import get_task
from models import build_model


def pooled_test_evaluation(cfg: Mapping[str, Any], folders: Mapping[str, Path]):
    task_cfg = cfg["task"]
    task = get_task(task_cfg["name"])
    sites = [task.load_site(folder, task_cfg, site) for site, folder in folders.items()]
    pooled = ConcatDataset([s.test for s in sites])
    num_classes = int(task_cfg["spec"]["num_classes"])

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        model = build_model(cfg["model"], task.input_spec(task_cfg))
        model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(model, pooled, num_classes)

    return evaluate_global
