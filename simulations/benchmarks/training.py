"""Local-epoch cost per clinical task, non-private vs DP-SGD, measured side by side.

    python -m simulations.benchmarks.training [--repeats 3] [--demo] [--no-reference]
        [--device auto|cpu|cuda]

For each task: one site's synthetic data at the default sizes, the task's default model, one
local epoch with the default optimizer, alternating non-private and DP-SGD runs so that machine
noise hits both alike; prints the median times and the DP/plain ratio, in wall-clock seconds
and in CPU seconds of this process (the machine may be shared: CPU time is what contention
disturbs least). DP-SGD uses the per-sample gradient method each model declares
(``grad_sample_mode``, see client/training.py).

The recurrent model's non-private baseline is the fused ``nn.LSTM`` / ``nn.GRU`` kernel (what
``models/dp_recurrent.py`` runs without DP). For reference, unless ``--no-reference``, the same
vitals model is also timed with Opacus's ``DPLSTM`` (what it used before), non-private and DP.
``--demo`` also times ``python -m simulations.run task=<task>`` end to end for each task.
``--device`` (default auto: cuda when present, else cpu) is where both runs train, and the
demo's ``device``.

``--per-step`` times single optimizer steps instead (the figure issue 18 sets targets on): per
model, one fixed batch of ``--batch`` records of its task's synthetic data, the model as
``privacy=dp`` configures it (conf/training/<model>_dp.yaml), a plain step (forward, backward,
SGD step) and a DP-SGD step exactly as a site takes it (``client.training.make_private``:
hooks, clipping, noise, accounting), alternated ``--steps`` times after ``--warmup`` pairs.
Prints median and min per step and the DP/plain ratios of both; the first DP step (engine set
up, first backward) is reported apart from the steady state.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from client.tasks import get_task
from client.training import (
    DPConfig,
    LocalTrainingConfig,
    grad_sample_mode_for,
    make_optimizer,
    make_private,
    resolve_device,
    train_local,
)
from models import build_model
from server.settings import compose
from simulations.synthetic import get_generator

TASKS = ("images", "vitals", "notes", "tabular")
# the task each model is measured on by --per-step
MODEL_TASKS = {"cnn": "images", "lstm": "vitals", "gru": "vitals", "attention": "notes",
               "bow": "notes", "mlp": "tabular", "logreg": "tabular"}


class _OpacusRecurrent(nn.Module):
    """Opacus's DPLSTM / DPGRU behind FastRNN's interface (every hour's state), for reference."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        from opacus.layers import DPGRU, DPLSTM

        self.rnn = {"lstm": DPLSTM, "gru": DPGRU}[cell](
            input_size, hidden_size, num_layers=num_layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


def _with_opacus_recurrent(model: nn.Module) -> nn.Module:
    first = model.rnn.layers[0]
    model.rnn = _OpacusRecurrent(first.cell, first.input_size,
                                 first.hidden_size, len(model.rnn.layers))
    return model


def _site_data(task_name: str, cfg: dict):
    with tempfile.TemporaryDirectory() as tmp:
        generator = get_generator(task_name)
        profile = generator.site_profiles(cfg["task"], 1, seed=0)[0]
        generator.generate_site(Path(tmp) / "site", cfg["task"], profile, seed=0)
        return get_task(task_name).load_site(Path(tmp) / "site", cfg["task"], "site")


def epoch_times(task_name: str, repeats: int,
                adapt: Callable[[nn.Module], nn.Module] | None = None,
                device: str = "cpu") -> dict:
    cfg = compose([f"task={task_name}"])
    task = get_task(task_name)
    data = _site_data(task_name, cfg)
    config = LocalTrainingConfig(epochs=1, batch_size=cfg["batch_size"], lr=cfg["lr"],
                                 optimizer=cfg["optimizer"])
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0)

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = build_model(cfg["model"], task.input_spec(cfg["task"]))
        return adapt(model) if adapt else model

    wall: dict[str, list[float]] = {"plain": [], "dp": []}
    cpu: dict[str, list[float]] = {"plain": [], "dp": []}
    for rep in range(repeats + 1):  # the first pair warms up and is discarded
        for mode in ("plain", "dp"):
            model = build()
            started, started_cpu = time.perf_counter(), time.process_time()
            train_local(model, data.train, config, seed=rep, device=device,
                        dp=dp if mode == "dp" else None)
            if device == "cuda":
                torch.cuda.synchronize()  # kernels are asynchronous: time them all
            if rep:
                wall[mode].append(time.perf_counter() - started)
                cpu[mode].append(time.process_time() - started_cpu)
    med = {f"{k}_{m}": statistics.median(v[m]) for k, v in (("wall", wall), ("cpu", cpu))
           for m in ("plain", "dp")}
    return {"task": task_name, "model": cfg["model"]["name"], "device": device,
            "grad_sample_mode": grad_sample_mode_for(build(), dp),
            "train_examples": len(data.train),
            "epoch_s": round(med["wall_plain"], 4), "dp_epoch_s": round(med["wall_dp"], 4),
            "dp_ratio": round(med["wall_dp"] / med["wall_plain"], 2),
            "cpu_epoch_s": round(med["cpu_plain"], 4), "cpu_dp_epoch_s": round(med["cpu_dp"], 4),
            "cpu_dp_ratio": round(med["cpu_dp"] / med["cpu_plain"], 2),
            "dp_ratios_per_repeat": [round(d / p, 2) for p, d in zip(wall["plain"], wall["dp"],
                                                                      strict=True)]}


def step_times(model_name: str, steps: int, warmup: int = 5, batch: int = 64,
               device: str = "cpu") -> dict:
    """Plain and DP-SGD steps on one fixed batch, alternated; median and min of each."""
    if model_name not in MODEL_TASKS:
        raise ValueError(f"--per-step model must be one of {sorted(MODEL_TASKS)}, "
                         f"got {model_name!r}")
    if steps < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0 and batch >= 1; got steps={steps}, "
                         f"warmup={warmup}, batch={batch}")
    task_name = MODEL_TASKS[model_name]
    cfg = compose([f"task={task_name}", f"model={model_name}", "privacy=dp"])
    task = get_task(task_name)
    data = _site_data(task_name, cfg)
    *inputs, labels = next(iter(torch.utils.data.DataLoader(data.train, batch_size=batch)))
    inputs, labels = [t.to(device) for t in inputs], labels.to(device)
    config = LocalTrainingConfig(batch_size=batch, lr=0.01, optimizer="sgd")
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0)
    criterion = nn.CrossEntropyLoss()

    def clock() -> float:
        if device == "cuda":
            torch.cuda.synchronize()  # kernels are asynchronous: time them all
        return time.perf_counter()

    def build():
        torch.manual_seed(0)
        model = build_model(cfg["model"], task.input_spec(cfg["task"])).to(device).train()
        return model, make_optimizer(model, config)

    def step(model, optimizer, loss_fn) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(*inputs), labels).backward()
        optimizer.step()

    plain_model, plain_optimizer = build()
    private_model, private_optimizer = build()
    started = clock()
    loader = torch.utils.data.DataLoader(data.train, batch_size=batch)
    hooks, private_optimizer, private_loss, _ = make_private(
        private_model, private_optimizer, loader, criterion, dp, seed=0, device=device)
    step(private_model, private_optimizer, private_loss)
    first_dp = clock() - started
    times: dict[str, list[float]] = {"plain": [], "dp": [], "cpu_plain": [], "cpu_dp": []}
    try:
        for i in range(warmup + steps):
            for mode, model, optimizer, loss_fn in (
                    ("plain", plain_model, plain_optimizer, criterion),
                    ("dp", private_model, private_optimizer, private_loss)):
                started, started_cpu = clock(), time.process_time()
                step(model, optimizer, loss_fn)
                if i >= warmup:
                    times[mode].append(clock() - started)
                    times[f"cpu_{mode}"].append(time.process_time() - started_cpu)
    finally:
        from models.dp_embedding import release_sparse_embeddings

        hooks.cleanup()
        release_sparse_embeddings(private_model)
    med = {m: statistics.median(t) for m, t in times.items()}
    low = {m: min(t) for m, t in times.items()}
    return {"model": model_name, "task": task_name, "device": device, "batch": batch,
            "steps": steps, "plain_median_ms": round(1e3 * med["plain"], 3),
            "dp_median_ms": round(1e3 * med["dp"], 3),
            "plain_min_ms": round(1e3 * low["plain"], 3), "dp_min_ms": round(1e3 * low["dp"], 3),
            "ratio_median": round(med["dp"] / med["plain"], 2),
            "ratio_min": round(low["dp"] / low["plain"], 2),
            # CPU time of this process: what a loaded machine disturbs least
            "cpu_ratio_median": round(med["cpu_dp"] / med["cpu_plain"], 2),
            "cpu_ratio_min": round(low["cpu_dp"] / low["cpu_plain"], 2),
            "first_dp_step_ms": round(1e3 * first_dp, 1)}


