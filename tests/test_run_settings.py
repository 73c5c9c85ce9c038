"""The run settings the server sends and the site reads: every setting the site uses is one the
server sends and the config can set (no drift between the two sides)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from client.training import local_training_config
from server.settings import ConfigError, compose, site_settings

ROOT = Path(__file__).resolve().parent.parent


def test_weight_decay_is_configurable_sent_and_used():
    cfg = compose(["task=tabular", "weight_decay=0.01"])
    sent = site_settings(cfg)["train"]
    assert sent["weight_decay"] == 0.01
    assert local_training_config(sent, dp=False, train_labels=[0, 1], num_classes=2,
                                 ).weight_decay == 0.01
    with pytest.raises(ConfigError, match="weight_decay must be a number >= 0"):
        compose(["task=tabular", "weight_decay=-1"])


def test_every_train_key_the_site_reads_is_sent_by_the_server():
    """``client/training.py`` reads ``train[...]`` / ``train.get(...)``: each key must be in
    what ``server/settings.site_settings`` sends."""
    source = (ROOT / "client" / "training.py").read_text()
    read = set(re.findall(r"train(?:\.get)?\(?\[?\"(\w+)\"", source))
    assert {"local_epochs", "batch_size", "lr", "weight_decay"} <= read
    sent = set(site_settings(compose(["task=tabular"]))["train"])
    assert read <= sent, sorted(read - sent)
