"""The one place that defines what crosses the network between a site and the server.

Both ``client/`` and ``server/`` import these names; neither side spells a record key
as a string literal of its own. A reply from a site carries at most:

- ``arrays``  (ArrayRecord): model weights after local training (train replies only);
- ``metrics`` (MetricRecord): numbers about the round (example counts, loss, metrics);
- ``site``    (ConfigRecord): the site's public identity (its name), so the server can
  report per hospital without relying on Flower's random node ids, and the reply's status:
  ``ok``, or ``declined`` with a reason (e.g. the round would exceed the site's privacy budget),
  or ``refused`` with a reason (the site has not approved this app version, or its data is for
  another task);
- ``privacy`` (ConfigRecord): the site's privacy ledger summary (DP runs only): cumulative
  epsilon, delta, noise multiplier, sample rate, steps, rounds trained/declined.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from privacy import compat
from privacy.run_settings import RunSettings

# Record names inside a Message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
PRIVACY = "privacy"

# Keys inside those records.
NUM_EXAMPLES = "num-examples"  # Flower strategies weight by this key
SERVER_ROUND = "server-round"  # injected by Flower strategies into every ConfigRecord
SITE_ID = "site-id"
PROXIMAL_MU = "proximal-mu"  # injected by Flower's FedProx; the site adds the proximal term
# run settings ``train.class_balance`` (client/training.py local_training_config): auto =
# logit_adjust with the site's prior without DP; under DP-SGD only with a public task.class_prior
CLASS_BALANCE = ("auto", "logit_adjust", "none")
STATUS = "status"
STATUS_OK = "ok"
STATUS_DECLINED = "declined"
STATUS_REFUSED = "refused"  # the site refused the run (unapproved app, another task), with a reason
REASON = "reason"
SKIPPED_PREFIX = "skipped."  # in the site record: counts of records the site's loader left out

# The privacy ledger summary a DP site reports after every round (privacy/accounting.py keeps
# the full ledger at the site). Only these keys leave the site.
LEDGER_KEYS = ("accountant", "delta", "epsilon", "noise_multiplier", "sample_rate", "steps",
               "rounds_trained", "rounds_declined", "epsilon_per_round", "max_epsilon",
               # the std of the noise on the site's released size (its first mechanism)
               "count_noise")

# The run settings the server sends with every train/evaluate message, flattened into
# dotted keys because a ConfigRecord holds only scalars and lists of scalars.
RUN_PREFIX = "run."


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; ``None`` values are dropped (not representable)."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        elif value is not None:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten`."""
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        node = nested
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def content_size(content: RecordDict) -> tuple[int, dict[str, int]]:
    """Bytes of the serialized objects Flower ships for ``content``: total and per record.

    One measure for both sides: a site's egress log and the server's report count the same
    bytes for the same reply. Measured on :func:`unshared` objects, so ``content`` itself is
    left as it was (see there)."""
    fresh = unshared(content)
    with compat.hash_each_object_once():  # the fresh copy is not changed while measured
        return _size(fresh)


def measure(content: RecordDict) -> tuple[int, dict[str, int], str]:
    """``content_size`` and Flower's object id (``RecordDict.object_id``, a Merkle hash of
    what is shipped) of ``content``, both from one :func:`unshared` copy."""
    fresh = unshared(content)
    with compat.hash_each_object_once():  # the fresh copy is not changed while measured
        return (*_size(fresh), fresh.object_id)


def unshared(content: RecordDict) -> RecordDict:
    """``content`` over the same bytes with new Array objects. Serializing or hashing an Array
    makes Flower cache its chunks (a copy of its data) on the object; had ``content`` itself
    been measured, the message built from it would ship the data twice through Flower's
    simulation engine (8.5 MB instead of 4.2 MB for a 1M-parameter update). The other
    records are small and kept as they are."""
    return RecordDict({
        name: ArrayRecord({key: Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data)
                           for key, a in record.items()})
        if isinstance(record, ArrayRecord) else record
        for name, record in content.items()})


