"""The controller's end of the node agents' uplinks (``agent/uplink.py``): one listening socket,
one thread that reads every agent's pushes, acknowledges each at once and keeps them for the
controller's next look.

Acknowledging on this thread, not in the controller's loop, is what keeps leases alive while the
controller is busy elsewhere (placing nodes, converting a checkpoint): a node's ranks stop only
when the node cannot reach this process.

A connection is accepted only with the run's token and the incarnation the worker group expects
for that agent index: a replaced agent's late pushes are dropped, never credited to its successor.
"""

from __future__ import annotations

import contextlib
import hmac
import selectors
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from orchestrator.messages import Error, MalformedMessage, NodeStatus, Unpacker, decode_status, pack

_SELECT_S = 0.2
# The reading thread takes what arrived at most this often: a wake-up per push (thousands a second at
# scale) costs more than the pushes' decoding; a failure's news waits this long at most. 50 ms, not 5:
# measured at 2,048 agents, 18 us less per push (of ~100) at 20 ms, 5 more at 50.
_BATCH_S = 0.05
# A pass of the reading thread that starts this late is said on stderr (agents' leases depend on it).
_LATE_S = 1.0
_HELLO_TIMEOUT_S = 10.0
_MAX_MESSAGE = 64 * 2**20  # a status with every rank's log tail stays far below this


@dataclass(kw_only=True)
class _Connection:
    sock: socket.socket
    opened: float
    index: int | None = None  # set by the hello
    messages: Unpacker = field(default_factory=lambda: Unpacker(_MAX_MESSAGE))
    send_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True, kw_only=True)
class Received:
    """What the agents pushed since the last :meth:`Inbox.take`: each agent's statuses in order,
    when its latest arrived (monotonic), and the agents whose connection closed."""

    statuses: dict[int, list[NodeStatus]]
    arrived: dict[int, float]
    closed: set[int]


