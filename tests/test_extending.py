"""A model and a task of one's own (docs/extending.md): the example package
examples/medsilo_plugin_example registers ``tiny_mlp`` and ``toy_csv`` from outside medsilo's
source tree; a run names it in ``plugins`` and trains with it, its sites import it themselves
(in Ray workers too), and a site runs only plugins its own configuration lists."""

from __future__ import annotations

import re
import shlex
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, run_simulation_cli

EXAMPLE = ROOT / "examples" / "medsilo_plugin_example"
PLUGIN, GENERATOR = "medsilo_toy.plugin", "medsilo_toy.synthetic"


def documented_overrides() -> list[str]:
    """The overrides of the one-line command docs/extending.md tells users to run."""
    doc = (ROOT / "docs" / "extending.md").read_text(encoding="utf-8")
    lines = [line for line in doc.splitlines() if line.startswith("python -m simulations.run ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])[3:]


@pytest.fixture
def plugin_on_path(monkeypatch):
    """The example importable, as after ``pip install``; afterwards medsilo's registries and
    ``sys.modules`` as before (a plugin registers into module-level registries on import)."""
    from client.tasks import registry as tasks
    from models import registry as models
    from simulations.synthetic import registry as generators

    saved = [(r, dict(r)) for r in (models._MODELS, tasks._TASKS, generators._GENERATORS)]
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLE))
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)
    for name in [m for m in sys.modules if m.split(".")[0] == "medsilo_toy"]:
        del sys.modules[name]


def test_the_documented_run_trains_the_plugins_model_on_the_plugins_task(plugin_on_path,
                                                                        tmp_path):
    """docs/extending.md's command, with the sites in this process: every site trains
    tiny_mlp on its toy_csv files, nothing fails, the model learns (the classes are blobs)."""
    from tests.in_process_grid import simulate_in_process

    report = simulate_in_process(tmp_path, *documented_overrides())
    first = report["rounds"][0]
    assert sorted(first["train"]) == ["hospital_01", "hospital_02"]
    assert first["failures"] == [] and first["refused"] == {}
    assert report["run"]["model"] == "tiny_mlp" and report["run"]["task"] == "toy_csv"
    assert report["final"]["global"]["auroc"] > 0.8


def test_a_site_runs_only_plugins_its_own_configuration_lists(plugin_on_path, tmp_path):
    from client.site import SiteSettings, plugin_refusal

    plain = SiteSettings(site_id="a", data_path=tmp_path)
    reason = plugin_refusal(plain, [PLUGIN])
    assert reason is not None and PLUGIN in reason and "plugins []" in reason
    assert plugin_refusal(plain, []) is None
    listed = SiteSettings(site_id="a", data_path=tmp_path, plugins=(PLUGIN, "not_installed.x"))
    assert plugin_refusal(listed, [PLUGIN]) is None
    reason = plugin_refusal(listed, ["not_installed.x"])
    assert reason is not None and "'not_installed.x'" in reason and "not installed" in reason


def test_site_toml_lists_plugins_by_module_name(tmp_path):
    from client.site import SiteConfigError, SiteSettings

    toml = tmp_path / "site.toml"
    toml.write_text(f'data_path = "{tmp_path}"\nplugins = ["{PLUGIN}"]\n')
    assert SiteSettings.from_file(toml).plugins == (PLUGIN,)
    assert SiteSettings.from_node_config({"data-path": str(tmp_path),
                                          "plugins": f"{PLUGIN},b"}).plugins == (PLUGIN, "b")
    toml.write_text(f'data_path = "{tmp_path}"\nplugins = ["../evil.py"]\n')
    with pytest.raises(SiteConfigError, match=r"plugins holds '\.\./evil\.py'"):
        SiteSettings.from_file(toml)


def test_the_run_settings_carry_plugins_typed_and_only_when_there_are_some():
    from privacy.run_settings import RunSettings, RunSettingsError, TrainSettings

    train = TrainSettings(local_epochs=1, batch_size=8, lr=0.1)
    plain = RunSettings(task={"name": "tabular"}, model={"name": "mlp"}, train=train)
    assert "plugins" not in plain.to_dict()  # the wire format of a run without plugins
    with_plugin = RunSettings(task={"name": "toy_csv"}, model={"name": "tiny_mlp"}, train=train,
                              plugins=(PLUGIN,))
    assert RunSettings.from_dict(with_plugin.to_dict()).plugins == (PLUGIN,)
    for bad, named in ((PLUGIN, "'plugins' must be a list"), (["os; rm -rf /"], "plugins[0]"),
                       ([PLUGIN, PLUGIN], "twice")):
        with pytest.raises(RunSettingsError, match=re.escape(named)):
            RunSettings.from_dict({**with_plugin.to_dict(), "plugins": bad})


