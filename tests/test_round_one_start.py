"""Round 1 starts without waiting for the server's own scoring of the initial model (issue 18).

The pooled evaluation of the initial model (round 0 of report.json) used to run before round 1's
first message was sent: at 1000 hospitals about a second (the pool's sites written and read,
scikit-learn imported). It now runs while round 1's sites train, with the same numbers, and a
failure in it still fails the run.
"""

from __future__ import annotations

import threading

import pytest
import torch
from flwr.app import ArrayRecord

import client.app
import simulations.global_evaluation
from client.tasks import DataError
from server.app import initial_model
from server.settings import compose
from simulations.sites import lazy_synthetic_sites
from tests.in_process_grid import simulate_in_process

RUN = ("task=tabular", "num_hospitals=3", "rounds=2", "local_epochs=1", "seed=5")
# long enough for a site's first training on a loaded machine; a round loop that scores the
# initial model first never trains a site while waiting, and fails after this long
WAIT_FOR_TRAINING_S = 60.0


def _overrides(tmp_path):
    return (*RUN, f"data.cache_dir={tmp_path / 'cache'}")


def test_round_1_trains_while_the_initial_model_is_scored_with_the_same_numbers(
        tmp_path, monkeypatch):
    site_trained = threading.Event()
    train_local = client.app.train_local

    def training_site(*args, **kwargs):
        site_trained.set()
        return train_local(*args, **kwargs)

    monkeypatch.setattr(client.app, "train_local", training_site)
    pooled = simulations.global_evaluation.pooled_test_evaluation
    seen = {}

    def scored_after_a_site_trained(cfg, folders, prepare=None):
        evaluate_global = pooled(cfg, folders, prepare)

        def evaluate(server_round, arrays):
            if server_round == 0:
                seen["site trained first"] = site_trained.wait(WAIT_FOR_TRAINING_S)
            return evaluate_global(server_round, arrays)

        evaluate.sites = evaluate_global.sites
        return evaluate

    monkeypatch.setattr(simulations.global_evaluation, "pooled_test_evaluation",
                        scored_after_a_site_trained)
    report = simulate_in_process(tmp_path / "run", *_overrides(tmp_path))

    assert seen == {"site trained first": True}
    # the initial model, scored alone on the same pool: the numbers the report holds
    cfg = compose(list(_overrides(tmp_path)))
    lazy = lazy_synthetic_sites(cfg)
    alone = pooled(cfg, lazy.folders(), prepare=lazy.ensure)(
        0, ArrayRecord(initial_model(cfg).state_dict()))
    assert report["initial"]["global"] == alone
    assert report["initial"]["global"]["loss"] > report["final"]["global"]["loss"]


def test_a_failing_initial_evaluation_still_fails_the_run(tmp_path, monkeypatch):
    """The error surfaces where the round loop reads the result (after round 1's training),
    as the same exception: the command line answers it as before (a DataError: one line)."""
    pooled = simulations.global_evaluation.pooled_test_evaluation

    def broken_pool(cfg, folders, prepare=None):
        evaluate_global = pooled(cfg, folders, prepare)

        def evaluate(server_round, arrays):
            raise DataError("hospital_01/test.csv: row 3 has 11 columns, expected 12")

        evaluate.sites = evaluate_global.sites
        return evaluate

    monkeypatch.setattr(simulations.global_evaluation, "pooled_test_evaluation", broken_pool)
    with pytest.raises(DataError, match="row 3 has 11 columns"):
        simulate_in_process(tmp_path / "run", *_overrides(tmp_path))
    assert not (tmp_path / "run" / "report.json").exists()


def test_the_pooled_evaluation_draws_nothing_from_torchs_global_rng(tmp_path):
    """It runs beside round 1's training, which in one process (tests, in-process sites) seeds
    its dropout masks from torch's global RNG: a draw in between made those runs differ."""
    cfg = compose(list(_overrides(tmp_path)))
    lazy = lazy_synthetic_sites(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    evaluate_global = simulations.global_evaluation.pooled_test_evaluation(
        cfg, lazy.folders(), prepare=lazy.ensure)
    first = evaluate_global(0, arrays)
    assert torch.equal(torch.rand(4), expected)
    assert evaluate_global(0, arrays) == first  # the model built once is reloaded each call
