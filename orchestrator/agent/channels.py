"""One thread reading the control channels of every process a node agent hosts.

A thread per process cost a 64-rank node 64 threads waking once a second or more each, all
contending for one interpreter lock with the thread that pushes the node's status: on a loaded
node that push was seen taking over two seconds, and a push late by a lease's length stops a
healthy node. One selector instead wakes once for whatever arrived, from any number of processes.
"""

from __future__ import annotations

import dataclasses
import selectors
import threading
import traceback
from collections.abc import Callable

from orchestrator.messages import MalformedMessage, Message
from orchestrator.worker.channel import Channel, parse

# A registration needs no wake-up (epoll and kqueue see it even mid-select), and a removal is checked
# under the lock: nothing waits on this timeout, which only keeps the thread from sleeping unbounded.
_SELECT_TIMEOUT_S = 1.0


@dataclasses.dataclass(frozen=True)
class _Reading:
    channel: Channel
    on_message: Callable[[Message], None]
    on_close: Callable[[MalformedMessage | None], None]


class ChannelReader:
    """Reads every added channel on one thread. Each message goes to its channel's ``on_message``;
    when the peer closes its end, or sends what is not one of our messages (``on_message`` may raise
    :class:`MalformedMessage` too), reading stops and ``on_close`` is told (with the error, if any).
    Callbacks run on the reader's thread: they must not block."""

    _shared: ChannelReader | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        # Held while a readiness is handled and while a channel is added or removed, so that a channel
        # removed (and closed) by another thread is never read after, nor its descriptor's next owner
        # taken for it.
        self._lock = threading.RLock()
        threading.Thread(target=self._run, name="channels", daemon=True).start()

    @classmethod
    def shared(cls) -> ChannelReader:
        """This process's reader (a node agent's), started on first use."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def add(self, channel: Channel, on_message: Callable[[Message], None],
            on_close: Callable[[MalformedMessage | None], None]) -> None:
        with self._lock:
            self._selector.register(channel, selectors.EVENT_READ, _Reading(channel, on_message, on_close))

    def remove(self, channel: Channel) -> None:
        """Read ``channel`` no more (before it is closed); ``on_close`` is not called."""
        with self._lock:
            try:
                self._selector.unregister(channel)
            except (KeyError, ValueError):
                pass  # its peer closed it already

    def _run(self) -> None:
        while True:
            for key, _ in self._selector.select(_SELECT_TIMEOUT_S):
                with self._lock:
                    # By descriptor: a channel removed meanwhile may be closed, and its number reused.
                    if self._selector.get_map().get(key.fd) is key:
                        self._read(key)

    def _read(self, key: selectors.SelectorKey) -> None:
        reading: _Reading = key.data
        error = None
        try:
            lines = reading.channel.received()
            for line in lines or ():
                reading.on_message(parse(line))
        except MalformedMessage as exc:
            lines, error = None, exc
        except Exception as exc:  # noqa: BLE001 - a bug handling one process must not deafen the agent to all
            traceback.print_exc()
            lines, error = None, MalformedMessage(f"could not be handled: {exc!r}")
        if lines is None:
            self._selector.unregister(key.fd)
            reading.on_close(error)