def per_step_main(models: list[str], steps: int, warmup: int, batch: int, device: str) -> None:
    print(f"{'model':10} {'task':8} {'plain med':>9} {'DP med':>8} {'ratio':>6} "
          f"{'plain min':>9} {'DP min':>8} {'ratio':>6} {'cpu med':>7} {'cpu min':>7} "
          f"{'1st DP':>8}   "
          f"[ms per step, batch {batch}, {steps} alternated steps, device {device}]")
    rows = []
    for name in models:
        row = step_times(name, steps, warmup, batch, device)
        rows.append(row)
        print(f"{name:10} {row['task']:8} {row['plain_median_ms']:>9.2f} "
              f"{row['dp_median_ms']:>8.2f} {row['ratio_median']:>6.2f} "
              f"{row['plain_min_ms']:>9.2f} {row['dp_min_ms']:>8.2f} {row['ratio_min']:>6.2f} "
              f"{row['cpu_ratio_median']:>7.2f} {row['cpu_ratio_min']:>7.2f} "
              f"{row['first_dp_step_ms']:>8.1f}", flush=True)
    print(json.dumps(rows))


def demo_time(task_name: str, device: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "simulations.run", f"task={task_name}",
                        f"hydra.run.dir={out}", f"device={device}"],
                       check=True, capture_output=True)
        return round(time.perf_counter() - started, 1)


