"""Flower's Grid without a SuperLink or Ray: every message goes straight to the ClientApp of its
node, in this process, one after the other.

For fast tests of the server's round loop, secure aggregation and report where a simulation
engine is not the point: the same ServerApp and ClientApp code, the same Message objects, each
site with its own ``Context`` (its state survives between messages, as on a SuperNode).
``drop`` lets a test make nodes go silent from a given message type on: such a node no
longer answers and is no longer connected. Run the ServerApp
inside ``privacy.compat.server_task_identity(RUN_ID, SERVER_NODE_ID)`` (Message() reads it).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

SERVER_NODE_ID = 1
RUN_ID = 1


class InProcessGrid(Grid):
    """``push_messages`` delivers each message to ``client_app`` with the context of its
    destination node (nodes are ``node_configs``' keys); ``pull_messages`` hands the replies
    back; ``send_and_receive`` is both."""

    def __init__(self, client_app: ClientApp, node_configs: Mapping[int, Mapping[str, Any]],
                 run_config: Mapping[str, Any] | None = None) -> None:
        self.client_app = client_app
        self.contexts = {
            node_id: Context(run_id=RUN_ID, node_id=node_id, node_config=dict(config),
                             state=RecordDict(), run_config=dict(run_config or {}))
            for node_id, config in node_configs.items()}
        self.drop: dict[int, str] = {}  # node id -> first message type it never answers
        self.delivered: list[tuple[int, str]] = []  # (node id, message type), in order
        self._silent: set[int] = set()
        self._replies: dict[str, Message] = {}  # pushed message id -> its reply, until pulled

    # -- what the round loop and Flower's strategies use ------------------------------------
    def get_node_ids(self) -> list[int]:
        """The connected nodes: a node that went silent has left (its SuperNode is gone)."""
        return sorted(set(self.contexts) - self._silent)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each message now; its reply waits for :meth:`pull_messages`."""
        ids = []
        for message in messages:
            node, kind = message.metadata.dst_node_id, message.metadata.message_type
            delivered = self._delivered(message)
            ids.append(delivered.metadata.message_id)
            if self.drop.get(node) == kind:
                self._silent.add(node)
            if node not in self.contexts or node in self._silent:
                continue  # an unknown or silent node: no reply, as after a timeout
            self.delivered.append((node, kind))
            self._replies[delivered.metadata.message_id] = self.client_app(
                message=delivered, context=self.contexts[node])
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    @staticmethod
    def _delivered(message: Message) -> Message:
        """The message as a SuperNode receives it: ids and times set by the SuperLink."""
        metadata = Metadata(
            run_id=RUN_ID, message_id=uuid.uuid4().hex, src_node_id=SERVER_NODE_ID,
            dst_node_id=message.metadata.dst_node_id, reply_to_message_id="",
            group_id=message.metadata.group_id, created_at=time.time(), ttl=3600,
            message_type=message.metadata.message_type)
        return Message(metadata=metadata, content=message.content)

    # -- the rest of Flower's Grid interface -----------------------------------------------
    @property
    def run(self) -> Any:
        raise NotImplementedError("InProcessGrid has no Run object")

    def set_run(self, run_id: int) -> None:  # noqa: ARG002 - Flower's interface
        return None

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:  # noqa: ARG002
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id)

    def get_nodes(self) -> list[Any]:
        raise NotImplementedError("InProcessGrid: use get_node_ids()")


def run_in_process(server_app: Any, client_app: ClientApp, num_sites: int,
                   **_engine_options: Any) -> None:
    """A drop-in for ``simulations.engine.run_in_process``: the same ServerApp and ClientApp,
    every site in this process (``monkeypatch.setattr(simulations.run, "run_in_process",
    run_in_process)``); torch's thread count is restored afterwards (sites set their own)."""
    import torch

    threads = torch.get_num_threads()
    try:
        run_server(server_app, InProcessGrid(
            client_app, {100 + i: {"partition-id": i} for i in range(num_sites)}))
    finally:
        torch.set_num_threads(threads)


def run_server(server_app: Any, grid: InProcessGrid) -> None:
    """Run the ServerApp on ``grid`` with the task identity Flower's Message() reads."""
    from privacy.compat import server_task_identity

    with server_task_identity(RUN_ID, SERVER_NODE_ID):
        server_app(grid, Context(run_id=RUN_ID, node_id=SERVER_NODE_ID, node_config={},
                                 state=RecordDict(), run_config={}))


def simulate_in_process(out_dir: Any, *overrides: str) -> dict[str, Any]:
    """``python -m simulations.run OVERRIDES`` (without baselines unless asked) with the sites
    in this process: the main job's ``simulate`` on the in-process grid; returns report.json."""
    import simulations.run as job
    from server.settings import compose

    if not any(o.startswith("baselines=") for o in overrides):
        overrides = (*overrides, "baselines=none")
    engine, job.run_in_process = job.run_in_process, run_in_process
    try:
        return job.simulate(compose(list(overrides)), Path(out_dir))
    finally:
        job.run_in_process = engine
