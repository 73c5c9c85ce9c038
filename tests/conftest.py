"""Shared fixtures: tests never touch the user's cache. Plain helpers (ROOT, running a
simulation as a user would) are in tests/helpers.py: conftest.py is not imported."""

from __future__ import annotations

import pytest
import torch


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