def _print_row(name: str, row: dict, demo: bool) -> None:
    print(f"{name:17} {row['model']:10} {row['grad_sample_mode']:6} {row['train_examples']:>5} "
          f"{row['epoch_s']:>8.3f} {row['dp_epoch_s']:>8.3f} {row['dp_ratio']:>8.2f} "
          f"{row['cpu_dp_ratio']:>8.2f}" + (f"  {row['demo_s']:>6.1f}" if demo else ""),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--demo", action="store_true")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the Opacus DPLSTM reference rows for the recurrent model")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to train (auto: cuda when present, else cpu)")
    parser.add_argument("--per-step", action="store_true",
                        help="time single plain and DP steps per model instead of epochs")
    parser.add_argument("--models", nargs="*", default=["lstm", "gru", "attention", "cnn"],
                        help=f"--per-step: models to time, of {sorted(MODEL_TASKS)}")
    parser.add_argument("--steps", type=int, default=40, help="--per-step: timed step pairs")
    parser.add_argument("--warmup", type=int, default=5, help="--per-step: untimed pairs")
    parser.add_argument("--batch", type=int, default=64, help="--per-step: records per step")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device == "mps":  # auto on a Mac: this benchmark is for CPU and CUDA
        device = "cpu"
    torch.set_num_threads(1)  # a simulated site gets one core
    if args.per_step:
        per_step_main(args.models, args.steps, args.warmup, args.batch, device)
        return
    rows = []
    print(f"{'task':17} {'model':10} {'mode':6} {'n':>5} {'epoch s':>8} {'DP s':>8} "
          f"{'DP/plain':>8} {'cpu ratio':>8}" + ("  demo s" if args.demo else "")
          + f"   [device {device}]")
    for name in args.tasks:
        row = epoch_times(name, args.repeats, device=device)
        if args.demo:
            row["demo_s"] = demo_time(name, device)
        rows.append(row)
        _print_row(name, row, args.demo)
        if name == "vitals" and not args.no_reference:
            reference = epoch_times(name, args.repeats, adapt=_with_opacus_recurrent,
                                    device=device)
            reference["model"] = "DPLSTM"
            rows.append(reference)
            _print_row("vitals [DPLSTM]", reference, False)
            print(f"{'':17} DP with FastRNN / plain with Opacus DPLSTM: "
                  f"{row['dp_epoch_s'] / reference['epoch_s']:.2f}; Opacus DPLSTM DP / "
                  f"FastRNN plain (nn.LSTM kernel): "
                  f"{reference['dp_epoch_s'] / row['epoch_s']:.2f}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
