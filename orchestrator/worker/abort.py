"""Releasing a rank from a collective that will never complete.

When a rank dies, only the peers that exchange data with it directly get an
error ("Connection closed by peer"); a peer waiting on one of *those* stays
blocked inside gloo, in C++, where no Python signal reaches it, until the
process group's timeout (30 minutes). gloo's own ``abort()`` does nothing.

So a rank leaving a broken attempt shuts down the TCP connections the attempt
opened (gloo's pairs, the rendezvous store's): the wait it is blocked in, if
any, fails at once, and so does every peer's wait on it, which then does the
same. One failure releases the whole job in a few milliseconds a hop, and a
survivor the controller interrupts is released the same way, from the thread
that reads its control socket.

Over NCCL the wait is on the GPU: a survivor's collective whose peer died spins in a
kernel until NCCL's watchdog times out (minutes). So the attempt's process groups
are aborted first (``ProcessGroup.abort``: ``ncclCommAbort`` for NCCL, inside one
NCCL group call as torch does, so that aborting one communicator cannot wait on
another), from the same thread, as NVIDIA's in-process restart does; the main
thread then fails in its collective, destroys the groups as it unwinds, and joins
the next attempt's with its process and CUDA context intact. For gloo that abort
does nothing, and the shut-down connections release it.

Connections are told apart by when they appeared: those open when the attempt
began (the control socket, anything the process held before) are left alone,
and listening sockets are never touched (gloo aborts the process when its
listener fails). A connection the training code itself opened during the
attempt is shut down too: the attempt is over, and the code that owned it runs
again from the start on rejoin.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import NamedTuple

_FD_DIR = "/proc/self/fd"


def _socket_inodes() -> dict[int, int]:
    """Each open socket's descriptor -> its inode (the N of ``socket:[N]``)."""
    found = {}
    for name in os.listdir(_FD_DIR):
        try:
            target = os.readlink(os.path.join(_FD_DIR, name))
        except OSError:
            continue  # closed meanwhile (listdir's own descriptor, among others)
        if target.startswith("socket:["):
            found[int(name)] = int(target[len("socket:["):-1])
    return found


class Aborted(NamedTuple):
    """What an abort did: process groups aborted, TCP connections shut down."""

    groups: int
    connections: int


def abort_process_groups() -> int:
    """Abort every process group of this process (NCCL: its communicators), leaving torch's registry of
    them to the main thread (it destroys them as it unwinds). Safe from any thread; returns how many."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0
    c10d = dist.distributed_c10d
    names = dict(c10d._world.pg_names)  # a copy: the main thread may be changing it
    nccl = None
    if dist.is_nccl_available():
        import torch

        try:
            backend = c10d._get_default_group()._get_backend(torch.device("cuda"))
        except (RuntimeError, ValueError):
            backend = None  # no CUDA backend, or the default group is gone
        nccl = backend if isinstance(backend, dist.ProcessGroupNCCL) else None
    aborted = 0
    if nccl is not None:
        nccl._group_start()  # pytorch/pytorch#119797: one communicator's abort must not wait on another's
    try:
        for group in sorted(names, key=names.get, reverse=True):
            try:
                group.abort()
            except RuntimeError:
                continue  # destroyed meanwhile
            aborted += 1
    finally:
        if nccl is not None:
            nccl._group_end()
    return aborted


class AttemptConnections:
    """The TCP connections opened since this object was made: one training attempt's."""

    def __init__(self) -> None:
        self._before = frozenset(_socket_inodes().values())

    def abort(self) -> Aborted:
        """Abort the process groups, then shut down (both ways) every connected TCP socket opened since
        the attempt began, so that any wait fails now, here and at the peer. Safe from any thread, and
        more than once."""
        return Aborted(groups=abort_process_groups(), connections=self._shut_down_connections())

    def _shut_down_connections(self) -> int:
        count = 0
        for fd, inode in _socket_inodes().items():
            if inode in self._before:
                continue
            try:
                sock = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue  # closed meanwhile, or not a socket we can look at
            try:
                # The same socket as listed, not one that took the number after it was closed.
                if (os.fstat(sock.fileno()).st_ino == inode
                        and sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
                        and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                    sock.shutdown(socket.SHUT_RDWR)
                    count += 1
            except OSError:
                pass  # not connected (any more): nothing waits on it
            finally:
                sock.close()  # the duplicate only; the owner closes its own descriptor
        return count
