"""The job's rendezvous: torch's TCPStore at ``MASTER_ADDR:MASTER_PORT``, listening on that address only.

torch's own ``env://`` rendezvous makes rank 0's store listen on every interface of its machine, so
a laptop's CPU test run would offer an unauthenticated key-value store to its whole network. Here
rank 0 binds the socket itself, on the address the ranks are told to use (127.0.0.1 with the
embedded Ray), and hands it to the store.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any


def store(rank: int, world_size: int, timeout: timedelta) -> Any:
    """This rank's client of the job's store; rank 0's also serves it, on ``MASTER_ADDR`` only."""
    import torch.distributed as dist

    if rank == 0:
        return serve(world_size, timeout)
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)


def serve(world_size: int, timeout: timedelta) -> Any:
    """Serve the job's store at ``MASTER_ADDR:MASTER_PORT`` (that address only), from this process.

    For a script, rank 0's process serves it before the script starts, and the script's ``env://``
    rendezvous connects to it as a client (``TORCHELASTIC_USE_AGENT_STORE``), as under torchrun."""
    import torch.distributed as dist

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    listener = socket.create_server((host, port), backlog=max(128, world_size))
    # The store owns the descriptor from here on (it closes it when the process group is destroyed).
    return dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, master_listen_fd=listener.detach(),
                         wait_for_workers=False)
