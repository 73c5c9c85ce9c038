"""A whole SecAgg round in one process: the reference call sequence for a driver.

The Flower driver does the same thing with messages over the Grid (one message type per stage);
here every "message" is a direct call, optionally passed through ``wire`` (e.g. a ConfigRecord
protobuf round trip) to prove it survives the network and ``Context.state``. Used by the tests
and by ``benchmark.py``.

``dropouts`` maps a stage name (messages.STAGES) to the participants that go silent at that
stage: they send nothing from that stage on (a site dropping after ``share-keys`` sent its shares
but no masked input).

``identities`` maps a participant index to its SiteIdentity (identity.py); by default fresh
in-memory identities ``site-0``, ``site-1``, ... under one roster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privacy.secagg import client
from privacy.secagg import messages as m
from privacy.secagg.crypto import Entropy
from privacy.secagg.identity import SiteIdentity, test_identities
from privacy.secagg.server import SecAggPlan, SecAggServer

Wire = Callable[[dict[str, Any]], dict[str, Any]]


def _identity(message: dict[str, Any]) -> dict[str, Any]:
    return message


@dataclass
class LoopbackResult:
    """The unmasked sum, who made it, and seconds per stage (all sites' work summed, then the
    server's routing/unmasking separately)."""

    total: np.ndarray
    survivors: set[int]
    dropped: set[int]
    site_seconds: dict[str, float] = field(default_factory=dict)
    server_seconds: dict[str, float] = field(default_factory=dict)
    upload_bytes: dict[int, int] = field(default_factory=dict)


def payload_bytes(message: Mapping[str, Any]) -> int:
    """Bytes of the bytes-valued fields of a message (keys, ciphertexts, shares): the protocol
    overhead on top of the masked vector, excluding the few ints and record framing."""
    total = 0
    for value in message.values():
        items = value if isinstance(value, list) else [value]
        total += sum(len(item) for item in items if isinstance(item, bytes))
    return total


def run_round(plan: SecAggPlan, vectors: Mapping[int, np.ndarray], *,
              dropouts: Mapping[str, Iterable[int]] | None = None,
              entropy: Callable[[int], Entropy] | None = None,
              wire: Wire = _identity,
              identities: Mapping[int, SiteIdentity] | None = None) -> LoopbackResult:
    """Run stages 0–4 for ``plan`` with site i masking ``vectors[i]`` (1-D uint32).

    ``entropy(i)`` gives site i's randomness source (default ``os.urandom``; tests pass a
    seeded one). Raises what the stages raise (SecAggAborted, SecAggProtocolError, ...).
    """
    silent: set[int] = set()
    dropouts = {stage: set(sites) for stage, sites in (dropouts or {}).items()}
    unknown_stages = set(dropouts) - set(m.STAGES)
    if unknown_stages:
        raise ValueError(f"unknown stages {sorted(unknown_stages)}, expected {m.STAGES}")
    sources = {i: (entropy(i) if entropy else None) for i in range(plan.num_participants)}
    if identities is None:
        made = test_identities(f"site-{i}" for i in range(plan.num_participants))
        identities = {i: made[f"site-{i}"] for i in range(plan.num_participants)}
    site_seconds: dict[str, float] = {}
    server_seconds: dict[str, float] = {}
    upload: dict[int, int] = {i: 0 for i in range(plan.num_participants)}
    states: dict[int, dict[str, Any]] = {}

    def at_sites(stage: str, inbox: Mapping[int, dict[str, Any]],
                 work: Callable[[int, dict[str, Any]], dict[str, Any]]) -> dict[int, Any]:
        silent.update(dropouts.get(stage, ()))
        replies = {}
        start = time.perf_counter()
        for index, message in inbox.items():
            if index not in silent:
                replies[index] = work(index, wire(message))
        site_seconds[stage] = time.perf_counter() - start
        return replies

    def on_server(stage: str, call: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = call()
        server_seconds[stage] = time.perf_counter() - start
        return result

    def extra(index: int) -> dict[str, Any]:
        return {} if sources[index] is None else {"entropy": sources[index]}

    def reply_of(index: int, state: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
        states[index] = wire(state)  # what Context.state would keep between messages
        reply = wire(reply)
        upload[index] += payload_bytes(reply)
        return reply

    server = SecAggServer(plan)
    configs = on_server(m.STAGE_SETUP, server.site_configs)
    replies = at_sites(m.STAGE_ADVERTISE_KEYS, configs, lambda i, msg: reply_of(
        i, *client.advertise_keys(msg, identities[i], **extra(i))))
    routed = on_server(m.STAGE_ADVERTISE_KEYS, lambda: server.route_public_keys(replies))
    replies = at_sites(m.STAGE_SHARE_KEYS, routed, lambda i, msg: reply_of(
        i, *client.share_keys(states[i], msg, identities[i], **extra(i))))
    routed = on_server(m.STAGE_SHARE_KEYS, lambda: server.route_shares(replies))
    masked: dict[int, np.ndarray] = {}

    def mask(index: int, message: dict[str, Any]) -> dict[str, Any]:
        state, header, vector = client.masked_input(states[index], message, vectors[index])
        masked[index] = vector
        upload[index] += vector.nbytes
        return reply_of(index, state, header)

    headers = at_sites(m.STAGE_MASKED_INPUT, routed, mask)
    length = len(next(iter(vectors.values())))
    checks = on_server(m.STAGE_MASKED_INPUT, lambda: server.request_consistency(
        headers, {i: masked[i] for i in headers}, length))
    replies = at_sites(m.STAGE_CONSISTENCY, checks, lambda i, msg: reply_of(
        i, *client.confirm_survivors(states[i], msg, identities[i])))
    requests = on_server(m.STAGE_CONSISTENCY, lambda: server.request_unmask(replies))
    replies = at_sites(m.STAGE_UNMASK, requests, lambda i, msg: reply_of(
        i, *client.unmask(states[i], msg, identities[i])))
    total = on_server(m.STAGE_UNMASK, lambda: server.unmask(replies))
    return LoopbackResult(total=total, survivors=set(server.survivors),
                          dropped=set(server.dropped), site_seconds=site_seconds,
                          server_seconds=server_seconds, upload_bytes=upload)
