"""The node agent's line to the controller: one TCP connection on which the agent pushes its
node's status and the controller answers with acknowledgements and requests.

Why not Ray calls: one call costs its caller about half a millisecond of CPU, so a controller
that polled 2,048 agents a few times a second spent cores on calls alone. Here the agent speaks
when it has news (a rank failed, exited, saved a checkpoint, changed phase; rank 0 stepped), when
the controller asks, and otherwise once a heartbeat; the controller reads every push on one
thread and answers each with an acknowledgement, which renews the agent's lease.

The wire: MessagePack messages (:func:`~orchestrator.messages.pack`). The agent's first message
is its hello (run token, agent index, incarnation); then one
:func:`~orchestrator.messages.encode_status` per push. The controller sends ``{"ack": n}`` (push
``n`` received) and ``{"ask": k}`` (request ``k``: push now). A push not yet acknowledged is sent
again after a reconnection; the controller drops numbers it has seen.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from orchestrator.messages import MalformedMessage, NodeStatus, Unpacker, encode_status, pack

_RECONNECT_PAUSE_S = 0.2
_CONNECT_TIMEOUT_S = 5.0
_MAX_ANSWER = 2**16  # the controller's messages are acknowledgements and requests: a few bytes each


class Uplink:
    """The agent's end: :meth:`push` queues a status and sends it; acknowledgements and requests
    arrive on a thread of their own and go to ``on_ack(n)`` and ``on_ask(k)``."""

    def __init__(self, address: tuple[str, int], hello: dict[str, Any], on_ack: Callable[[int], None],
                 on_ask: Callable[[int], None]) -> None:
        self._address = address
        self._hello = pack(hello)
        self._on_ack, self._on_ask = on_ack, on_ask
        self._unacked: dict[int, bytes] = {}  # push number -> its bytes, until acknowledged
        self._lock = threading.Lock()  # the connection and the unacknowledged pushes
        self._sock: socket.socket | None = None
        self._closed = False
        self._unreachable_since: float | None = None  # said once per outage, not once per try

    def push(self, status: NodeStatus) -> None:
        """Send ``status``; it is sent again on the next connection until the controller acknowledges it."""
        packed = pack(encode_status(status))
        with self._lock:
            self._unacked[status.number] = packed
            sock = self._sock
        if sock is None:
            self._connect()  # a new connection sends every unacknowledged push, this one included
            return
        try:
            sock.sendall(packed)
        except OSError:
            self._drop(sock)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sock, self._sock = self._sock, None
        if sock is not None:
            _close(sock)

    def _connect(self) -> socket.socket | None:
        """A new connection, with the hello and every unacknowledged push sent; None if the
        controller cannot be reached now (the next push tries again)."""
        try:
            sock = socket.create_connection(self._address, timeout=_CONNECT_TIMEOUT_S)
            # Blocking from here on: acknowledgements may be a heartbeat apart. A controller that
            # stops reading blocks our pushes; the lease (on its own thread) then stops this node.
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            if self._unreachable_since is None:
                self._unreachable_since = time.monotonic()
                print(f"cannot reach the controller at {self._address[0]}:{self._address[1]}: {exc}; trying again",
                      file=sys.stderr, flush=True)
            time.sleep(_RECONNECT_PAUSE_S)
            return None
        if self._unreachable_since is not None:
            print(f"reached the controller again after {time.monotonic() - self._unreachable_since:.1f}s",
                  file=sys.stderr, flush=True)
            self._unreachable_since = None
        with self._lock:
            if self._closed or self._sock is not None:
                _close(sock)
                return self._sock
            try:
                sock.sendall(self._hello + b"".join(self._unacked[n] for n in sorted(self._unacked)))
            except OSError:
                _close(sock)
                return None
            self._sock = sock
        threading.Thread(target=self._read, args=(sock,), name="uplink-read", daemon=True).start()
        return sock

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            if self._sock is sock:
                self._sock = None
        _close(sock)

    def _read(self, sock: socket.socket) -> None:
        messages = Unpacker(_MAX_ANSWER)
        try:
            while data := sock.recv(_MAX_ANSWER):
                messages.feed(data)
                for message in messages:
                    if "ack" in message:
                        number = message["ack"]
                        with self._lock:
                            self._unacked = {n: packed for n, packed in self._unacked.items() if n > number}
                        self._on_ack(number)
                    elif "ask" in message:
                        self._on_ask(message["ask"])
        except (OSError, MalformedMessage, TypeError):
            pass  # dropped, or the controller went away: the next push connects again
        self._drop(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
