"""server/stopping.py: the grid the rounds talk through — a stop ends a wait at once, and a wait
that times out still keeps the replies that came during its last, slow pull."""

from __future__ import annotations

import time

import pytest
from flwr.app import Message, Metadata, RecordDict
from flwr.serverapp import Grid

from server.stopping import StoppableGrid, StopRequested, StopSignal


def _reply_to(message_id: str) -> Message:
    return Message(metadata=Metadata(
        run_id=1, message_id="r" + message_id, src_node_id=7, dst_node_id=1,
        reply_to_message_id=message_id, group_id="1", created_at=time.time(), ttl=60,
        message_type="train"), content=RecordDict())


class SlowLink(Grid):
    """A deployed grid in miniature: replies come after ``reply_after`` s; each pull takes
    ``pull_s`` (a pull can block on a reply whose upload never completes)."""

    def __init__(self, reply_after: float, pull_s: float) -> None:
        self.reply_after, self.pull_s, self.pulls = reply_after, pull_s, 0
        self.pushed_at = 0.0

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        self.pushed_at = time.monotonic()
        return ["m1"]

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        self.pulls += 1
        started = time.monotonic()
        time.sleep(self.pull_s)
        ready = started - self.pushed_at >= self.reply_after
        return [_reply_to(i) for i in message_ids] if ready else []

    def get_node_ids(self):  # type: ignore[no-untyped-def]
        return [7]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        raise AssertionError("the wrapper pulls itself")

    run = set_run = create_message = None  # type: ignore[assignment]


def test_a_reply_that_came_during_a_slow_pull_is_kept_at_the_timeout():
    # the first pull blocks past the timeout (Flower's own loop would return nothing)
    link = SlowLink(reply_after=0.1, pull_s=0.5)
    replies = StoppableGrid(link, poll_s=0.05).send_and_receive([object()], timeout=0.3)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1"] and link.pulls == 2


def test_a_wait_ends_at_its_timeout_without_a_reply():
    link = SlowLink(reply_after=60, pull_s=0.0)
    started = time.monotonic()
    assert StoppableGrid(link, poll_s=0.05).send_and_receive([object()], timeout=0.3) == []
    assert 0.3 <= time.monotonic() - started < 1.0


def test_a_stop_ends_a_wait_at_once_and_every_later_call():
    import threading

    stop = StopSignal()
    grid = StoppableGrid(SlowLink(reply_after=60, pull_s=0.0), stop, poll_s=0.05)
    threading.Timer(0.2, stop.request, args=("SIGINT",)).start()
    started = time.monotonic()
    with pytest.raises(StopRequested, match="SIGINT"):
        grid.send_and_receive([object()], timeout=600)
    assert time.monotonic() - started < 1.0
    with pytest.raises(StopRequested):
        grid.get_node_ids()
    stop.request("SIGTERM")  # a second request keeps the first reason
    assert stop.reason == "SIGINT"


def test_a_simulated_wait_ends_when_the_last_reply_is_stored_not_at_the_next_poll():
    """Simulated, the grid pulls as soon as a site's reply is stored (a secure round's five
    stages each waited half a poll for it): with polls 30 s apart, only the wake-up returns."""
    import threading

    from privacy import compat

    with compat.simulated_link_state(3) as link:
        node = min(link.nodes, key=link.nodes.get)

        def answer() -> None:  # the site replies 0.3 s after the message is stored
            time.sleep(0.3)
            (message,) = link.state.get_message_ins(node_id=node, limit=1)
            link.reply(message)

        threading.Thread(target=answer, daemon=True).start()
        started = time.monotonic()
        replies = StoppableGrid(link.grid, StopSignal(), poll_s=30.0).send_and_receive(
            [Message(RecordDict(), node, "train", group_id="1")], timeout=60)
        assert time.monotonic() - started < 10
        assert [r.metadata.src_node_id for r in replies] == [node]
