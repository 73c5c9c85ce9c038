"""Plain helpers the tests import (fixtures live in conftest.py, which is not imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_simulation_cli(out_dir: Path, *overrides: str, timeout: float = 300) -> dict:
    """``python -m simulations.run`` in a subprocess; returns report.json. Without the
    local/pooled baselines unless a test asks for them (they double a small run's time)."""
    if not any(o.startswith("baselines=") for o in overrides):
        overrides = (*overrides, "baselines=none")
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run", f"hydra.run.dir={out_dir}", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"simulation failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads((out_dir / "report.json").read_text())
