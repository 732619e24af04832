"""Memory snapshots: packing a rank's state, mirroring it to a buddy over real sockets, fetching it back
checked end to end, and the choice of the step every rank can go back to. The recoveries themselves
(real kills, bit-exact losses, source memory or disk) are in test_recovery.py."""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import time

import pytest
import torch

from orchestrator.checkpoint.memory import HostSnapshots, unpack
from orchestrator.worker.buddies import Offer, holder_of, plan_restore
from orchestrator.worker.mirror import MirrorError, MirrorSender, MirrorServer, fetch
from tests.helpers import REPO

KEY = secrets.token_bytes(32)


class Scaler:
    """Stands for DeepSpeed's loss scaler: an object among the tensors, with state that changes."""

    def __init__(self, scale: float) -> None:
        self.scale = scale


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "optimizer": {"fp32": [torch.randn(1000, generator=g), torch.randn(3, 5, generator=g)],
                      "exp_avg": torch.randn(37, generator=g).to(torch.bfloat16), "step": torch.tensor(float(seed)),
                      "scaler": Scaler(2.0 ** seed), "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95)}]},
        "counters": {"global_steps": seed},
    }


def _equal(a, b) -> bool:
    if torch.is_tensor(a):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, Scaler):
        return a.scale == b.scale
    return a == b


