"""Shared fixtures: tests never touch the user's cache, and simulations run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MEDSILO_CACHE", str(tmp_path_factory.getbasetemp() / "medsilo-cache"))


@pytest.fixture
def one_thread():
    """Small models train fastest (and reproducibly) on one thread of a shared 2-core machine,
    as a simulated site does (threads=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_simulation_cli(out_dir: Path, *overrides: str, timeout: float = 300) -> dict:
    """``python -m simulations.run`` in a subprocess; returns report.json. Without the
    local/pooled baselines unless a test asks for them (they double a small run's time)."""
    if not any(o.startswith("baselines=") for o in overrides):
        overrides = (*overrides, "baselines=none")
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run", f"hydra.run.dir={out_dir}", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"simulation failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads((out_dir / "report.json").read_text())


@pytest.fixture(scope="session")
def small_tabular_cfg():
    """A small DP tabular run's composed config (RDP accountant: fast), for site-side tests."""
    from server.settings import compose

    return compose(["task=tabular", "task.synthetic.train_size=40",
                    "task.synthetic.test_size=16", "local_epochs=1", "privacy=dp",
                    "privacy.accountant=rdp", "model.hidden=[32,16]"])


@pytest.fixture(scope="session")
def small_tabular_site(small_tabular_cfg, tmp_path_factory):
    """One synthetic tabular site's folder (``hospital_x``) for ``small_tabular_cfg``."""
    from simulations.synthetic import get_generator

    folder = tmp_path_factory.mktemp("site") / "hospital_x"
    generator = get_generator("tabular")
    task_cfg = small_tabular_cfg["task"]
    generator.generate_site(folder, task_cfg, generator.site_profiles(task_cfg, 1, 0)[0], 0)
    return folder
