"""What happened in each round, per site: the raw material of the report."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message

from privacy import protocol


@dataclass
class RoundRecord:
    round: int
    train: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> train metrics
    sites: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> eval metrics
    global_metrics: dict[str, float] | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)  # replies that carried errors


@dataclass
class RunHistory:
    initial_global: dict[str, float] | None = None
    rounds: dict[int, RoundRecord] = field(default_factory=dict)

    def round(self, server_round: int) -> RoundRecord:
        return self.rounds.setdefault(server_round, RoundRecord(server_round))

    def record_replies(
        self, server_round: int, replies: Iterable[Message], stage: str
    ) -> list[Message]:
        """Record per-site metrics and failures; return the good replies sorted by site id.

        Sorting makes aggregation order (and so floating-point sums) independent of the
        order in which replies arrived: same seed, same config, same global model.
        """
        record = self.round(server_round)
        good: list[tuple[str, Message]] = []
        for msg in replies:
            if msg.has_error():
                record.failures.append(
                    {"stage": stage, "node_id": msg.metadata.src_node_id,
                     "reason": msg.error.reason}
                )
                continue
            site = str(msg.content[protocol.SITE][protocol.SITE_ID])
            metrics = {k: float(v) for k, v in msg.content[protocol.METRICS].items()}
            (record.train if stage == "train" else record.sites)[site] = metrics
            good.append((site, msg))
        return [msg for _, msg in sorted(good, key=lambda pair: pair[0])]
