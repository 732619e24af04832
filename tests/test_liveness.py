"""Stuck detection tells a blocked thread from a busy one (``worker/liveness.py``), on real threads:
a busy loop on one line and a long native call are moving; a thread waiting on a lock or in a
real gloo collective is still."""

from __future__ import annotations

import datetime
import random
import threading
import time
import zlib
from collections.abc import Callable

import pytest

from orchestrator.worker.liveness import ThreadWatch

WATCH_S = 2.0
# A busy thread is never still this long, even on a loaded machine (2 cores, the suite running);
# a blocked one is still for the whole watch.
BUSY_STILL_S = 1.0


def _stillest(target: Callable[[], None], ready: threading.Event | None = None) -> float:
    """The longest ``still_s`` seen while ``target`` runs in a thread of its own for about WATCH_S."""
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    if ready is not None:
        assert ready.wait(60), "the thread never got to the point being watched"
    watch = ThreadWatch(thread.ident)
    stillest, deadline = 0.0, time.monotonic() + WATCH_S
    while time.monotonic() < deadline:
        time.sleep(0.05)
        stillest = max(stillest, watch.sample().still_s)
    return stillest


def test_a_busy_loop_on_one_line_is_moving() -> None:
    import torch

    def loop() -> None:
        t = time.time()
        while time.time() - t < WATCH_S + 0.5: torch.randn(64, 64) @ torch.randn(64, 64); time.sleep(0.05)  # noqa: E701,E702

    assert _stillest(loop) < BUSY_STILL_S


def test_a_long_native_call_that_computes_is_moving() -> None:
    data = random.Random(0).randbytes(96 * 2**20)  # one zlib call of seconds, its stack never changing
    threads_before = set(threading.enumerate())
    assert _stillest(lambda: zlib.compress(data, 9)) < BUSY_STILL_S
    (compressing,) = set(threading.enumerate()) - threads_before
    assert compressing.is_alive(), "the one call must outlast the watch"


def test_a_thread_waiting_on_a_lock_is_still() -> None:
    lock = threading.Lock()
    lock.acquire()
    try:
        assert _stillest(lambda: lock.acquire(timeout=WATCH_S + 1)) > WATCH_S - 0.5 > BUSY_STILL_S
    finally:
        lock.release()


@pytest.mark.timeout(120)
def test_a_thread_blocked_in_a_gloo_collective_is_still() -> None:
    """Two gloo ranks in one process (a thread each); rank 0 all-reduces, rank 1 does not come."""
    import torch
    import torch.distributed as dist

    store = dist.HashStore()
    groups: dict[int, object] = {}
    made, reducing, release = threading.Barrier(2), threading.Event(), threading.Event()
    timeout = datetime.timedelta(seconds=60)

    def rank(r: int) -> None:
        groups[r] = dist.ProcessGroupGloo(store, r, 2, timeout)
        made.wait()
        if r == 1:
            release.wait(60)
        else:
            reducing.set()
        groups[r].allreduce([torch.ones(4)]).wait()

    second = threading.Thread(target=rank, args=(1,), daemon=True)
    second.start()
    try:
        assert _stillest(lambda: rank(0), ready=reducing) > WATCH_S - 0.5 > BUSY_STILL_S
    finally:
        release.set()
        second.join(timeout=60)
