"""Mirror a rank's memory snapshots into a buddy rank's memory, and fetch them back, over TCP.

The side channel shares nothing with the training process group: each
training process serves a :class:`MirrorServer` (its node's address, a free
port) that keeps the two newest snapshots of the rank it backs up, and runs a
:class:`MirrorSender` that pushes its own newest snapshot to its buddy's
server in the background. After a failure, a replacement fetches its
predecessor's snapshot from the buddy (:func:`fetch`).

One frame carries one snapshot::

    MAGIC | u32 header length | u32 meta length | header (JSON) | meta (pickle) | HMAC-SHA256
    payload (the packed tensors, header["payload"] bytes)
    u32 CRC-32 of the payload | HMAC-SHA256 (of the first HMAC and the CRC)

The HMACs use the run's key (``Start.mirror_key``, from the controller): the
meta is unpickled only once its HMAC holds, so nobody without the key can make
a process unpickle anything. The payload's CRC is computed once, by the rank
that took the snapshot; the buddy keeps the frame exactly as received and the
rank that restores from it checks the CRC, end to end.
"""

from __future__ import annotations

import hmac
import json
import pickle
import socket
import struct
import sys
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any

from orchestrator.checkpoint.memory import HostSnapshots

MAGIC = b"OMS1"
_PREFIX = struct.Struct("!4sII")
_TRAILER = struct.Struct("!I")
_MAC_BYTES = 32
_MAX_HEADER = 64 << 10
_MAX_META = 256 << 20
_CHUNK = 4 << 20
IO_TIMEOUT_S = 60.0  # a peer silent this long in the middle of a frame is gone
CONNECT_TIMEOUT_S = 5.0


class MirrorError(Exception):
    """A snapshot could not be sent or fetched whole (connection, checksum, key)."""


def _mac(key: bytes, *parts: bytes) -> bytes:
    digest = hmac.new(key, digestmod="sha256")
    for part in parts:
        digest.update(part)
    return digest.digest()


@dataclass
class Frame:
    """A snapshot as it travels: ``head`` (prefix, header, meta, HMAC), ``payload``, ``trailer``."""

    header: dict[str, Any]
    head: bytes
    payload: Any  # a uint8 torch tensor (or None while empty)
    trailer: bytes = b""

    @property
    def step(self) -> int:
        return int(self.header["step"])


def encode_head(key: bytes, header: dict[str, Any], meta: bytes = b"") -> bytes:
    """The authenticated head of a frame (a whole frame when there is no payload: a request)."""
    text = json.dumps(header, separators=(",", ":")).encode()
    body = _PREFIX.pack(MAGIC, len(text), len(meta)) + text + meta
    return body + _mac(key, body)


def read_head(sock: socket.socket, key: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """Read and authenticate a head; returns ``(header, meta bytes, the head's raw bytes)``."""
    prefix = _recv_exact(sock, _PREFIX.size)
    magic, header_len, meta_len = _PREFIX.unpack(prefix)
    if magic != MAGIC or header_len > _MAX_HEADER or meta_len > _MAX_META:
        raise MirrorError("not a snapshot frame")
    rest = _recv_exact(sock, header_len + meta_len + _MAC_BYTES)
    body, mac = prefix + rest[:-_MAC_BYTES], rest[-_MAC_BYTES:]
    if not hmac.compare_digest(mac, _mac(key, body)):
        raise MirrorError("a frame's HMAC does not match the run's key")
    header = json.loads(rest[:header_len])
    return header, rest[header_len:header_len + meta_len], body + mac


def _trailer(key: bytes, head: bytes, crc: int) -> bytes:
    packed = _TRAILER.pack(crc)
    return packed + _mac(key, head[-_MAC_BYTES:], packed)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray(size)
    _recv_into(sock, memoryview(data))
    return bytes(data)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], min(len(view) - got, _CHUNK))
        if n == 0:
            raise MirrorError("the peer closed the connection mid-frame")
        got += n


def _payload_view(tensor: Any, nbytes: int) -> memoryview:
    return memoryview(tensor[:nbytes].numpy()).cast("B")


