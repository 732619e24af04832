"""Memory snapshots across a failure: who mirrors whom, and which step the ranks go back to.

Every ``checkpoint.memory_interval_steps`` steps each rank copies its state into
host memory (``checkpoint/memory.py``) and its :class:`~orchestrator.worker.mirror.MirrorSender`
puts it in its buddy's: the rank with the same place on the next node (a ring
across nodes: over TCP), or the next rank of the node when there is one node
(shared memory). So a lost node's ranks all have their state on the node after it.

When an attempt starts, every rank offers what it holds (its own two newest
snapshots, if it survived, and the mirrors it keeps for its buddy's rank), and
:func:`plan_restore` picks, identically on every rank, the newest step that every
rank can restore: a survivor from its own copy, a replacement from its buddy.
Where there is none (a rank and its buddy both lost, or nothing newer than the
disk checkpoint), the ranks load the disk checkpoint as before.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from orchestrator.checkpoint import memory
from orchestrator.worker.mirror import MirrorError, MirrorSender, MirrorServer, fetch


@dataclass(frozen=True)
class Offer:
    """What one rank brings to an attempt: where it runs, where its server listens, what it holds."""

    rank: int
    node: str
    address: tuple[str, int]  # its mirror server's TCP address (fetches, buddies on other nodes)
    local: str  # its mirror server's Unix socket (buddies on its node hand over their regions)
    own: tuple[int, ...]
    held: dict[int, tuple[int, ...]]

    def mirror_target(self, node: str) -> tuple[str, object]:
        """How a rank on ``node`` mirrors to this one: shared memory on the same node, else TCP."""
        return ("unix", self.local) if node == self.node else ("tcp", self.address)


@dataclass(frozen=True)
class Plan:
    """Go back to ``step``: each rank from its own copy (``None``) or from the server at ``sources[rank]``."""

    step: int
    sources: dict[int, tuple[str, int] | None]


def holder_of(rank: int, nodes: dict[int, str]) -> int | None:
    """The rank that keeps ``rank``'s mirror, given each rank's node; None for a world of one."""
    by_node: dict[str, list[int]] = defaultdict(list)
    for r in sorted(nodes):
        by_node[nodes[r]].append(r)
    order = sorted(by_node, key=lambda n: by_node[n][0])
    home = by_node[nodes[rank]]
    if len(order) > 1:
        following = by_node[order[(order.index(nodes[rank]) + 1) % len(order)]]
        return following[home.index(rank) % len(following)]
    if len(home) == 1:
        return None
    return home[(home.index(rank) + 1) % len(home)]


def plan_restore(offers: list[Offer], disk_step: int) -> Plan | None:
    """The newest step every rank can restore from memory (own copy or a holder's), when it is at
    least ``disk_step``; None otherwise (load from disk)."""
    sources_by_step: dict[int, dict[int, tuple[str, int] | None]] = defaultdict(dict)
    for offer in offers:
        for step in offer.own:
            sources_by_step[step][offer.rank] = None
    for holder in offers:
        for rank, steps in holder.held.items():
            for step in steps:
                sources_by_step[step].setdefault(rank, holder.address)
    ranks = {offer.rank for offer in offers}
    whole = [step for step, sources in sources_by_step.items() if ranks <= sources.keys() and step >= disk_step]
    if not whole:
        return None
    step = max(whole)
    return Plan(step=step, sources={r: sources_by_step[step][r] for r in sorted(ranks)})


@dataclass
class MemoryKeeper:
    """A training process's snapshots, its mirror server and sender; lives as long as the process
    (a survivor restores from what it kept in an earlier attempt)."""

    key: bytes
    host: str
    pinned: bool = False
    snapshots: memory.HostSnapshots = field(init=False)
    server: MirrorServer = field(init=False)
    sender: MirrorSender = field(init=False)
    _identity: tuple[int, int] = (-1, -1)  # (rank, world size) the snapshots were taken as
    _unsupported: str | None = None

    def __post_init__(self) -> None:
        self.snapshots = memory.HostSnapshots(pinned=self.pinned)
        self.server = MirrorServer(key=self.key, host=self.host)
        self.sender = MirrorSender(self.snapshots, self.key)

    def snapshot(self, engine: Any, step: int, user_state: Any) -> None:
        """Copy ``engine``'s state after ``step`` to host memory; the sender mirrors it."""
        if self._unsupported is not None:
            return
        try:
            state = memory.capture(engine)
        except memory.Unsupported as exc:
            self._unsupported = str(exc)
            print(f"orchestrator: no memory snapshots for this engine: {exc}; recoveries load the disk checkpoint",
                  file=sys.stderr, flush=True)
            return
        self.snapshots.take(state, step, user_state)
        self.sender.offer()

    def offer(self, rank: int, world_size: int) -> Offer:
        """What this process can restore from, as ``rank`` of ``world_size`` (its node: its address)."""
        own = tuple(self.snapshots.steps()) if self._identity == (rank, world_size) else ()
        held = {r: tuple(steps) for r, steps in self.server.held(world_size).items() if steps}
        return Offer(rank=rank, node=self.host, address=self.server.address, local=self.server.local_name, own=own,
                     held=held)

    def restore_own_or_fetch(self, plan: Plan, rank: int) -> tuple[Any, Any, Any] | None:
        """This rank's state at ``plan.step`` as ``(state tree, user state, keep-alive)``; None (and
        why, on stderr) when the buddy's copy cannot be had whole."""
        source = plan.sources[rank]
        if source is None:
            snap = self.snapshots.at(plan.step)
            return (snap.state(), snap.user_state, snap) if snap is not None else None
        try:
            tree, user_state, payload = fetch(source, self.key, rank, plan.step)
        except MirrorError as exc:
            print(f"orchestrator: memory restore: {exc}; the ranks load the disk checkpoint", file=sys.stderr,
                  flush=True)
            return None
        return memory.unpack(tree, payload), user_state, payload

    def settle(self, rank: int, world_size: int, step: int, holder: tuple[str, object] | None) -> None:
        """After a restore to ``step`` (from memory or disk): forget every snapshot of a later step (a
        future this run no longer has), and mirror to ``holder`` from now on."""
        self.snapshots.forget(newer_than=step if self._identity == (rank, world_size) else None)
        self.server.forget(newer_than=step)
        self._identity = (rank, world_size)
        self.sender.aim(holder, rank, world_size)