@pytest.mark.parametrize(("overrides", "named"), [
    pytest.param(["plugins=[no_such_package.plugin]"],
                 "plugins[0]='no_such_package.plugin' cannot be imported", id="not-installed"),
    pytest.param(["plugins=[medsilo_toy/plugin.py]"], "plugins[0] must be a dotted module",
                 id="a-path"),
    # plugins are imported last (seconds: torch): any other mistake is answered before
    pytest.param(["plugins=[no_such_package.plugin]", "rounds=0"], "rounds must be",
                 id="other-mistakes-first"),
    pytest.param(["simulation.plugins=[medsilo_toy.nope]"],
                 "simulation.plugins[0]='medsilo_toy.nope' cannot be imported", id="simulation"),
    pytest.param(["model=tiny_mlp"], "model.name must be one of", id="model-without-plugins"),
    pytest.param(["task=toy_csv", f"plugins=[{GENERATOR}]", "model=mlp"],
                 None, id="task-registered-by-plugin-is-known"),
    pytest.param(["task=toy_csv", "model=mlp"], "task.name must be one of",
                 id="task-without-plugins"),
])
def test_the_config_check_names_what_is_wrong_with_plugins(plugin_on_path, overrides, named):
    from server.settings import ConfigError, compose

    overrides = ["hydra.searchpath=[pkg://medsilo_toy.conf]", *overrides]
    if named is None:
        assert compose(overrides)["task"]["name"] == "toy_csv"
        return
    with pytest.raises(ConfigError, match=re.escape(named)) as err:
        compose(overrides)
    assert "docs/extending.md" in str(err.value) or "rounds" in named


def test_a_deployed_run_names_plugins_in_its_run_config(plugin_on_path, tmp_path):
    """``flwr run --run-config`` values cannot be lists: plugins and hydra.searchpath take names
    separated by commas, and the ServerApp composes them into lists; virtual SuperNodes of
    ``flwr run``'s simulation engine take the run's plugins as their own."""
    from client.site import SiteSettings, simulated_site_from_root
    from server.settings import ConfigError, compose, overrides_from_run_config

    run_config = {"plugins": f"{PLUGIN}, other.plugin", "task": "toy_csv",
                  "hydra.searchpath": "pkg://medsilo_toy.conf", "data.root": str(tmp_path)}
    overrides = overrides_from_run_config(run_config)
    assert f"++plugins=[{PLUGIN},other.plugin]" in overrides
    with pytest.raises(ConfigError, match=r"plugins\[1\]='other.plugin' cannot be"):
        compose(overrides)
    cfg = compose(overrides_from_run_config({**run_config, "plugins": PLUGIN}))
    assert cfg["plugins"] == [PLUGIN] and cfg["model"]["name"] == "tiny_mlp"
    (tmp_path / "hospital_a").mkdir()
    node_config = simulated_site_from_root({**run_config, "plugins": PLUGIN},
                                           {"partition-id": 0})
    assert SiteSettings.from_node_config(node_config, simulation=True).plugins == (PLUGIN,)


def test_the_task_names_validation_reads_from_source_are_those_registered():
    import client.tasks
    from server.settings import registered_task_names

    assert registered_task_names() == client.tasks.registered_tasks()


def test_a_plugin_cannot_take_a_registered_name(plugin_on_path):
    from models import register_model

    with pytest.raises(ValueError, match=r"'mlp' is registered twice \(by models\.mlp\."):
        register_model("mlp")(lambda **kw: None)


def test_the_plugins_generator_deals_a_pooled_folder_to_sites_in_the_tasks_format(
        plugin_on_path, tmp_path):
    import importlib

    from client.tasks import get_task
    from server.settings import compose
    from simulations.synthetic import get_generator

    importlib.import_module(GENERATOR)
    cfg = compose(["hydra.searchpath=[pkg://medsilo_toy.conf]", "task=toy_csv",
                   f"plugins=[{PLUGIN}]"])
    task_cfg, generator = cfg["task"], get_generator("toy_csv")
    pooled = tmp_path / "pooled"
    generator.generate_site(pooled, task_cfg, generator.site_profiles(task_cfg, 1, 0)[0], 0)
    records = generator.index_pooled(pooled, task_cfg)
    share = np.flatnonzero(np.arange(len(records)) % 2 == 0)
    generator.write_partition(pooled, task_cfg, tmp_path / "site", share)
    site = get_task("toy_csv").load_site(tmp_path / "site", task_cfg, "site")
    assert len(site.train) + len(site.test) == len(share)
    assert len(site.test) == int(records.is_test[share].sum())
    assert list(site.train_labels) == list(records.labels[share][~records.is_test[share]])


@pytest.mark.slow
def test_on_ray_each_worker_imports_the_plugin_itself(plugin_on_path, tmp_path):
    """The documented command as a user runs it, sites on Ray's worker processes: they do not
    share the driver's imports, so training at all shows each imported the plugin (without the
    ClientApp's import every site fails: unknown model 'tiny_mlp')."""
    report = run_simulation_cli(tmp_path / "run", *documented_overrides(), timeout=400)
    first = report["rounds"][0]
    assert sorted(first["train"]) == ["hospital_01", "hospital_02"]
    assert first["failures"] == []
    assert report["run"]["model"] == "tiny_mlp"