def send_snapshot(sock: socket.socket, key: bytes, snapshots: HostSnapshots, rank: int, world_size: int) -> int | None:
    """Send this rank's newest whole snapshot; its step, or None when there was none. A snapshot
    rewritten while it was being sent goes with a void trailer, which the receiver drops."""
    with snapshots.lock:
        snap = snapshots.newest()
        if snap is None:
            return None
        version = snap.version
        step, nbytes, tree, user_state, buffer = snap.step, snap.nbytes, snap.tree, snap.user_state, snap.buffer
    meta = pickle.dumps({"tree": tree, "user_state": user_state}, protocol=pickle.HIGHEST_PROTOCOL)
    header = {"kind": "snapshot", "rank": rank, "world_size": world_size, "step": step, "payload": nbytes}
    head = encode_head(key, header, meta)
    sock.sendall(head)
    crc = 0
    view = _payload_view(buffer, nbytes)
    for start in range(0, nbytes, _CHUNK):
        chunk = view[start:start + _CHUNK]
        crc = zlib.crc32(chunk, crc)
        sock.sendall(chunk)
    with snapshots.lock:
        torn = snap.version != version
    sock.sendall(b"\0" * (_TRAILER.size + _MAC_BYTES) if torn else _trailer(key, head, crc))
    return None if torn else step


def fetch(address: tuple[str, int], key: bytes, rank: int, step: int, timeout_s: float = IO_TIMEOUT_S) -> tuple[Any, Any, Any]:
    """Fetch rank ``rank``'s snapshot of ``step`` from the server at ``address``; checked end to end.
    Returns ``(tree, user_state, payload tensor)``; raises :class:`MirrorError`."""
    import torch

    try:
        with socket.create_connection(address, timeout=CONNECT_TIMEOUT_S) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(encode_head(key, {"kind": "fetch", "rank": rank, "step": step}))
            header, meta, head = read_head(sock, key)
            if header.get("kind") != "snapshot" or header.get("rank") != rank or header.get("step") != step:
                raise MirrorError(f"the buddy no longer holds rank {rank}'s snapshot of step {step}")
            payload = torch.empty(int(header["payload"]), dtype=torch.uint8)
            _recv_into(sock, _payload_view(payload, payload.numel()))
            trailer = _recv_exact(sock, _TRAILER.size + _MAC_BYTES)
    except OSError as exc:
        raise MirrorError(f"fetching from {address[0]}:{address[1]}: {exc}") from exc
    if not hmac.compare_digest(trailer, _trailer(key, head, zlib.crc32(_payload_view(payload, payload.numel())))):
        raise MirrorError(f"rank {rank}'s snapshot of step {step} fails its checksum")
    meta_obj = pickle.loads(meta)  # authenticated by the head's HMAC (read_head)
    return meta_obj["tree"], meta_obj["user_state"], payload


