"""Where the job's nodes are: one placement-group bundle per node and per spare node, one node agent
in each, and which bundle holds which node slot.

Ranks are numbered in node order: node slot ``s`` holds ranks ``s*k .. s*k+k-1`` (``k =
workers_per_node``), so tensor-parallel groups (consecutive ranks, a divisor of ``k``) lie inside one
node and data-parallel replicas span nodes. Slot ``s`` lives on bundle ``slot_bundle[s]``; bundles past
``cluster.nodes`` are spare nodes until a lost node's slot moves onto one. A lost node's agent is
made again in its bundle (Ray moves a lost node's bundle to a node that joins), or its slot moves to
a spare node and its bundle retires. What the agents are (their uplink, lease, GPU serving) is the
worker group's: it hands :class:`Placement` the arguments of each new agent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from orchestrator.config.schema import Config
from orchestrator.controller.agent_calls import CALL_TIMEOUT_S
from orchestrator.controller.agent_slots import AgentSlot, Cause, Move, Standing
from orchestrator.errors import ClusterError

PLACEMENT_TIMEOUT_S = 120.0
_RECREATE_PAUSE_S = 0.5
# A call that waits for Ray's GCS (the node table, giving bundles back) waits at most this long: where the
# cluster's head is gone, Ray would retry until it gives up reconnecting, a minute later.
_GCS_TIMEOUT_S = 3.0
# While agents wait to be placed on a node, how often we ask Ray whether that node is still alive.
_NODE_CHECK_S = 0.5


class Placement:
    """The job's bundles and their agents (``slots``, one :class:`AgentSlot` per bundle), on Ray
    (``ray``, connected by :meth:`connect`). ``agent_args(bundle)`` gives a new agent's
    :class:`~orchestrator.agent.node_agent.NodeAgent` arguments."""

    def __init__(self, config: Config, agent_args: Callable[[int], tuple[Any, ...]]) -> None:
        self._config = config
        self._agent_args = agent_args
        self.per_node = config.cluster.workers_per_node
        self._num_bundles = config.cluster.nodes + config.cluster.spare_nodes
        self.slot_bundle = list(range(config.cluster.nodes))  # node slot -> its bundle (= its agent's index)
        self.spare_bundles = list(range(config.cluster.nodes, self._num_bundles))
        self.ray: Any = None
        # The Ray node ids Ray's GCS lists alive (None: it did not answer); set by connect.
        self.alive_node_ids: Callable[[], set[str] | None] = lambda: None
        self.slots: list[AgentSlot] = []  # per bundle; empty until placed
        self._pg: Any = None
        self._started_ray = False

    def connect(self, messages_log: Path) -> None:
        """Connect to Ray (starting an embedded one for the local mode)."""
        from orchestrator.controller import ray_session

        self._started_ray = ray_session.connect(self._config, messages_log=messages_log)
        import ray

        self.ray = ray
        self.alive_node_ids = lambda: ray_session.alive_node_ids(_GCS_TIMEOUT_S)

    def place(self) -> None:
        """Reserve one bundle per node (``workers_per_node`` CPUs, and GPUs, each; STRICT_SPREAD: every
        bundle on its own Ray node, or none at all) and place one agent in each."""
        from ray.util.placement_group import placement_group

        ray, gpu = self.ray, self._config.cluster.device == "gpu"
        bundle = {"CPU": self.per_node, "GPU": self.per_node} if gpu else {"CPU": self.per_node}
        self._pg = placement_group([bundle] * self._num_bundles, strategy="STRICT_SPREAD")
        try:
            ray.get(self._pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(
                f"Ray could not reserve {self._num_bundles} node(s) with {bundle} each (cluster.nodes="
                f"{self._config.cluster.nodes} + cluster.spare_nodes={self._config.cluster.spare_nodes}, each on "
                f"its own Ray node) within {PLACEMENT_TIMEOUT_S:.0f}s; check `ray status` for nodes and free "
                "resources, or lower cluster.nodes/cluster.workers_per_node/cluster.spare_nodes"
            ) from None
        handles = [self._new_agent(index) for index in range(self._num_bundles)]
        nodes = ray.get([handle.node_info.remote() for handle in handles], timeout=PLACEMENT_TIMEOUT_S)
        self.slots = [AgentSlot(handle=handle, node=node) for handle, node in zip(handles, nodes)]

    def home(self, rank: int) -> int:
        """The agent that hosts ``rank``: its node slot's."""
        return self.slot_bundle[rank // self.per_node]

    def slot_ranks(self, slot: int) -> range:
        return range(slot * self.per_node, (slot + 1) * self.per_node)

    def slot_of(self) -> dict[int, int]:
        """Agent -> the node slot it holds (spare nodes hold none)."""
        return {bundle: slot for slot, bundle in enumerate(self.slot_bundle)}

    def head_ip(self) -> str:
        """The address of rank 0's node: the rendezvous host."""
        return self.slots[self.home(0)].node["ip"]

    def live_agents(self) -> list[int]:
        """Agents of the job's nodes and of its spare nodes that are not known dead."""
        slots = self.slots
        if not slots:  # before the agents are placed
            return []
        return [i for i in sorted((*self.slot_bundle, *self.spare_bundles)) if not slots[i].gone]

    def by_agent(self, ranks: Collection[int]) -> dict[int, list[int]]:
        """Live agent -> which of ``ranks`` it hosts."""
        hosted: dict[int, list[int]] = {}
        for rank in sorted(ranks):
            index = self.home(rank)
            if not self.slots[index].gone:
                hosted.setdefault(index, []).append(rank)
        return hosted

    def alive_nodes(self) -> set[str]:
        """The Ray node ids Ray lists alive; none where Ray's GCS does not answer in time (the
        cluster's head is gone: a scheduler stopped it)."""
        return self.alive_node_ids() or set()

    def retire_spare(self, bundle: int) -> bool:
        """Give up spare node ``bundle`` (found lost); False if it is not a spare node."""
        if bundle not in self.spare_bundles:
            return False
        self.spare_bundles.remove(bundle)
        self._lose_bundle(bundle)
        return True

    def replace_lost(self, allow_missing: bool) -> list[int]:
        """Give every dead agent a successor: a lost node's slot moves to a spare node; an agent that
        died on a live node is made again in its bundle (Ray moves a lost node's bundle to a node that
        joins, so without a spare a lost node's agent is made again too, within node_wait_s).
        Returns the node slots nothing took (only with ``allow_missing``; otherwise a ClusterError)."""
        if not any(agent.gone for agent in self.slots):
            return []
        ft = self._config.fault_tolerance
        missing = []
        for slot, bundle in enumerate(self.slot_bundle):
            agent = self.slots[bundle]
            if not agent.gone:
                continue
            node_id = agent.node["node_id"]
            node_lost = agent.cause is Cause.UNREACHABLE or node_id not in self.alive_nodes()
            wait_s, tried = ft.node_wait_s, False
            if not node_lost:
                # The agent died on a node that answered and that Ray still lists: made again in its
                # bundle. Unless the node is dying: a node killed at once loses its agent seconds before
                # Ray reports the node dead, and its bundle cannot be placed meanwhile; with a spare,
                # that report moves the slot there.
                wait_s, tried = max(wait_s, PLACEMENT_TIMEOUT_S), True
                if self._recreate(bundle, wait_s, watch=node_id if self.spare_bundles else None):
                    continue
                node_lost = node_id not in self.alive_nodes()
            if node_lost and self.spare_bundles:
                self.slot_bundle[slot] = self.spare_bundles.pop(0)
                self._lose_bundle(bundle)
                continue
            if tried or not self._recreate(bundle, wait_s):
                if not allow_missing:
                    raise ClusterError(
                        f"node {agent.node['ip']} was lost and no node took its place within "
                        f"{max(wait_s, 1.0):.0f}s (fault_tolerance.node_wait_s={ft.node_wait_s:g}); hold a spare "
                        "with cluster.spare_nodes, raise fault_tolerance.node_wait_s, or set "
                        "fault_tolerance.allow_shrink=true to go on with the nodes left"
                    )
                self._lose_bundle(bundle)
                missing.append(slot)
        return missing

    def shrink(self, config: Config, slots: Collection[int]) -> None:
        """Drop node slots ``slots`` (lost, not replaced): the job goes on as ``config``."""
        for slot in sorted(slots, reverse=True):
            self._lose_bundle(self.slot_bundle.pop(slot))
        self._config = config

    def release(self) -> None:
        """Kill every agent, give the bundles back, and disconnect from Ray if we started it."""
        try:
            for agent in self.slots:
                self.ray.kill(agent.handle)
            if self._pg is not None:
                # It waits for the GCS: where the cluster itself is gone (a scheduler's SIGTERM reached
                # its head) it would hang until Ray gives up reconnecting, and the bundles went with it.
                _bounded(lambda pg=self._pg: self.ray.util.remove_placement_group(pg), _GCS_TIMEOUT_S)
        finally:
            self.slots, self._pg = [], None
            if self._started_ray:
                from orchestrator.controller import ray_session

                ray_session.disconnect()
                self._started_ray = False

    def _new_agent(self, index: int) -> Any:
        """The agent for bundle ``index``: it holds the whole bundle (the node's CPUs, and GPUs)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from orchestrator.agent.node_agent import NodeAgent

        gpu = self._config.cluster.device == "gpu"
        return (
            self.ray.remote(NodeAgent)
            .options(
                num_cpus=self.per_node,
                num_gpus=self.per_node if gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=index
                ),
            )
            .remote(*self._agent_args(index))
        )

    def _lose_bundle(self, bundle: int) -> None:
        """Never use ``bundle`` again (its node is gone); its agent is released."""
        agent = self.slots[bundle]
        if agent.standing is Standing.RETIRED:
            return
        agent.advance(Move.RETIRED)
        self.ray.kill(agent.handle, no_restart=True)

    def _recreate(self, bundle: int, wait_s: float, watch: str | None = None) -> bool:
        """A new agent for ``bundle``; False if none was placed within ``wait_s``, or as soon as Ray
        reports node ``watch`` dead.

        Until Ray has moved the bundle off a dead node, agents made for it die at once: made again."""
        deadline = time.monotonic() + max(wait_s, 1.0)
        agent = self.slots[bundle]
        while True:
            self.ray.kill(agent.handle, no_restart=True)
            agent.remade(self._new_agent(bundle))
            try:
                infos = self._answers_when_placed([agent.handle.node_info.remote()], deadline, watch)
            except self.ray.exceptions.RayActorError:
                if time.monotonic() + _RECREATE_PAUSE_S >= deadline:
                    return False
                time.sleep(_RECREATE_PAUSE_S)
                continue
            if infos is None:
                return False
            break
        agent.node, agent.answered_at = infos[0], time.monotonic()
        agent.advance(Move.REMADE)
        return True

    def _answers_when_placed(self, refs: list[Any], deadline: float, watch: str | None) -> list[Any] | None:
        """The answers of newly made agents once all have answered; None at ``deadline``, or once Ray
        reports node ``watch`` dead."""
        while (left := deadline - time.monotonic()) > 0:
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=min(left, _NODE_CHECK_S))
            if len(ready) == len(refs):
                return self.ray.get(refs, timeout=CALL_TIMEOUT_S)
            if watch is not None and watch not in self.alive_nodes():
                return None
        return None


def _bounded(call: Callable[[], Any], timeout_s: float) -> Any:
    """``call()``'s result, or None when it has not returned within ``timeout_s`` (it goes on, on a
    daemon thread, and its result is dropped)."""
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(call()), daemon=True)
    worker.start()
    worker.join(timeout=timeout_s)
    return result[0] if result else None
