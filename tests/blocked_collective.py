"""Two gloo ranks for tests/test_abort.py: ``python blocked_collective.py RANK PORT GO_FILE``.

Both join a group and all-reduce once. Then rank 1 stays in the group but waits for GO_FILE without
entering the second all-reduce, so rank 0's second all-reduce blocks on it, inside gloo. Another
thread of rank 0 aborts the attempt (its process group, then its connections): the all-reduce must fail at once, while rank 1
is still alive, and a TCP connection rank 0 opened before the attempt must still work.
"""

import datetime
import os
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist

from orchestrator.worker.abort import AttemptConnections

rank, port, go = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if rank == 0:
    # Opened before the attempt: must survive the abort.
    server = socket.create_server(("127.0.0.1", 0))
    kept = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
attempt = AttemptConnections()
store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=datetime.timedelta(seconds=60))
dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
dist.all_reduce(torch.ones(4))
if rank == 1:
    deadline = time.monotonic() + 120
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.05)
    os._exit(0)

entered = threading.Event()
aborted: list = []


def abort_when_entered() -> None:
    entered.wait(60)
    aborted.append(attempt.abort())


aborter = threading.Thread(target=abort_when_entered, daemon=True)
aborter.start()
started = time.monotonic()
try:
    entered.set()
    dist.all_reduce(torch.ones(1 << 16))
    print("the all-reduce returned", flush=True)
except RuntimeError as exc:
    print(f"released after {time.monotonic() - started:.2f}s: {str(exc).splitlines()[0]}", flush=True)
aborter.join(60)  # printed from this thread only: two threads' lines can interleave
if aborted:
    print(f"aborted {aborted[0].groups} group(s), {aborted[0].connections} connection(s)", flush=True)
kept.sendall(b"x")
print(f"kept connection works: {accepted.recv(1) == b'x'}", flush=True)
dist.destroy_process_group()
os._exit(0)
