"""Label skew between hospitals: logit adjustment at the site (``class_balance``), and where it
stops (DP-SGD does not cover a prior computed from the site's exact label counts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from client.training import local_training_config, train_local
from models import build_model
from privacy.run_settings import TrainSettings
from server.settings import ConfigError, compose

TRAIN = {"local_epochs": 5, "batch_size": 16, "lr": 0.05, "momentum": 0.9, "optimizer": "sgd"}


def _train(class_balance: str) -> TrainSettings:
    return TrainSettings.from_dict({**TRAIN, "class_balance": class_balance})


def test_auto_adjusts_logits_with_the_site_prior_without_dp_and_never_under_dp():
    labels = np.array([0, 1, 1, 1])
    plain = local_training_config(_train("auto"), dp=False,
                                  train_labels=labels, num_classes=3)
    assert plain.class_prior == pytest.approx((0.25, 0.75, 0.0))
    private = local_training_config(_train("auto"), dp=True,
                                    train_labels=labels, num_classes=3)
    assert private.class_prior is None
    none = local_training_config(_train("none"), dp=False,
                                 train_labels=labels, num_classes=3)
    assert none.class_prior is None


def test_a_dp_site_refuses_a_prior_from_its_exact_label_counts():
    with pytest.raises(ValueError, match="not covered by DP-SGD"):
        local_training_config(_train("logit_adjust"), dp=True,
                              train_labels=np.array([0, 1]), num_classes=2)


def test_a_dp_site_uses_only_the_public_prior_never_its_own_counts():
    config = local_training_config(_train("auto"), dp=True,
                                   train_labels=np.array([1, 1, 1, 1]), num_classes=2,
                                   public_prior=[86, 14])
    assert config.class_prior == pytest.approx((0.86, 0.14))  # not the site's (0, 1)


@pytest.mark.parametrize("overrides, message", [
    (["privacy=dp", "class_balance=logit_adjust"], "class_balance must be 'auto' or 'none'"),
    (["task=vitals", "task.class_prior=[0.9]"], "task.class_prior must be null or 2 numbers"),
    (["class_balance=balanced"], "class_balance must be one of"),
])
def test_bad_class_balance_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose(overrides)


def test_a_one_class_site_barely_pulls_the_model_to_its_class(one_thread):
    """A hospital whose training split holds one class: plain training teaches the shared model
    to predict that class for everyone; with its prior in the logits it has nothing to explain."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 8, generator=generator)
    site = TensorDataset(features, torch.ones(200, dtype=torch.int64))
    probe = torch.randn(500, 8, generator=generator)

    def p_class_1(balance: str) -> float:
        torch.manual_seed(0)
        model = build_model({"name": "mlp", "hidden": [], "dropout": 0.0},
                            {"num_features": 8, "num_classes": 2})
        config = local_training_config(_train(balance), dp=False,
                                       train_labels=site.tensors[1].numpy(), num_classes=2)
        train_local(model, site, config, seed=0)
        with torch.no_grad():
            return float(torch.softmax(model(probe), dim=1)[:, 1].mean())

    plain, adjusted = p_class_1("none"), p_class_1("logit_adjust")
    assert plain > 0.95  # the site's majority for everyone
    assert adjusted < 0.75 and adjusted < plain - 0.2
