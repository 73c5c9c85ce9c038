"""The server's checkpoint: everything needed to continue a run after a crash.

After every complete round the server writes one file, ``<run dir>/checkpoint.npz``, atomically
(a temporary file in the same folder, fsync, then rename): a reader sees the previous complete
round or this one, never a half-written file. It holds the global model, the strategy's
server-side optimiser state (FedAdam/FedYogi moments), the round number, the run history (per-
site metrics, declines, rejections and privacy ledgers as last reported) and the run config.
Sites keep their own accountant state on their side (client/privacy_budget.py), so their ε
continues across a server restart and is never reset by it.

Only numpy arrays and one JSON document are stored (``allow_pickle=False`` on load): a
checkpoint file cannot execute code.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privacy.files import write_atomically
from server.history import RunHistory

CHECKPOINT_FILE = "checkpoint.npz"
FORMAT_VERSION = 1
_MODEL, _STRATEGY, _META = "model/", "strategy/", "__meta__"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or from an incompatible run."""


@dataclass
class Checkpoint:
    round: int  # the last complete round
    model: dict[str, np.ndarray]  # global model after that round (state_dict order kept)
    strategy_state: dict[str, np.ndarray]
    history: RunHistory
    config: dict[str, Any]


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_VERSION, "round": checkpoint.round,
            "model_keys": list(checkpoint.model), "history": checkpoint.history.to_dict(),
            "config": checkpoint.config}
    arrays = {f"{_MODEL}{i}": np.asarray(v) for i, v in enumerate(checkpoint.model.values())}
    arrays.update({f"{_STRATEGY}{k}": np.asarray(v)
                   for k, v in checkpoint.strategy_state.items()})
    arrays[_META] = np.frombuffer(json.dumps(meta, allow_nan=True).encode(), dtype=np.uint8)
    path = run_dir / CHECKPOINT_FILE
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomically(path, buffer.getvalue())
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint:
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(
            f"resume={run_dir}: no {CHECKPOINT_FILE} there (expected the output directory of "
            "a run that completed at least one round)")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data[_META]).decode())
            model_arrays = [data[f"{_MODEL}{i}"] for i in range(len(meta["model_keys"]))]
            strategy_state = {k[len(_STRATEGY):]: data[k] for k in data.files
                              if k.startswith(_STRATEGY)}
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path} is not a readable medsilo checkpoint: {err}") from err
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')}, expected "
                              f"{FORMAT_VERSION}")
    return Checkpoint(
        round=int(meta["round"]),
        model=dict(zip(meta["model_keys"], model_arrays)),
        strategy_state=strategy_state,
        history=RunHistory.from_dict(meta["history"]),
        config=meta["config"],
    )


def resumable_config(saved: Mapping[str, Any], requested: Mapping[str, Any]) -> dict[str, Any]:
    """The saved run's config; ``rounds`` may be raised to extend a run. Any other difference
    is an error: a resumed run must be the run that was interrupted."""
    # baselines: after the rounds; tracking: where the finished run is logged, not the run
    ignore = {"rounds", "resume", "report_dir", "baselines", "tracking"}
    differs = sorted(k for k in set(saved) | set(requested)
                     if k not in ignore and saved.get(k) != requested.get(k))
    if differs:
        raise CheckpointError(
            f"resume: the config differs from the interrupted run's in {differs}; resume with "
            "the same overrides (only rounds may change)")
    rounds = int(requested.get("rounds", saved["rounds"]))
    return {**dict(saved), "rounds": max(rounds, int(saved["rounds"]))}