def _size(content: RecordDict) -> tuple[int, dict[str, int]]:
    per_record = {
        name: compat.deflated_tree_size(record) for name, record in content.items()
    }
    return sum(per_record.values()) + len(content.deflate()), per_record


def encode_ledger(summary: Mapping[str, Any]) -> ConfigRecord:
    """A ledger summary as a ConfigRecord (``max_epsilon`` omitted when the site has none)."""
    return ConfigRecord({k: summary[k] for k in LEDGER_KEYS if summary.get(k) is not None})


def decode_ledger(record: ConfigRecord) -> dict[str, Any]:
    out = {k: record[k] for k in LEDGER_KEYS if k in record}
    out["epsilon_per_round"] = [float(e) for e in out.get("epsilon_per_round", [])]
    out.setdefault("max_epsilon", None)
    return out


def encode_run_settings(settings: RunSettings) -> ConfigRecord:
    """What a site needs to train the global model (privacy/run_settings.py), flattened."""
    return ConfigRecord(flatten(settings.to_dict(), prefix=RUN_PREFIX))


def decode_run_settings(record: ConfigRecord) -> RunSettings:
    """Inverse of :func:`encode_run_settings`, typed and checked (RunSettingsError names a bad
    key), with the server round Flower's strategy put in the record."""
    flat = {k[len(RUN_PREFIX) :]: v for k, v in record.items() if k.startswith(RUN_PREFIX)}
    return RunSettings.from_dict(unflatten(flat), server_round=int(record.get(SERVER_ROUND, 0)))


# Secure aggregation (privacy/secagg/, conf/secagg/on.yaml): with secagg=on a training round is
# five train messages with these actions (``train.<action>``) instead of one plain ``train``.
# Stage messages carry their protocol fields in the ``secagg`` ConfigRecord
# (privacy/secagg/messages.py names them); the masked update travels in ``arrays`` under
# MASKED_UPDATE as one uint32 vector: the site's clipped, weighted model delta followed by its
# weight, both quantized into the ring Z_2^32.
SECAGG = "secagg"
SECAGG_ADVERTISE_KEYS = "secagg_advertise_keys"
SECAGG_SHARE_KEYS = "secagg_share_keys"
SECAGG_MASKED_INPUT = "secagg_masked_input"
SECAGG_CONSISTENCY = "secagg_consistency"  # survivors sign the survivor set (Bonawitz §6)
SECAGG_UNMASK = "secagg_unmask"
MASKED_UPDATE = "masked-update"
# The public parameters every site needs to encode its update identically (in ``secagg``).
SECAGG_CLIP = "clip"  # per-coordinate bound on a site's model delta
SECAGG_MAX_EXAMPLES = "max-site-examples"  # public cap: a site's weight = min(1, n / cap)
SECAGG_NUM_SITES = "num-sites"  # sites in the round: fixes the quantization scale
# Hospital-level DP (privacy=site_dp, docs/site_dp.md): the masked update is instead the site's
# clipped, rotated, rounded delta plus its own discrete Gaussian noise share
# (privacy/site_dp/encoding.py); no weight coordinate (the mean is unweighted, DP-FedAvg).
# With adaptive clipping the round's clip is public and travels with the round's keys:
SITE_DP_CLIP = "site-dp-clip"
SITE_DP_ROTATION_LABEL = b"medsilo.site_dp.rotation-seed.v1"


def site_dp_rotation_seed(run_seed: int, server_round: int) -> bytes:
    """The round's public rotation seed, computed by the server and every site alike from
    the run's seed and the round. Knowing it in advance affects only accuracy (a site that
    crafted its delta against it could make the ring wrap), never privacy: the noise is
    added after rotating and every site's own (docs/site_dp.md)."""
    return hashlib.sha256(SITE_DP_ROTATION_LABEL + int(run_seed).to_bytes(16, "big", signed=True)
                          + int(server_round).to_bytes(8, "big")).digest()
