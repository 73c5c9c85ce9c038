"""Configuration: bad values fail with a clear message before anything starts."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from server.settings import ConfigError, compose
from tests.helpers import ROOT


def test_defaults_compose_and_are_valid():
    cfg = compose([])
    assert cfg["num_hospitals"] == 4 and cfg["rounds"] == 5 and cfg["seed"] == 0
    assert cfg["device"] == "auto"
    assert cfg["task"]["name"] == "images" and cfg["model"]["name"] == "cnn"
    assert cfg["strategy"]["name"] == "fedavg"
    assert cfg["privacy"]["name"] == "off" and cfg["secagg"]["name"] == "off"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("num_hospitals=0", "num_hospitals"),
        ("rounds=0", "rounds"),
        ("rounds=-3", "rounds"),
        ("local_epochs=0", "local_epochs"),
        ("batch_size=0", "batch_size"),
        ("lr=0", "lr"),
        ("seed=-1", "seed"),
        ("device=tpu", "device"),
        ("strategy.fraction_train=1.5", "strategy.fraction_train"),
        ("rounds=two", "rounds"),
    ],
)
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key} must be"):
        compose([override])


def test_unknown_group_value_lists_valid_choices():
    with pytest.raises(MissingConfigException) as err:
        compose(["strategy=fedbogus"])
    message = str(err.value)
    for choice in ("fedavg", "fedprox", "fedadam", "fedyogi"):
        assert choice in message


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigCompositionException, match="num_hospital"):
        compose(["num_hospital=3"])


def test_dp_settings_added_to_a_run_without_dp_are_refused():
    # Hydra accepts a new key with "+"; a user adding noise must not believe DP is on
    with pytest.raises(ConfigError, match=r"privacy must be privacy=dp for the DP settings "
                                          r"\['accountant', 'noise_multiplier'\]"):
        compose(["+privacy.noise_multiplier=1.0", "+privacy.accountant=xyz"])


STRATEGY_FILES = sorted((ROOT / "conf" / "strategy").glob("*.yaml"))


@pytest.mark.parametrize("path", STRATEGY_FILES, ids=lambda p: p.stem)
def test_every_strategy_file_builds_the_flower_class_it_names_with_its_settings(path):
    import flwr.serverapp.strategy as flower

    from server.strategy import build_strategy

    # the file's first comment names Flower's class: the registry must build that one
    named = path.read_text().splitlines()[0].removeprefix("# flwr.serverapp.strategy.")
    expected = getattr(flower, named.split(":")[0].strip())
    cfg = compose([f"strategy={path.stem}"])["strategy"]
    built = build_strategy(cfg, 3)
    assert isinstance(built, expected), (type(built).__mro__, expected)
    # every setting in the file reaches Flower's object under its own name
    for key, value in cfg.items():
        if key != "name":
            assert getattr(built, key) == value, key
    assert built.min_available_nodes == 3  # the server waits for every hospital


def test_a_strategy_setting_given_on_the_command_line_reaches_flower():
    from server.strategy import build_strategy

    built = build_strategy(compose(["strategy=fedadam", "strategy.eta=0.5"])["strategy"], 3)
    assert built.eta == 0.5 and built.tau == 0.001


@pytest.mark.slow
def test_cli_rejects_bad_value_before_starting_anything(tmp_path):
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run", "rounds=0", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "rounds must be an integer >= 1, got 0" in proc.stderr
    assert not (tmp_path / "report.json").exists()
    assert time.perf_counter() - started < 60  # no Ray cluster was started


def test_flwr_run_config_becomes_hydra_overrides(tmp_path):
    from server.settings import overrides_from_run_config

    folder = tmp_path / "my hospitals"
    overrides = overrides_from_run_config(
        {"rounds": 2, "data.root": str(folder), "report_dir": "", "strategy": "fedadam"})
    cfg = compose(overrides)
    assert cfg["rounds"] == 2 and cfg["strategy"]["name"] == "fedadam"
    assert cfg["data"]["root"] == str(folder) and cfg["report_dir"] is None


def test_virtual_supernode_reads_the_ith_folder_of_data_root(tmp_path):
    from client.site import SiteSettings, simulated_site_from_root

    for name in ("b_hospital", "a_hospital", ".hidden"):
        (tmp_path / name).mkdir()
    site = SiteSettings.from_node_config(
        simulated_site_from_root({"data.root": str(tmp_path)}, {"partition-id": 1}))
    assert site.site_id == "b_hospital" and site.data_path == tmp_path / "b_hospital"
    # each virtual site gets a throw-away SecAgg identity on a roster of exactly these sites
    from privacy.secagg.identity import Roster
    roster = Roster.load(site.roster, site.ca_cert)
    assert sorted(roster.sites) == ["a_hospital", "b_hospital"]
    assert site.identity_key.is_file()
    with pytest.raises(ValueError, match="has 2 sub-folders"):
        simulated_site_from_root({"data.root": str(tmp_path)}, {"partition-id": 2})
    with pytest.raises(ValueError, match="needs its folder"):
        simulated_site_from_root({"data.root": ""}, {"partition-id": 0})
