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


def test_every_run_config_key_the_release_declares_composes_and_the_deploy_doc_uses_only_them():
    """`flwr run --run-config` may set only the keys of [tool.flwr.app.config] (Flower refuses
    others without naming them); each declared key must be a valid override, and the commands
    in docs/deploy.md must use declared keys only."""
    import re
    import tomllib
    from pathlib import Path

    from server.settings import overrides_from_run_config

    root = Path(__file__).resolve().parent.parent
    declared = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"]
    assert {"privacy", "secagg", "min_sites", "connect_timeout_s"} <= set(declared)
    release = {**declared, "privacy": "dp", "secagg": "on", "num_hospitals": 3, "rounds": 2}
    cfg = compose(overrides_from_run_config(release))
    assert (cfg["privacy"]["name"], cfg["secagg"]["name"], cfg["min_sites"]) == ("dp", "on", 1)
    doc = (root / "docs" / "deploy.md").read_text()
    used = {key for config in re.findall(r"--run-config\s+['\"](.+?)['\"]\s*$", doc, re.M)
            for key in re.findall(r"(?:^|\s)([\w.]+)=", config)}
    assert used and used <= set(declared), sorted(used - set(declared))
    from hydra.errors import MissingConfigException

    # a bad value of a declared key: named, with the accepted values
    with pytest.raises(MissingConfigException, match=r"(?s)privacy/dpp.*options in 'privacy'"):
        compose(overrides_from_run_config({**declared, "privacy": "dpp"}))
