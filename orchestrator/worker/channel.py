"""JSON-lines messages over a Unix socket between a node agent and a training process (or zygote).

The agent creates a ``socketpair`` and hands one end to the child as an
inherited file descriptor. Reports (steps, checkpoints, errors) flow up;
control messages (the start spec) flow down; both are the dataclasses of
``messages.py``. Closing either end is how the other side learns its peer is gone.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from collections.abc import Iterator

from orchestrator.messages import MalformedMessage, Message, decode, encode

CONTROL_FD_ENV = "ORCH_CONTROL_FD"
_RECV_BYTES = 65536


class Channel:
    """One end of the socket; ``send`` is thread-safe; read with ``messages`` (blocking) or
    ``received`` (what has arrived), one reader at a time.

    A training process sets :attr:`attempt` as it enters each attempt: every report it sends from
    then on is stamped with it (unless it names its attempt itself: a checkpoint's save may outlive
    the attempt that made it)."""

    def __init__(self, sock: socket.socket) -> None:
        self.attempt: int | None = None
        self.drop_when_closed = False
        self._sock = sock
        self._send_lock = threading.Lock()
        self._reader = sock.makefile("rb")
        self._partial = b""  # the start of a line ``received`` has not seen the end of

    @classmethod
    def from_fd(cls, fd: int) -> Channel:
        """The channel on inherited descriptor ``fd``, which programs this process starts do not inherit."""
        os.set_inheritable(fd, False)
        return cls(socket.socket(fileno=fd))

    def send(self, message: Message) -> None:
        """Send ``message``; with ``drop_when_closed``, nothing once the peer has gone (no error)."""
        data = _line(message, self.attempt)
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                if not self.drop_when_closed:
                    raise

    def send_fd(self, message: Message, fd: int) -> None:
        """Send ``message`` with a file descriptor attached (SCM_RIGHTS)."""
        data = _line(message)
        with self._send_lock:
            socket.send_fds(self._sock, [data], [fd])

    def messages(self) -> Iterator[Message]:
        """Yield messages until the peer closes its end (:class:`MalformedMessage` on one that is not ours)."""
        for line in self._reader:
            yield parse(line)

    def received(self) -> list[bytes] | None:
        """The lines (messages for :func:`parse`) that have arrived, without waiting: for a reader of
        many channels, which calls this when the socket is readable. None once the peer has closed its end."""
        try:
            data = self._sock.recv(_RECV_BYTES, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            return None
        if not data:
            return None
        *lines, self._partial = (self._partial + data).split(b"\n")
        return lines

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed): a channel can be registered with a selector."""
        return self._sock.fileno()

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.close()
        self._sock.close()


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """The (pid, uid) of the process at the other end of a connected Unix socket (``SO_PEERCRED``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid


def parse(line: bytes) -> Message:
    """The message on ``line``; :class:`MalformedMessage` if it is not one of ours."""
    try:
        data = json.loads(line)
    except ValueError:
        raise MalformedMessage(f"not a JSON line: {line[:200]!r}") from None
    return decode(data)


def _line(message: Message, attempt: int | None = None) -> bytes:
    return (json.dumps(encode(message, attempt), default=str) + "\n").encode()
