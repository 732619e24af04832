"""Mirror a rank's memory snapshots into a buddy rank's memory, and fetch them back.

Each training process serves a :class:`MirrorServer` that keeps the snapshots
of the rank it backs up, and runs a :class:`MirrorSender` that puts its own
there. The side channel shares nothing with the training process group:

- a buddy **on the same node** is handed the descriptors of the rank's two
  snapshot regions (memfds, ``checkpoint/memory.py``) once, over a Unix socket:
  it maps the very memory the snapshots are taken into, so mirroring costs no
  copy and no CPU, and the memory outlives the rank for as long as the buddy
  keeps the descriptors;
- a buddy **on another node** gets each new snapshot over TCP, sent by a
  background thread whenever there is a newer one (the newest, never a backlog).

After a failure, a replacement fetches its predecessor's snapshot from the
buddy over TCP (:func:`fetch`). One frame carries one snapshot::

    MAGIC | u32 header length | u32 meta length | header (JSON) | meta (pickle) | HMAC-SHA256
    payload (the packed tensors, header["payload"] bytes)
    u32 checksum of the payload | HMAC-SHA256 (of the first HMAC and the checksum)

The HMACs use the run's key (``Start.mirror_key``, from the controller): the
meta is unpickled only once its HMAC holds, so nobody without the key can make
a process unpickle anything. The payload's checksum (``memory.checksum``) is
computed by the rank that took the snapshot, kept with it wherever it goes, and
checked by the rank that restores it: end to end.
"""

from __future__ import annotations

import hmac
import json
import os
import pickle
import secrets
import socket
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Any

from orchestrator.checkpoint.memory import DATA_OFFSET as _DATA
from orchestrator.checkpoint.memory import HostSnapshots, Region, checksum
from orchestrator.worker.channel import peer_credentials

MAGIC = b"OMS1"
_PREFIX = struct.Struct("!4sII")
_TRAILER = struct.Struct("!I")
_MAC_BYTES = 32
_MAX_HEADER = 64 << 10
_MAX_META = 256 << 20
_SOCKET_BUFFER = 4 << 20
IO_TIMEOUT_S = 60.0  # a peer silent this long in the middle of a frame is gone
CONNECT_TIMEOUT_S = 5.0
_VOID_TRAILER = b"\0" * (_TRAILER.size + _MAC_BYTES)


class MirrorError(Exception):
    """A snapshot could not be sent or fetched whole (connection, checksum, key)."""


def _mac(key: bytes, *parts: bytes) -> bytes:
    digest = hmac.new(key, digestmod="sha256")
    for part in parts:
        digest.update(part)
    return digest.digest()


def encode_head(key: bytes, header: dict[str, Any], meta: bytes = b"") -> bytes:
    """The authenticated head of a frame (a whole frame when there is no payload: a request)."""
    text = json.dumps(header, separators=(",", ":")).encode()
    body = _PREFIX.pack(MAGIC, len(text), len(meta)) + text + meta
    return body + _mac(key, body)


def read_head(sock: socket.socket, key: bytes, first: bytes = b"") -> tuple[dict[str, Any], bytes, bytes]:
    """Read and authenticate a head (``first``: its bytes already read); returns ``(header, meta
    bytes, the head's raw bytes)``."""
    prefix = first[:_PREFIX.size] + _recv_exact(sock, max(0, _PREFIX.size - len(first)))
    magic, header_len, meta_len = _PREFIX.unpack(prefix)
    if magic != MAGIC or header_len > _MAX_HEADER or meta_len > _MAX_META:
        raise MirrorError("not a snapshot frame")
    already = first[_PREFIX.size:]
    rest = already + _recv_exact(sock, header_len + meta_len + _MAC_BYTES - len(already))
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
        n = sock.recv_into(view[got:], len(view) - got, socket.MSG_WAITALL)
        if n == 0:
            raise MirrorError("the peer closed the connection mid-frame")
        got += n


