"""The run settings the server sends and the site reads (privacy/run_settings.py): one typed
definition; every field is a config key; the site checks every value's type."""

from __future__ import annotations

import dataclasses

import pytest
from flwr.app import ConfigRecord

from client.training import local_training_config
from privacy import protocol
from privacy.run_settings import PrivacySettings, RunSettingsError, TrainSettings
from server.settings import ConfigError, compose, site_settings


def test_weight_decay_is_configurable_sent_and_used():
    cfg = compose(["task=tabular", "weight_decay=0.01"])
    sent = site_settings(cfg).train
    assert sent.weight_decay == 0.01
    assert local_training_config(sent, dp=False, train_labels=[0, 1], num_classes=2,
                                 ).weight_decay == 0.01
    with pytest.raises(ConfigError, match="weight_decay must be a number >= 0"):
        compose(["task=tabular", "weight_decay=-1"])


def test_every_setting_the_site_reads_is_a_config_key():
    """No drift: each field of what is sent comes from conf/ (top level for train, the
    privacy group for privacy)."""
    cfg = compose(["task=tabular", "privacy=dp"])
    assert {f.name for f in dataclasses.fields(TrainSettings)} <= set(cfg)
    assert {f.name for f in dataclasses.fields(PrivacySettings)} == set(cfg["privacy"])


def test_the_settings_survive_the_message_exactly():
    settings = site_settings(compose(["task=vitals", "privacy=dp", "rounds=7"]))
    record = ConfigRecord({**protocol.encode_run_settings(settings), protocol.SERVER_ROUND: 3})
    decoded = protocol.decode_run_settings(record)
    assert decoded == dataclasses.replace(settings, server_round=3)
    assert decoded.privacy.target_epsilon == 8.0 and decoded.rounds == 7


@pytest.mark.parametrize("key, value, expected", [
    ("train.lr", "fast", "run setting 'train.lr' must be float, got 'fast'"),
    ("train.local_epochs", 1.5, "run setting 'train.local_epochs' must be int"),
    ("privacy.secure_noise", 1, "run setting 'privacy.secure_noise' must be bool"),
    ("privacy.sigma", 1.0, "unknown run setting(s) ['privacy.sigma']"),
])
def test_a_setting_of_the_wrong_type_is_named_at_the_site(key, value, expected):
    record = protocol.encode_run_settings(site_settings(compose(["task=tabular"])))
    record[protocol.RUN_PREFIX + key] = value
    with pytest.raises(RunSettingsError) as error:
        protocol.decode_run_settings(record)
    assert expected in str(error.value)
