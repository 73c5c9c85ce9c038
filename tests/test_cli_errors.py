"""What ``python -m simulations.run`` says about a mistake on its command line, and what it leaves
behind (issue 19): one line with a did-you-mean drawn from the config's keys and a group's
choices, exit status 2, and no ``outputs/<date>/<time>/`` folder for a run refused before it did
anything. (tests/test_startup.py checks the same answers come before torch, Flower or Ray load.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server.settings import ConfigError
from simulations.overrides import check_overrides
from tests.helpers import ROOT


@pytest.mark.parametrize(("overrides", "message"), [
    (["roudns=3"], "unknown config key 'roudns'; did you mean 'rounds'?"),
    (["task.synthetic.trian_size=3"],
     "unknown config key 'task.synthetic.trian_size'; did you mean 'task.synthetic.train_size'?"),
    (["privacy=dp", "privacy.acountant=rdp"],
     "unknown config key 'privacy.acountant'; did you mean 'privacy.accountant'?"),
    (["strategy.eta=0.5"], "unknown config key 'strategy.eta': it exists only with "
                           "strategy=fedadam or strategy=fedyogi (this run has strategy=fedavg)"),
    (["task=tabluar"], "unknown task 'tabluar'; did you mean 'tabular'? (task is one of: "
                       "images, notes, tabular, vitals)"),
    (["task=tabular", "model=mpl"], "unknown model 'mpl'; did you mean 'mlp'?"),
    (["xyzzy=1"], "unknown config key 'xyzzy' (`python -m simulations.run --cfg job` lists"),
    (["rounds=2", "lr=[0.1"], "could not read the override 'lr=[0.1': "),
    (["rounds=0"], "rounds must be an integer >= 1, got 0"),
])
def test_a_mistake_on_the_command_line_is_one_line_naming_it(overrides, message):
    with pytest.raises(ConfigError) as raised:
        check_overrides(overrides)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_valid_command_line_passes_and_hydra_keys_are_left_to_hydra(tmp_path):
    check_overrides(["task=tabular", "privacy=dp", "privacy.accountant=rdp", "rounds=2",
                     f"hydra.run.dir={tmp_path}", "hydra.job.chdir=false"])


def _cli(cwd, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "simulations.run", *overrides], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # two of the three processes load torch before refusing: ~10 s, 45 s loaded
def test_a_run_refused_for_bad_input_leaves_no_output_folder(tmp_path):
    """A bad value (refused before Hydra makes the folder) and a missing data.root (refused
    after: Hydra made ``outputs/<date>/<time>/.hydra``, removed on the way out) leave nothing;
    a ``hydra.run.dir`` the user made beforehand is kept. Side by side: each start costs seconds."""
    (tmp_path / "value").mkdir()
    (tmp_path / "data").mkdir()
    mine = tmp_path / "mine"
    mine.mkdir()
    missing = tmp_path / "no-such-folder"
    runs = {
        "value": _cli(tmp_path / "value", "rounds=0"),
        "data": _cli(tmp_path / "data", f"data.root={missing}"),
        "mine": _cli(tmp_path, f"hydra.run.dir={mine}", f"data.root={missing}"),
    }
    said = {}
    for name, proc in runs.items():
        _, said[name] = proc.communicate(timeout=120)
        assert proc.returncode == 2, f"{name}: {said[name][-3000:]}"
        assert len(said[name].strip().splitlines()) == 1, f"{name}: {said[name]}"
    assert said["value"].startswith("error: rounds must be an integer >= 1, got 0")
    assert said["data"].startswith(f"error: data.root={missing} is not a directory")
    assert list((tmp_path / "value").iterdir()) == []
    assert list((tmp_path / "data").iterdir()) == []
    assert mine.is_dir() and list(mine.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "mine", "value"]


def test_a_run_folder_holding_anything_but_hydras_is_kept(tmp_path, monkeypatch):
    from simulations.run import _remove_unused_run_dir

    monkeypatch.chdir(tmp_path)
    kept = tmp_path / "outputs" / "day" / "kept"
    (kept / ".hydra").mkdir(parents=True)
    (kept / "report.json").write_text("{}")
    gone = tmp_path / "outputs" / "day" / "gone"
    (gone / ".hydra").mkdir(parents=True)
    (gone / ".hydra" / "config.yaml").write_text("rounds: 1\n")
    _remove_unused_run_dir(kept)
    _remove_unused_run_dir(gone)
    assert (kept / "report.json").is_file() and (kept / ".hydra").is_dir()
    assert not gone.exists() and (tmp_path / "outputs" / "day").is_dir()  # "kept" is in it