def _blocking(sock: socket.socket) -> socket.socket:
    """Make ``sock`` block in the kernel for whole transfers (``MSG_WAITALL``, one ``sendall``) with
    the kernel's timeouts: with Python's own timeout every partial transfer would take the GIL
    back, and each time the training thread waits for it (on a busy node, milliseconds a step)."""
    sock.settimeout(None)
    timeout = struct.pack("ll", int(IO_TIMEOUT_S), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
    return sock


def _bytes_of(tensor: Any) -> memoryview:
    return memoryview(tensor.numpy()).cast("B")


def send_region(sock: socket.socket, key: bytes, region: Region, rank: int, world_size: int) -> int | None:
    """Send the snapshot in ``region`` as one frame; its step, or None when it is not whole. A region
    rewritten while it was being sent goes with a void trailer, which the receiver drops."""
    before = region.header()
    if not before.whole:
        sock.sendall(encode_head(key, {"kind": "none", "rank": rank}))
        return None
    header = {"kind": "snapshot", "rank": rank, "world_size": world_size, "step": before.step,
              "payload": before.nbytes}
    head = encode_head(key, header, region.meta(before))
    sock.sendall(head)
    sock.sendall(_bytes_of(region.payload(before.nbytes)))
    torn = region.header().version != before.version
    sock.sendall(_VOID_TRAILER if torn else _trailer(key, head, before.checksum))
    return None if torn else before.step


def fetch(address: tuple[str, int], key: bytes, rank: int, step: int) -> tuple[Any, Any, Any]:
    """Fetch rank ``rank``'s snapshot of ``step`` from the server at ``address``; checked end to end.
    Returns ``(tree, user_state, payload tensor)``; raises :class:`MirrorError`."""
    import torch

    try:
        with _blocking(socket.create_connection(address, timeout=CONNECT_TIMEOUT_S)) as sock:
            sock.sendall(encode_head(key, {"kind": "fetch", "rank": rank, "step": step}))
            header, meta, head = read_head(sock, key)
            if header.get("kind") != "snapshot" or header.get("rank") != rank or header.get("step") != step:
                raise MirrorError(f"the buddy no longer holds rank {rank}'s snapshot of step {step}")
            payload = torch.empty(int(header["payload"]), dtype=torch.uint8)
            _recv_into(sock, _bytes_of(payload))
            trailer = _recv_exact(sock, _TRAILER.size + _MAC_BYTES)
    except OSError as exc:
        raise MirrorError(f"fetching from {address[0]}:{address[1]}: {exc}") from exc
    if not hmac.compare_digest(trailer, _trailer(key, head, checksum(payload.numpy()))):
        raise MirrorError(f"rank {rank}'s snapshot of step {step} fails its checksum")
    meta_obj = pickle.loads(meta)  # authenticated by the head's HMAC (read_head)
    return meta_obj["tree"], meta_obj["user_state"], payload


@dataclass
class _Source:
    """What the server keeps for one rank: regions it maps (a rank on this node) or received."""

    world_size: int
    regions: list[Region]
    mapped: bool  # the rank's own memory, shared; else copies received over TCP
    connected: bool = True


class MirrorServer:
    """Keeps the two newest snapshots of each rank that mirrors to it; serves them to :func:`fetch`.

    Listens on ``host`` (TCP, a free port) for buddies on other nodes and for fetches, and on an
    abstract Unix socket (``local_name``) for buddies on this node, which hand over their regions."""

    def __init__(self, key: bytes, host: str) -> None:
        self.key, self.host = key, host
        self._sources: dict[int, _Source] = {}
        self._lock = threading.Lock()
        self._tcp = socket.create_server((host, 0), backlog=64)
        self.local_name = f"\0orchestrator-mirror-{os.getpid()}-{secrets.token_hex(8)}"
        self._unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._unix.bind(self.local_name)
        self._unix.listen(64)
        for listener in (self._tcp, self._unix):
            threading.Thread(target=self._accept, args=(listener,), name="mirror-server", daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self._tcp.getsockname()[1]

    def held(self, world_size: int) -> dict[int, list[int]]:
        """Rank -> the steps of its snapshots held whole here (taken in a world of ``world_size``)."""
        with self._lock:
            sources = list(self._sources.items())
        return {rank: sorted(h.step for r in src.regions if (h := r.header()).whole)
                for rank, src in sources if src.world_size == world_size}

    def forget(self, newer_than: int) -> None:
        """After a restore to step ``newer_than``: a rank whose process is gone will never send again,
        and what it left is consumed or from a future the run no longer has: dropped. A live rank's
        own later snapshots are dropped by the rank itself (``HostSnapshots.forget``); received
        copies of later steps, here."""
        with self._lock:
            for rank, src in list(self._sources.items()):
                if src.mapped and not src.connected:
                    del self._sources[rank]
                    for region in src.regions:
                        region.close()
                elif not src.mapped:
                    for region in src.regions:
                        header = region.header()
                        if header.whole and header.step > newer_than:
                            region.invalidate()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="mirror-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        local = conn.family == socket.AF_UNIX
        mapped: _Source | None = None  # what this connection's rank handed over (the latest)
        with _blocking(conn):
            if local and not _same_user(conn):
                return
            try:
                while True:
                    first, fds = b"", []
                    if local:  # descriptors come with a frame's first bytes
                        first, fds, _, _ = socket.recv_fds(conn, _PREFIX.size, 4, socket.MSG_WAITALL)
                        if not first:
                            return
                    try:
                        header, meta, head = read_head(conn, self.key, first)
                    except MirrorError as exc:
                        if "closed" not in str(exc):
                            print(f"orchestrator: mirror: dropped a connection: {exc}", file=sys.stderr, flush=True)
                        for fd in fds:
                            os.close(fd)
                        return
                    kind = header.get("kind")
                    if kind == "regions" and local:
                        mapped = self._map(int(header["rank"]), int(header["world_size"]), fds)
                    elif kind == "fetch":
                        self._answer(conn, int(header["rank"]), int(header["step"]))
                    elif kind == "snapshot":
                        self._receive(conn, header, meta, head)
                    elif kind != "none":  # "none": the sender's newest was being rewritten
                        return
            except (OSError, MirrorError, KeyError, ValueError):
                return  # the peer went away mid-frame: what it was sending is dropped
            finally:
                if mapped is not None:  # its rank is gone (or gave up): what it handed over, not a successor's
                    mapped.connected = False

    def _map(self, rank: int, world_size: int, fds: list[int]) -> _Source:
        source = _Source(world_size=world_size, regions=[Region.attach(fd) for fd in fds], mapped=True)
        with self._lock:
            previous = self._sources.get(rank)
            self._sources[rank] = source
        if previous is not None and previous.mapped:
            for region in previous.regions:
                region.close()  # the descriptor; the mapping goes with the last reference
        return source

    def _receive(self, conn: socket.socket, header: dict[str, Any], meta: bytes, head: bytes) -> None:
        rank, nbytes, step = int(header["rank"]), int(header["payload"]), int(header["step"])
        with self._lock:
            src = self._sources.get(rank)
            if src is None or src.mapped or src.world_size != int(header["world_size"]):
                src = self._sources[rank] = _Source(world_size=int(header["world_size"]), regions=[], mapped=False)
            # Into the region that does not hold the newest whole copy: that one stays until this is whole.
            whole = [(h.step, r) for r in src.regions if (h := r.header()).whole]
            keep = max(whole, key=lambda held: held[0])[1] if whole else None
            target = next((r for r in src.regions if r is not keep), None)
            need = _DATA + nbytes + len(meta)
            if target is None or target.size < need:
                if target is not None:
                    src.regions.remove(target)
                    target.close()
                target = Region(need)
                src.regions.append(target)
            target.begin_write()
        _recv_into(conn, _bytes_of(target.payload(nbytes)))
        trailer = _recv_exact(conn, _TRAILER.size + _MAC_BYTES)
        crc_bytes, mac = trailer[:_TRAILER.size], trailer[_TRAILER.size:]
        if not hmac.compare_digest(mac, _mac(self.key, head[-_MAC_BYTES:], crc_bytes)):
            return  # torn at the sender (rewritten while sent): the previous one stays the newest
        target.finish_write(step, nbytes, meta, _TRAILER.unpack(crc_bytes)[0])

    def _answer(self, conn: socket.socket, rank: int, step: int) -> None:
        with self._lock:
            src = self._sources.get(rank)
            region = next((r for r in src.regions if (h := r.header()).whole and h.step == step), None) if src else None
        if region is None:
            conn.sendall(encode_head(self.key, {"kind": "none", "rank": rank, "step": step}))
        else:
            send_region(conn, self.key, region, rank, src.world_size)  # torn: a void trailer, refused

    def close(self) -> None:
        self._tcp.close()
        self._unix.close()


def _same_user(conn: socket.socket) -> bool:
    """A Unix peer must be this user's process (the HMAC is checked too)."""
    return peer_credentials(conn)[1] == os.getuid()


class MirrorSender:
    """Puts this rank's snapshots in its buddy's memory: hands a buddy on this node its regions
    (again whenever they change), or sends a buddy on another node each newer snapshot, on its own
    thread."""

    def __init__(self, snapshots: HostSnapshots, key: bytes) -> None:
        self._snapshots = snapshots
        self._key = key
        self._wake = threading.Condition()
        self._target: tuple[str, Any] | None = None  # ("unix", name) or ("tcp", (host, port))
        self._identity = (0, 1)  # (rank, world size) the snapshots are taken as
        self._generation = 0
        self._sent: tuple[int, int] | None = None  # (generation, what was sent: step, or regions' version)
        self._complained = False
        threading.Thread(target=self._run, name="mirror-sender", daemon=True).start()

    def aim(self, target: tuple[str, Any] | None, rank: int, world_size: int) -> None:
        """Mirror to ``target`` from now on (None: nobody), as ``rank`` of ``world_size``."""
        with self._wake:
            self._target, self._identity = target, (rank, world_size)
            self._generation += 1
            self._wake.notify()

    def offer(self) -> None:
        """A new snapshot is whole (or the regions changed): wake the thread if the buddy needs it (a
        buddy on the node usually does not: it maps the memory the snapshot was taken into)."""
        with self._wake:
            if self._due() is not None:
                self._wake.notify()

    def _due(self) -> tuple[int, int] | None:
        """What should be at the buddy now, when it is not there yet."""
        if self._target is None:
            return None
        if self._target[0] == "unix":
            want = (self._generation, self._snapshots.regions_changed)
            return want if self._snapshots.regions() and want != self._sent else None
        newest = self._snapshots.newest()
        want = (self._generation, newest.step) if newest is not None else None
        return want if want is not None and want != self._sent else None

    def _run(self) -> None:
        sock: socket.socket | None = None
        connected_to: tuple[int, Any] | None = None
        while True:
            with self._wake:
                self._wake.wait_for(self._due, timeout=1.0)
                due, target, (rank, world_size) = self._due(), self._target, self._identity
            if due is None or target is None:
                continue
            try:
                if sock is None or connected_to != (due[0], target):
                    if sock is not None:
                        sock.close()
                    sock = None
                    sock = _connect(target)
                    connected_to = (due[0], target)
                if target[0] == "unix":
                    regions = self._snapshots.regions()
                    socket.send_fds(sock, [encode_head(self._key, {"kind": "regions", "rank": rank,
                                                                  "world_size": world_size})],
                                    [r.fd for r in regions])
                    sent: tuple[int, int] | None = due
                else:
                    newest = self._snapshots.newest()
                    step = send_region(sock, self._key, newest.region, rank, world_size) if newest else None
                    sent = (due[0], step) if step is not None else None
                with self._wake:
                    if sent is not None:
                        self._sent = sent
                self._complained = False
            except OSError as exc:
                if sock is not None:
                    sock.close()
                sock = None
                if not self._complained:
                    self._complained = True
                    print(f"orchestrator: mirror: cannot reach the buddy at {target[1]}: {exc}",
                          file=sys.stderr, flush=True)
                with self._wake:
                    self._wake.wait(timeout=1.0)


def _connect(target: tuple[str, Any]) -> socket.socket:
    if target[0] == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT_S)
        sock.connect(target[1])
        return _blocking(sock)
    return _blocking(socket.create_connection(target[1], timeout=CONNECT_TIMEOUT_S))