class Inbox:
    """Listens on ``host`` (a free port: :attr:`address`) for the agents of one run."""

    def __init__(self, host: str, token: str) -> None:
        self._token = token.encode()
        self._server = socket.create_server((host, 0), backlog=4096)
        self._server.setblocking(False)
        self.address: tuple[str, int] = self._server.getsockname()[:2]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._server, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._expected: dict[int, int] = {}  # agent index -> the incarnation whose pushes count
        self._current: dict[int, _Connection] = {}  # agent index -> its connection
        self._last: dict[int, int] = {}  # agent index -> the last push number taken (its incarnation's)
        self._statuses: dict[int, list[NodeStatus]] = {}
        self._arrived: dict[int, float] = {}
        self._closed: set[int] = set()
        self._requests = 0
        self._answered: dict[int, int] = {}  # agent index -> the latest request a status of it answered
        # Set by what the controller decides on: a failure (an exit, an error), an answer to a request,
        # a connection closed; not by steps, saves or heartbeats, which wait for its next look.
        self._news = threading.Event()
        self._retired: list[_Connection] = []
        self._hellos_checked_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="inbox", daemon=True)
        self._thread.start()

    def expect(self, index: int, incarnation: int) -> None:
        """From now on agent ``index`` is incarnation ``incarnation``: pushes of any other are dropped."""
        with self._lock:
            self._expected[index] = incarnation
            self._last.pop(index, None)
            self._statuses.pop(index, None)
            self._arrived.pop(index, None)
            self._closed.discard(index)
            old = self._current.pop(index, None)
            if old is not None:
                self._retired.append(old)  # closed by the reading thread, which owns the selector

    def ask(self, indexes: list[int]) -> int:
        """Ask these agents to push their status now. Returns the request's number: a status with
        ``asked`` at least this number was made after the request."""
        with self._lock:
            self._requests += 1
            request = self._requests
            conns = [c for i in indexes if (c := self._current.get(i)) is not None]
        message = pack({"ask": request})
        for conn in conns:
            self._send(conn, message)
        return request

    def wait(self, timeout_s: float, soonest_s: float) -> None:
        """Until news arrives (``_news``), but not before ``soonest_s``, or until ``timeout_s``."""
        time.sleep(soonest_s)
        if self._news.wait(max(0.0, timeout_s - soonest_s)):
            self._news.clear()  # before take(): news arriving after it sets it again

    def take(self) -> Received:
        """Everything pushed since the last call."""
        with self._lock:
            received = Received(statuses=self._statuses, arrived=dict(self._arrived), closed=self._closed)
            self._statuses, self._closed = {}, set()
        return received

    def close(self) -> None:
        """Stop reading and close every connection and the listening socket."""
        self._stop.set()
        self._thread.join(timeout=5 * _SELECT_S)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()

    def _serve(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            if (late := time.monotonic() - last) > _LATE_S:
                # Nothing was read or acknowledged meanwhile: the agents' leases ran down by as much.
                print(f"inbox: this process read no agent for {late:.1f}s (busy elsewhere)", file=sys.stderr, flush=True)
            last = time.monotonic()
            acks = []
            for key, _ in self._selector.select(timeout=_SELECT_S):
                if key.fileobj is self._server:
                    self._accept()
                elif acked := self._read(key.data):
                    acks.append((key.data, acked))
            # Acknowledged once every connection of the pass was read, not each after its own read:
            # measured at 16,384 ranks, 55-58 us a push instead of 67-69.
            for conn, acked in acks:
                self._send(conn, pack({"ack": acked}))
            with self._lock:
                retired, self._retired = self._retired, []
            for conn in retired:
                self._drop(conn)
            self._expire_hellos()
            time.sleep(_BATCH_S)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: the agent tries again
                print(f"inbox: cannot accept an agent's connection: {exc}", file=sys.stderr, flush=True)
                return
            # Non-blocking: a read takes what is there, and a write that does not fit at once (a few
            # bytes to a socket buffer of megabytes) means the agent stopped reading: its connection
            # is dropped (it reconnects, or its lease ends). Each costs one system call, not two.
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._selector.register(sock, selectors.EVENT_READ, _Connection(sock=sock, opened=time.monotonic()))

    def _read(self, conn: _Connection) -> int:
        """Take what ``conn`` sent: the number of the latest status to acknowledge (0: none). One
        acknowledgement for all: the agent takes it for every push up to it."""
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return 0
        except OSError:
            data = b""
        if not data:
            self._drop(conn, closed=True)
            return 0
        acked = 0
        try:
            conn.messages.feed(data)
            for message in conn.messages:
                number = self._take(conn, message)
                if number is None:
                    self._drop(conn)
                    return 0
                acked = max(acked, number)
        except MalformedMessage as exc:
            if conn.index is not None:
                print(f"inbox: agent {conn.index} sent {exc}; dropping its connection", file=sys.stderr, flush=True)
            self._drop(conn)
            return 0
        return acked

    def _take(self, conn: _Connection, message: object) -> int | None:
        """Take one message: the status number to acknowledge (0: none), or None if the connection must
        be dropped (a bad hello, a stale or broken agent)."""
        if conn.index is None:
            return 0 if self._hello(conn, message) else None
        status = decode_status(message)  # MalformedMessage: the caller drops the connection
        with self._lock:
            if self._current.get(conn.index) is not conn:
                return None  # replaced meanwhile
            if status.number > self._last.get(conn.index, 0):  # not one sent again after a reconnection
                self._last[conn.index] = status.number
                self._statuses.setdefault(conn.index, []).append(status)
                self._arrived[conn.index] = time.monotonic()
                answers = status.asked > self._answered.get(conn.index, 0)
                if answers:
                    self._answered[conn.index] = status.asked
                if answers or _fails(status):
                    self._news.set()
        return status.number

    def _hello(self, conn: _Connection, message: object) -> bool:
        if not isinstance(message, dict) or not hmac.compare_digest(str(message.get("token", "")).encode(), self._token):
            return False
        index, incarnation = message.get("index"), message.get("incarnation")
        with self._lock:
            if not isinstance(index, int) or self._expected.get(index) != incarnation:
                return False
            conn.index = index
            old, self._current[index] = self._current.get(index), conn
        if old is not None and old is not conn:
            self._drop(old)  # the same agent connected again: its old connection is dead to it
        return True

    def _expire_hellos(self) -> None:
        """Connections that never said who they are (a port scan, a stuck client) are closed."""
        now = time.monotonic()
        if now - self._hellos_checked_at < 1.0:
            return
        self._hellos_checked_at = now
        for key in list(self._selector.get_map().values()):
            conn = key.data
            if conn is not None and conn.index is None and now - conn.opened > _HELLO_TIMEOUT_S:
                self._drop(conn)

    def _send(self, conn: _Connection, message: bytes) -> None:
        try:
            with conn.send_lock:
                conn.sock.sendall(message)
        except OSError:
            # The reading thread sees the connection end, and drops it.
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def _drop(self, conn: _Connection, closed: bool = False) -> None:
        """Close ``conn``; with ``closed`` (the agent closed it) the worker group hears of it."""
        with self._lock:
            current = conn.index is not None and self._current.get(conn.index) is conn
            if current:
                del self._current[conn.index]
                if closed:
                    self._closed.add(conn.index)
                    self._news.set()
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()


def _fails(status: NodeStatus) -> bool:
    """Whether ``status`` tells of a rank that exited or raised (not because it was interrupted)."""
    if not status.ranks and not status.left:  # a heartbeat: nearly every status
        return False
    return any(rank.returncode is not None or any(isinstance(r, Error) for r in rank.reports)
               for rank in status.ranks.values()) or any(not left.interrupted for left in status.left)
