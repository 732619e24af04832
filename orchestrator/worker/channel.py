"""JSON-lines messages over a Unix socket between a node agent and a training process (or zygote).

The agent creates a ``socketpair`` and hands one end to the child as an
inherited file descriptor. Reports (steps, checkpoints, errors) flow up;
control messages (the start spec) flow down; both are the dataclasses of
``messages.py``. Closing either end is how the other side learns its peer is gone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
from collections.abc import Iterator

from orchestrator.messages import Message, Report, decode, encode

CONTROL_FD_ENV = "ORCH_CONTROL_FD"


class Channel:
    """One end of the socket; ``send`` is thread-safe, ``messages`` is for one reader.

    A training process sets :attr:`attempt` as it enters each attempt: every report it sends from
    then on is stamped with it (unless it names its attempt itself: a checkpoint's save may outlive
    the attempt that made it)."""

    def __init__(self, sock: socket.socket) -> None:
        self.attempt: int | None = None
        self._sock = sock
        self._send_lock = threading.Lock()
        self._reader = sock.makefile("r", encoding="utf-8")

    @classmethod
    def from_fd(cls, fd: int) -> Channel:
        """The channel on inherited descriptor ``fd``, which programs this process starts do not inherit."""
        os.set_inheritable(fd, False)
        return cls(socket.socket(fileno=fd))

    def send(self, message: Message) -> None:
        if self.attempt is not None and isinstance(message, Report) and message.attempt < 0:
            message = dataclasses.replace(message, attempt=self.attempt)
        data = _line(message)
        with self._send_lock:
            self._sock.sendall(data)

    def send_fd(self, message: Message, fd: int) -> None:
        """Send ``message`` with a file descriptor attached (SCM_RIGHTS)."""
        data = _line(message)
        with self._send_lock:
            socket.send_fds(self._sock, [data], [fd])

    def messages(self) -> Iterator[Message]:
        """Yield messages until the peer closes its end (:class:`MalformedMessage` on one that is not ours)."""
        for line in self._reader:
            yield decode(json.loads(line))

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.close()
        self._sock.close()


def _line(message: Message) -> bytes:
    return (json.dumps(encode(message), default=str) + "\n").encode()
