"""The node agent's one reader of every hosted process's channel (``agent/channels.py``)."""

from __future__ import annotations

import queue
import selectors
import socket
import threading

from orchestrator.agent.channels import ChannelReader
from orchestrator.messages import Alive, MalformedMessage, Message
from orchestrator.worker.channel import Channel

_WAIT_S = 10.0


def _pair(reader: ChannelReader, got: queue.Queue[tuple[str, object]], name: str) -> tuple[Channel, socket.socket]:
    ours, theirs = socket.socketpair()
    channel = Channel(ours)

    def on_message(message: Message) -> None:
        got.put((name, message))

    def on_close(error: MalformedMessage | None) -> None:
        got.put((name, error or "closed"))

    reader.add(channel, on_message, on_close)
    return channel, theirs


def test_messages_of_many_channels_arrive_whole_and_a_close_is_told_once() -> None:
    reader, got = ChannelReader(), queue.Queue()
    pairs = {f"p{i}": _pair(reader, got, f"p{i}") for i in range(20)}
    line = b'{"type": "alive", "where": "x.py:1", "in_collective": false}\n'
    for name, (_, theirs) in pairs.items():
        theirs.sendall(line[:10])  # a message in two parts is read as one
        theirs.sendall(line[10:] + line)
        theirs.close()
    seen: dict[str, list[object]] = {}
    while sum(len(v) for v in seen.values()) < 3 * len(pairs):
        name, what = got.get(timeout=_WAIT_S)
        seen.setdefault(name, []).append(what)
    assert all(v[:2] == [Alive(where="x.py:1", in_collective=False)] * 2 and v[2] == "closed" for v in seen.values())
    assert got.empty()


class _Gate:
    """The reader's selector, holding the reader back once a select has returned something (when armed)."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._selector = selector
        self.armed, self.entered, self.returned, self.go = False, threading.Event(), threading.Event(), threading.Event()

    def select(self, timeout: float) -> list[tuple[selectors.SelectorKey, int]]:
        self.entered.set()
        events = self._selector.select(timeout)
        if events and self.armed:
            self.returned.set()
            self.go.wait(_WAIT_S)
        return events

    def __getattr__(self, name: str) -> object:
        return getattr(self._selector, name)


def test_a_channel_removed_and_closed_after_it_was_seen_readable_is_not_read() -> None:
    """Another thread removes and closes a channel the reader has just seen readable (a rank stopped
    for a recovery), and its descriptor's number goes to a new channel: the reader reads on, the
    new channel only."""
    reader, got = ChannelReader(), queue.Queue()
    gate = reader._selector = _Gate(reader._selector)
    assert gate.entered.wait(_WAIT_S), "the reader selects through the gate"
    old, theirs = _pair(reader, got, "old")
    gate.armed = True
    theirs.sendall(b'{"type": "alive", "where": "old", "in_collective": false}\n')
    assert gate.returned.wait(_WAIT_S)
    reader.remove(old)
    old.close()
    new, theirs_new = _pair(reader, got, "new")
    gate.armed = False
    gate.go.set()
    theirs_new.sendall(b'{"type": "alive", "where": "new", "in_collective": false}\n')
    assert got.get(timeout=_WAIT_S) == ("new", Alive(where="new", in_collective=False))
    assert got.empty()


def test_a_line_that_is_not_ours_closes_that_channel_with_the_error() -> None:
    reader, got = ChannelReader(), queue.Queue()
    _, bad = _pair(reader, got, "bad")
    _, good = _pair(reader, got, "good")
    bad.sendall(b"not json\n")
    name, error = got.get(timeout=_WAIT_S)
    assert name == "bad" and isinstance(error, MalformedMessage) and "not a JSON line" in str(error)
    good.sendall(b'{"type": "alive", "where": "y", "in_collective": true}\n')
    assert got.get(timeout=_WAIT_S) == ("good", Alive(where="y", in_collective=True))
