"""Local-epoch cost per clinical task, non-private vs DP-SGD, measured side by side.

    python -m simulations.benchmarks.training [--repeats 3] [--demo]

For each task: one site's synthetic data at the default sizes, the task's default model, one
local epoch with the default optimizer, alternating non-private and DP-SGD (Opacus hooks)
runs so that machine noise hits both alike; prints the median times and the DP/plain ratio.
``--demo`` also times ``python -m simulations.run task=<task>`` end to end for each task.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from client.tasks import get_task
from client.training import DPConfig, LocalTrainingConfig, train_local
from models import build_model
from server.settings import compose

TASKS = ("images", "vitals", "notes", "tabular")


def epoch_times(task_name: str, repeats: int) -> dict[str, float]:
    cfg = compose([f"task={task_name}"])
    task = get_task(task_name)
    with tempfile.TemporaryDirectory() as tmp:
        profile = task.site_profiles(cfg["task"], 1, seed=0)[0]
        task.generate_site(Path(tmp) / "site", cfg["task"], profile, seed=0)
        data = task.load_site(Path(tmp) / "site", cfg["task"], "site")
    config = LocalTrainingConfig(epochs=1, batch_size=cfg["batch_size"], lr=cfg["lr"],
                                 optimizer=cfg["optimizer"])
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    for rep in range(repeats + 1):  # the first pair warms up and is discarded
        for mode in ("plain", "dp"):
            torch.manual_seed(0)
            model = build_model(cfg["model"], task.input_spec(cfg["task"]))
            dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0) if mode == "dp" else None
            started = time.perf_counter()
            train_local(model, data.train, config, seed=rep, dp=dp)
            if rep:
                times[mode].append(time.perf_counter() - started)
    plain, dp = statistics.median(times["plain"]), statistics.median(times["dp"])
    return {"task": task_name, "model": cfg["model"]["name"], "train_examples": len(data.train),
            "epoch_s": round(plain, 4), "dp_epoch_s": round(dp, 4),
            "dp_ratio": round(dp / plain, 2)}


def demo_time(task_name: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "simulations.run", f"task={task_name}",
                        f"hydra.run.dir={out}"], check=True, capture_output=True)
        return round(time.perf_counter() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--demo", action="store_true")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    args = parser.parse_args()
    torch.set_num_threads(1)  # a simulated site gets one core
    rows = []
    print(f"{'task':8} {'model':10} {'n':>5} {'epoch s':>8} {'DP s':>8} {'DP/plain':>8}"
          + ("  demo s" if args.demo else ""))
    for name in args.tasks:
        row = epoch_times(name, args.repeats)
        if args.demo:
            row["demo_s"] = demo_time(name)
        rows.append(row)
        print(f"{name:8} {row['model']:10} {row['train_examples']:>5} {row['epoch_s']:>8.3f} "
              f"{row['dp_epoch_s']:>8.3f} {row['dp_ratio']:>8.2f}"
              + (f"  {row['demo_s']:>6.1f}" if args.demo else ""), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