@dataclass
class MirrorServer:
    """Keeps the two newest snapshots of each rank that pushes to it; serves them to :func:`fetch`."""

    key: bytes
    host: str
    _held: dict[int, list[Frame]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _listener: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        self._listener = socket.create_server((self.host, 0), backlog=64)
        threading.Thread(target=self._accept, name="mirror-server", daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self._listener.getsockname()[1]

    def held(self, world_size: int) -> dict[int, list[int]]:
        """Rank -> the steps of its snapshots held whole here (taken in a world of ``world_size``)."""
        with self._lock:
            return {rank: sorted(f.step for f in frames if f.trailer and f.header["world_size"] == world_size)
                    for rank, frames in self._held.items()}

    def forget(self, newer_than: int | None = None) -> None:
        """Drop held snapshots (those after step ``newer_than``; all when None): after a restore, a
        snapshot from the abandoned future must never be restored."""
        with self._lock:
            for frames in self._held.values():
                for frame in frames:
                    if frame.trailer and (newer_than is None or frame.step > newer_than):
                        frame.trailer = b""

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="mirror-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(IO_TIMEOUT_S)
            try:
                while True:
                    try:
                        header, meta, head = read_head(conn, self.key)
                    except MirrorError as exc:
                        if "closed" not in str(exc):
                            print(f"orchestrator: mirror: dropped a connection: {exc}", file=sys.stderr, flush=True)
                        return
                    if header.get("kind") == "fetch":
                        self._answer(conn, int(header["rank"]), int(header["step"]))
                    elif header.get("kind") == "snapshot":
                        self._receive(conn, header, head)
                    else:
                        return
            except (OSError, MirrorError, KeyError, ValueError):
                return  # the peer went away mid-frame: what it was sending is dropped

    def _receive(self, conn: socket.socket, header: dict[str, Any], head: bytes) -> None:
        import torch

        rank, nbytes = int(header["rank"]), int(header["payload"])
        with self._lock:
            frames = self._held.setdefault(rank, [])
            whole = [f for f in frames if f.trailer]
            newest = max(whole, key=lambda f: f.step) if whole else None
            target = next((f for f in frames if f is not newest), None)
            if target is None:
                target = Frame(header={}, head=b"", payload=None)
                frames.append(target)
            target.trailer = b""  # not whole until its trailer holds
        if target.payload is None or target.payload.numel() < nbytes:
            target.payload = torch.empty(nbytes, dtype=torch.uint8)
        _recv_into(conn, _payload_view(target.payload, nbytes))
        trailer = _recv_exact(conn, _TRAILER.size + _MAC_BYTES)
        crc_bytes, mac = trailer[:_TRAILER.size], trailer[_TRAILER.size:]
        if not hmac.compare_digest(mac, _mac(self.key, head[-_MAC_BYTES:], crc_bytes)):
            return  # torn at the sender (rewritten while sent): the previous one stays the newest
        with self._lock:
            target.header, target.head, target.trailer = header, head, trailer

    def _answer(self, conn: socket.socket, rank: int, step: int) -> None:
        with self._lock:
            frame = next((f for f in self._held.get(rank, []) if f.trailer and f.step == step), None)
            if frame is not None:
                head, trailer, nbytes, payload = frame.head, frame.trailer, int(frame.header["payload"]), frame.payload
        if frame is None:
            conn.sendall(encode_head(self.key, {"kind": "none", "rank": rank, "step": step}))
            return
        conn.sendall(head)
        conn.sendall(_payload_view(payload, nbytes))
        conn.sendall(trailer)

    def close(self) -> None:
        self._listener.close()


class MirrorSender:
    """Pushes this rank's newest snapshot to its buddy's server, on its own thread, whenever there is
    a newer one; a slow buddy gets the newest, never a backlog."""

    def __init__(self, snapshots: HostSnapshots, key: bytes) -> None:
        self._snapshots = snapshots
        self._key = key
        self._wake = threading.Condition()
        self._target: tuple[str, int] | None = None
        self._identity = (0, 1)  # (rank, world size) the snapshots are taken as
        self._generation = 0
        self._sent_step: int | None = None
        self._complained = False
        threading.Thread(target=self._run, name="mirror-sender", daemon=True).start()

    @property
    def sent_step(self) -> int | None:
        """The step of the newest snapshot the buddy has whole (as far as this side knows)."""
        return self._sent_step

    def aim(self, target: tuple[str, int] | None, rank: int, world_size: int) -> None:
        """Send to ``target`` from now on (None: nobody), as ``rank`` of ``world_size``."""
        with self._wake:
            self._target, self._identity = target, (rank, world_size)
            self._generation += 1
            self._sent_step = None
            self._wake.notify()

    def offer(self) -> None:
        """A new snapshot is whole: send it when the previous one has gone."""
        with self._wake:
            self._wake.notify()

    def _run(self) -> None:
        sock: socket.socket | None = None
        connected_to: tuple[int, tuple[str, int] | None] = (-1, None)
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._pending(), timeout=1.0)
                target, generation, (rank, world_size) = self._target, self._generation, self._identity
            if target is None or not self._pending():
                continue
            try:
                if sock is None or connected_to != (generation, target):
                    if sock is not None:
                        sock.close()
                    sock = None
                    sock = socket.create_connection(target, timeout=CONNECT_TIMEOUT_S)
                    sock.settimeout(IO_TIMEOUT_S)
                    connected_to = (generation, target)
                step = send_snapshot(sock, self._key, self._snapshots, rank, world_size)
                with self._wake:
                    if step is not None and generation == self._generation:
                        self._sent_step = step
                self._complained = False
            except OSError as exc:
                if sock is not None:
                    sock.close()
                sock = None
                if not self._complained:
                    self._complained = True
                    print(f"orchestrator: mirror: cannot send to the buddy at {target[0]}:{target[1]}: {exc}",
                          file=sys.stderr, flush=True)
                with self._wake:
                    self._wake.wait(timeout=1.0)

    def _pending(self) -> bool:
        newest = self._snapshots.newest()
        return self._target is not None and newest is not None and newest.step != self._sent_step
