"""A user's first contact is fast: ``--help`` and a configuration mistake are answered in about
a second, before torch, Flower, Opacus, Ray, scikit-learn, matplotlib or SciPy load (5-20 s on
a loaded machine, issue 18). Each test runs a fresh interpreter (the test process itself has
long imported torch) and lists what it had loaded when it answered.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

HEAVY = ("torch", "opacus", "ray", "sklearn", "matplotlib", "scipy", "flwr")
MARK = "loaded before the answer: "


def _run_fresh(code: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run ``code`` in a fresh interpreter at the repository root; the heavy packages loaded
    when it ended, even by ``sys.exit`` (Hydra's and ours on a bad config)."""
    wrapped = (f"import json, sys\ntry:\n    exec({code!r})\nfinally:\n"
               f"    print({MARK!r} + json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", wrapped], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    loaded = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert loaded, f"{code!r} printed no list of modules:\n{proc.stderr[-5000:]}"
    return proc, json.loads(loaded[-1].removeprefix(MARK))


def test_importing_the_main_job_and_the_config_checks_loads_no_heavy_package():
    proc, loaded = _run_fresh("import simulations.run\nimport server.settings")
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert loaded == []


@pytest.mark.parametrize(("overrides", "exit_code", "named"), [
    pytest.param(["--help"], 0, "task: images, notes, tabular, vitals", id="help"),
    pytest.param(["task=nope"], 2, "task", id="unknown-group-value"),
    pytest.param(["task=tabluar"], 2, "error: unknown task 'tabluar'; did you mean 'tabular'?",
                 id="group-value-typo"),
    pytest.param(["roudns=3"], 2, "error: unknown config key 'roudns'; did you mean 'rounds'?",
                 id="key-typo"),
    pytest.param(["privacy.accountant=rdp"], 2,
                 "unknown config key 'privacy.accountant': it exists only with privacy=dp",
                 id="key-of-another-group"),
    pytest.param(["privacy=dp", "privacy.target_epsilon=abc"], 2,
                 "privacy.target_epsilon must be a number > 0, got 'abc'",
                 id="value-our-validation-rejects"),
    pytest.param(["model.name=nope"], 2, "model.name must be one of ['attention', ",
                 id="unregistered-model"),
])
def test_help_and_config_errors_answer_before_any_heavy_package_loads(
        tmp_path, overrides, exit_code, named):
    """``python -m simulations.run OVERRIDES``: the exit code and message users get (also
    tests/test_bad_inputs.py), from a process that never imported torch, Flower and the rest."""
    argv = ["simulations.run", *overrides, f"hydra.run.dir={tmp_path}"]
    proc, loaded = _run_fresh(
        f"import runpy, sys\nsys.argv = {argv!r}\n"
        "runpy.run_module('simulations.run', run_name='__main__', alter_sys=True)")
    assert proc.returncode == exit_code, proc.stderr[-5000:]
    assert named in proc.stdout + proc.stderr
    assert loaded == []
    if exit_code:  # one line: no Hydra dump (search path, HYDRA_FULL_ERROR) around it
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_names_validation_reads_from_source_are_those_the_modules_define():
    """server/settings.py reads the model names and class-balance modes from our source (the
    modules defining them load torch and Flower); a registration it cannot read fails here."""
    import models
    from privacy.protocol import CLASS_BALANCE
    from server.settings import class_balance_modes, registered_model_names

    assert registered_model_names() == models.registered_models()
    assert class_balance_modes() == CLASS_BALANCE


def test_a_valid_command_line_is_composed_by_hydra_alone(tmp_path):
    """Hydra composes a run's config twice (to read ``hydra.mode``, then to run it); checking a
    valid line with a compose of our own first was a third (~0.1 s of every start, issue 18).
    Our did-you-mean check now runs only after Hydra has refused a line (the typo tests above)."""
    argv = ["simulations.run", "task=tabular", "rounds=2", f"hydra.run.dir={tmp_path}"]
    code = f"""
import runpy, sys
from hydra._internal.hydra import Hydra
import server.settings
from server.settings import ConfigError
composed = []
compose_config = Hydra.compose_config
def counted(self, *args, **kwargs):
    composed.append(kwargs.get("run_mode"))
    return compose_config(self, *args, **kwargs)
Hydra.compose_config = counted
def validated(cfg):
    raise ConfigError(f"validated after {{len(composed)}} composes")
server.settings.validate = validated  # main's check: the run ends there, before torch
sys.argv = {argv!r}
runpy.run_module("simulations.run", run_name="__main__", alter_sys=True)
"""
    proc, loaded = _run_fresh(code)
    assert proc.returncode == 2, proc.stderr[-5000:]
    assert proc.stderr.strip() == "error: validated after 2 composes", proc.stderr
    assert loaded == []
