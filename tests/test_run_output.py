"""``python -m simulations.run > run.log 2>&1`` (nohup, SLURM): what a user tailing the log sees
while the run goes on (issue 19). A status line before the engine starts (Ray's start-up and the
actors loading torch take 10-30 s before round 1 ends), one line per round written to the file as
the round ends, not when the process exits, and a last line whose duration is report.json's.

The run is the real command line in a subprocess whose output goes to a file, with its sites in
that process (tests/in_process_grid.py instead of Ray, so it takes seconds); the grid reads the
log file each time the server sends the sites a message, i.e. while the run is in progress.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

RUN = ("task=tabular", "num_hospitals=2", "rounds=2", "task.synthetic.train_size=40",
       "task.synthetic.test_size=20", "local_epochs=1", "baselines=none", "device=cpu")

CHILD = """
import json, runpy, sys
from pathlib import Path

import simulations.engine as engine
from tests.in_process_grid import InProcessGrid, run_server

log, seen_path, *overrides = sys.argv[1:]
seen = []


class Watched(InProcessGrid):
    def push_messages(self, messages):
        seen.append(Path(log).read_text())  # what the log file holds now, mid-run
        return super().push_messages(messages)


def on_sites_in_this_process(server_app, client_app, num_sites, **_options):
    seen.append(Path(log).read_text())
    run_server(server_app, Watched(client_app, {100 + i: {"partition-id": i}
                                                for i in range(num_sites)}))


engine.run_in_process = on_sites_in_this_process
sys.argv = ["simulations.run", *overrides]
try:
    runpy.run_module("simulations.run", run_name="__main__", alter_sys=True)
finally:
    Path(seen_path).write_text(json.dumps(seen))
"""


@pytest.mark.slow  # a subprocess loading torch and Flower: ~8 s, 25 s on loaded cores
def test_a_run_logging_to_a_file_writes_each_line_as_it_happens(tmp_path):
    log, seen_path, out = tmp_path / "run.log", tmp_path / "seen.json", tmp_path / "run"
    with open(log, "w") as sink:  # stdout and stderr are a file, as under nohup
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(log), str(seen_path), *RUN,
             f"hydra.run.dir={out}", f"data.cache_dir={tmp_path / 'cache'}"],
            cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    seen = json.loads(seen_path.read_text())
    # before the engine starts: the header and what happens next are in the file
    assert "tabular · 2 hospitals · 2 rounds" in seen[0], seen[0]
    assert "starting Flower's simulation engine (Ray) for 2 hospitals" in seen[0], seen[0]
    # round 1's line is in the file while round 2 runs (its messages are being sent)
    during = [snapshot for snapshot in seen if "round 1: loss" in snapshot]
    assert during and all("round 2: loss" not in s for s in during[:1]), seen[-1]
    assert "round 2: loss" in text
    # one duration: the last line's is report.json's (and report.md's)
    report = json.loads((out / "report.json").read_text())
    assert f"done in {report['run']['duration_s']:.1f} s · final global" in text, text[-2000:]