def _wait_held(server: MirrorServer, rank: int, step: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while step not in server.held(world_size=2).get(rank, ()):
        assert time.monotonic() < deadline, server.held(world_size=2)
        time.sleep(0.01)


def test_snapshots_keep_the_two_newest_whole_and_copy_rather_than_alias() -> None:
    snaps = HostSnapshots()
    for step in (1, 2, 3):
        live = _state(step)
        snaps.take(live, step, user_state={"epoch": step})
        live["optimizer"]["fp32"][0].add_(1.0)  # training goes on: the snapshot must not follow it
        live["optimizer"]["scaler"].scale = -1.0
    assert snaps.steps() == [2, 3]
    assert _equal(snaps.at(3).state(), _state(3)) and snaps.at(3).user_state == {"epoch": 3}
    assert _equal(snaps.at(2).state(), _state(2))
    snaps.forget(newer_than=2)
    assert snaps.steps() == [2]
    assert sorted(r.header().step for r in snaps.regions()) == [-1, 2], "and in the memory a buddy maps"


@pytest.mark.parametrize("way", ["tcp", "unix"])
def test_a_snapshot_is_mirrored_to_the_buddy_and_fetched_back_whole(way: str) -> None:
    """Over TCP (a buddy on another node: a copy) and over the node's Unix socket (the buddy maps the
    rank's own snapshot memory)."""
    own, buddy = HostSnapshots(), MirrorServer(key=KEY, host="127.0.0.1")
    sender = MirrorSender(own, KEY)
    try:
        sender.aim(("tcp", buddy.address) if way == "tcp" else ("unix", buddy.local_name), rank=1, world_size=2)
        for step in (7, 8):
            own.take(_state(step), step, user_state={"step": step})
            sender.offer()
            _wait_held(buddy, 1, step)
        assert buddy.held(world_size=2) == {1: [7, 8]}
        assert buddy.held(world_size=4) == {}, "taken in another world: not offered"
        tree, user_state, payload = fetch(buddy.address, KEY, rank=1, step=7)
        assert _equal(unpack(tree, payload), _state(7)) and user_state == {"step": 7}
        with pytest.raises(MirrorError, match="no longer holds"):
            fetch(buddy.address, KEY, rank=1, step=6)
        # Without the run's key nothing is served (nor unpickled: the head's HMAC fails first).
        with pytest.raises(MirrorError):
            fetch(buddy.address, secrets.token_bytes(32), rank=1, step=7)
        # A copy damaged in memory fails its checksum where it is restored.
        held = next(r for r in buddy._sources[1].regions if r.header().step == 8)
        held.payload(100)[50] ^= 0xFF
        with pytest.raises(MirrorError, match="fails its checksum"):
            fetch(buddy.address, KEY, rank=1, step=8)
    finally:
        buddy.close()


def test_a_snapshot_in_shared_memory_outlives_the_rank_that_took_it(tmp_path) -> None:
    """A buddy on the node maps the rank's snapshot regions: SIGKILL the rank, and its state is
    still whole in the buddy's memory."""
    buddy = MirrorServer(key=KEY, host="127.0.0.1")
    child = subprocess.Popen([sys.executable, "-c", _RANK.format(key=KEY.hex(), name=buddy.local_name.encode())],
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert child.stdout.readline().strip() == "mirrored"
        _wait_held(buddy, 1, 5)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        tree, user_state, payload = fetch(buddy.address, KEY, rank=1, step=5)
        assert _equal(unpack(tree, payload), _state(5)) and user_state == {"step": 5}
        buddy.forget(newer_than=5)  # restored: a dead rank's regions are released
        assert buddy.held(world_size=2) == {}
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        buddy.close()


_RANK = """
import time
from orchestrator.checkpoint.memory import HostSnapshots
from orchestrator.worker.mirror import MirrorSender
from tests.test_memory_snapshots import _state
own = HostSnapshots()
sender = MirrorSender(own, bytes.fromhex("{key}"))
sender.aim(("unix", {name}.decode()), rank=1, world_size=2)
for step in (4, 5):
    own.take(_state(step), step, user_state={{"step": step}})
    sender.offer()
while sender._sent is None or sender._sent[1] != own.regions_changed:
    time.sleep(0.01)
print("mirrored", flush=True)
time.sleep(60)
"""


def test_every_rank_goes_back_to_the_newest_step_all_can_restore() -> None:
    a0, a1, a2, a3 = (("10.0.0.1", 5000), ("10.0.0.1", 5001), ("10.0.0.2", 5000), ("10.0.0.2", 5001))
    nodes = {0: "n1", 1: "n1", 2: "n2", 3: "n2"}
    # Ranks 0, 2, 3 survived; rank 1 was replaced: its state is in its buddy's memory (rank 3, the
    # same place on the next node), one step behind the survivors' newest.
    offers = [
        Offer(rank=0, node="n1", address=a0, local="@0", own=(24, 25), held={2: (24, 25)}),
        Offer(rank=1, node="n1", address=a1, local="@1", own=(), held={}),
        Offer(rank=2, node="n2", address=a2, local="@2", own=(24, 25), held={0: (24, 25)}),
        Offer(rank=3, node="n2", address=a3, local="@3", own=(24, 25), held={1: (23, 24)}),
    ]
    assert holder_of(1, nodes) == 3 and holder_of(3, nodes) == 1 and holder_of(0, nodes) == 2
    plan = plan_restore(offers, disk_step=20)
    assert plan is not None and plan.step == 24
    assert plan.sources == {0: None, 1: a3, 2: None, 3: None}
    # The disk checkpoint is newer: nothing to gain from memory.
    assert plan_restore(offers, disk_step=25) is None
    # Rank 1 and its buddy both lost: rank 1's state is nowhere in memory.
    lost_buddy = [o if o.rank != 3 else Offer(rank=3, node="n2", address=a3, local="@3", own=(), held={})
                  for o in offers]
    assert plan_restore(lost_buddy, disk_step=20) is None
    # A fresh start: nobody holds anything.
    assert plan_restore([Offer(rank=r, node="n1", address=a0, local="@", own=(), held={}) for r in range(2)], 0) is None
    # A rank mirrors to a buddy on its node through shared memory, to one on another node over TCP.
    assert offers[2].mirror_target("n1") == ("tcp", a2) and offers[1].mirror_target("n1") == ("unix", "@1")


def test_buddies_form_a_ring_across_nodes_or_within_the_only_node() -> None:
    assert [holder_of(r, {0: "a", 1: "a", 2: "a"}) for r in range(3)] == [1, 2, 0]
    assert holder_of(0, {0: "a"}) is None
    three_nodes = {0: "a", 1: "a", 2: "b", 3: "b", 4: "c", 5: "c"}
    assert [holder_of(r, three_nodes) for r in range(6)] == [2, 3, 4, 5, 0, 1]
