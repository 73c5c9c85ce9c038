"""Checks on every site update before it may touch the global model.

A broken or hostile hospital must not destroy the shared model: an update with the wrong
keys, shapes or dtypes, a NaN/Inf, an L2 distance from the global model far outside the
configured bound, or an impossible example count is rejected with a reason naming what was
wrong; the round goes on with the other sites (``server/strategy.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from privacy import protocol


@dataclass(frozen=True)
class UpdateBounds:
    max_update_norm: float | None = 100.0  # L2 of (site weights - global weights), all arrays
    max_examples: int = 10_000_000  # a declared example count above this is implausible

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> UpdateBounds:
        cfg = cfg or {}
        norm = cfg.get("max_update_norm", cls.max_update_norm)
        return cls(max_update_norm=None if norm is None else float(norm),
                   max_examples=int(cfg.get("max_examples", cls.max_examples)))


def reference_arrays(global_arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """The global model as numpy arrays: decoded once per round, compared with every reply."""
    return {k: a.numpy() for k, a in global_arrays.items()}


def check_update(
    reply: Message, global_arrays: ArrayRecord | Mapping[str, np.ndarray] | None,
    bounds: UpdateBounds,
) -> tuple[str | None, float | None]:
    """``(reason, update_norm)``: ``reason`` is None when the update may be aggregated.
    ``global_arrays``: the model sent out, as an ArrayRecord or :func:`reference_arrays`."""
    content = reply.content
    if protocol.ARRAYS not in content:
        return "the reply carries no model arrays", None
    if protocol.METRICS not in content:
        return "the reply carries no metrics (example count)", None
    count = content[protocol.METRICS].get(protocol.NUM_EXAMPLES)
    if not isinstance(count, (int, float)) or not math.isfinite(count) or count != int(count):
        return f"declared {protocol.NUM_EXAMPLES} {count!r} is not a whole number", None
    if count <= 0 or count > bounds.max_examples:
        return (f"declared {protocol.NUM_EXAMPLES} {int(count)} is outside [1, "
                f"{bounds.max_examples}]"), None
    arrays = content[protocol.ARRAYS]
    if global_arrays is None:
        return None, None
    expected = (reference_arrays(global_arrays) if isinstance(global_arrays, ArrayRecord)
                else global_arrays)
    got_keys = set(arrays.keys())
    if got_keys != set(expected):
        missing, extra = sorted(set(expected) - got_keys), sorted(got_keys - set(expected))
        return f"model keys differ from the global model (missing {missing}, extra {extra})", None
    squared = 0.0
    for key, reference in expected.items():
        try:
            value = arrays[key].numpy()
        except Exception as err:  # undecodable bytes from a broken site
            return f"array {key!r} cannot be decoded: {err}", None
        if value.shape != reference.shape:
            return (f"array {key!r} has shape {tuple(value.shape)}, expected "
                    f"{tuple(reference.shape)}"), None
        if value.dtype != reference.dtype:
            return f"array {key!r} has dtype {value.dtype}, expected {reference.dtype}", None
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return f"array {key!r} contains NaN or Inf", None
        diff = value.astype(np.float64) - reference.astype(np.float64)
        squared += float(np.dot(diff.ravel(), diff.ravel()))
    norm = math.sqrt(squared)
    if bounds.max_update_norm is not None and norm > bounds.max_update_norm:
        return (f"update norm {norm:.4g} exceeds validation.max_update_norm="
                f"{bounds.max_update_norm:.4g}"), norm
    return None, norm
