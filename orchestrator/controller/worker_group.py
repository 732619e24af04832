"""The seam between the controller and the processes it runs.

:class:`WorkerGroup` is what the controller needs: start ranks (all of them,
or replacements beside survivors that rejoin in place), poll them,
kill some, stop all. :class:`RayWorkerGroup` does it with a
placement group of one bundle per node (``workers_per_node`` CPUs, and GPUs,
each; STRICT_SPREAD puts every bundle on a different Ray node) and one
:class:`~orchestrator.agent.node_agent.NodeAgent` per bundle, which hosts the
node's ranks and its warm spare; controller tests use a fake with the same methods.
The agents push their nodes' status to the controller's :class:`~orchestrator.controller.inbox.Inbox`
(not Ray calls: those cost the caller too much CPU at thousands of nodes); every call to an
agent goes out to all the nodes concerned at once, and a call that fails or times out costs
that node (its ranks are reported lost by the next poll), never the run.

Ranks are numbered in node order: node slot ``s`` holds ranks ``s*k .. s*k+k-1``
(``k = workers_per_node``), so tensor-parallel groups (consecutive ranks, a
divisor of ``k``) lie inside one node and data-parallel replicas span nodes.
"""

from __future__ import annotations

import dataclasses
import itertools
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orchestrator.config.schema import RESERVED_ENV, Config
from orchestrator.controller.agent_calls import CALL_TIMEOUT_S, Unanswered, gather
from orchestrator.controller.agent_slots import AgentSlot, Cause, Move, Standing
from orchestrator.controller.inbox import Inbox
from orchestrator.errors import ClusterError
from orchestrator.messages import NodeBeat, NodeLeft, NodeSaved, NodeStatus, RankStatus, Rejoin, Report, Start
from orchestrator.monitor.gpu_endpoint import is_loopback
from orchestrator.worker.env import RUN_DIR_ENV, RankPlacement, rank_env, torchrun_env

_PLACEMENT_TIMEOUT_S = 120.0
# How long after a lost node's lease ran out its ranks are surely dead: the agent's fence fires on time
# (node_agent.py), then SIGKILLs them, on a node that may be loaded.
_FENCE_MARGIN_S = 1.0
_STOP_TIMEOUT_S = 5.0
_RECREATE_PAUSE_S = 0.5
# While agents wait to be placed on a node, how often we ask Ray whether that node is still alive.
_NODE_CHECK_S = 0.5
# Agents push their status at least this often per node_timeout_s: one missed push is no loss.
_HEARTBEATS_PER_TIMEOUT = 4
# An agent's lease, as a fraction of node_timeout_s: three heartbeats, so that an agent whose pushes
# run a second or two late (seen on a loaded node during a recovery) keeps it; and short enough, with
# _FENCE_MARGIN_S, that a silent node's ranks are replaced when it is found lost, not later (for
# node_timeout_s of 4 s and more).
_LEASE_FRACTION = 0.75
_SKEW_TOLERANCE_S = 0.25


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerInfo:
    """A started rank: who and where, and whether it is a promoted warm spare (``spare``) or was forked
    from its node's zygote (``forked``), rather than a fresh process."""

    rank: int
    pid: int
    node: str
    attempt: int
    node_ip: str = ""
    node_id: str = ""
    spare: bool = False
    forked: bool = False


@dataclass(kw_only=True, slots=True)
class RankUpdate:
    """What one poll learned about one rank.

    ``returncode`` is None while the process runs (negative: killed by that
    signal); ``exited_at`` is when its actor saw it end; ``lost`` means its
    actor (and so, likely, its node) is gone. ``alive_at`` is the last sign
    of life (any report, or the liveness beat every second), ``where`` the
    main thread's innermost frame then, ``in_collective`` whether it was
    waiting in a collective, ``moved_at`` when its call stack last changed.
    The latest steps of ranks but 0 come in their node's :class:`NodeBeat`.
    """

    rank: int
    pid: int | None = None
    reports: list[Report] = field(default_factory=list)
    returncode: int | None = None
    exited_at: float | None = None
    log_tail: str = ""
    lost: str | None = None
    alive_at: float | None = None
    where: str = ""
    in_collective: bool = False
    moved_at: float | None = None

    @classmethod
    def of(cls, rank: int, status: RankStatus) -> RankUpdate:
        """The update an actor's status of ``rank`` makes."""
        return cls(rank=rank, pid=status.pid, reports=status.reports, returncode=status.returncode,
                   exited_at=status.exited_at, log_tail=status.log_tail, alive_at=status.alive_at,
                   where=status.where, in_collective=status.in_collective, moved_at=status.moved_at)


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeLayout:
    """Which node (by address) holds which ranks, and the spare nodes still available."""

    ranks: dict[str, list[int]]
    spares: list[str]


class WorkerGroup(Protocol):
    """All ranks of the job, as the controller drives them."""

    world_size: int
    # Each node's status arrives at least this often: a live rank's liveness, as the controller
    # sees it, is up to this old (plus delivery).
    heartbeat_s: float

    def start(
        self, attempt: int, resume_tag: str | None, faults: list[dict[str, Any]], rejoin: Collection[int] = (),
        interrupt: Collection[int] = (),
    ) -> list[WorkerInfo]:
        """Start ``attempt``: ranks in ``rejoin`` continue in their live processes, every other
        rank gets a new one (the node's warm spare when there is one). Returns the new ones.

        Ranks in ``interrupt`` (rejoining ones still in their training function) are interrupted by
        their node's agent, rejoin once they have left it, and are killed there if they do not leave
        in time (a failure of this attempt). Their reports of leaving the last attempt come after."""

    def poll(self) -> list[NodeBeat | NodeSaved | NodeLeft | RankUpdate]:
        """What this poll learned: each node's beats (every rank's liveness and latest step, as columns:
        a controller reads thousands a second), checkpoint saves (one per node and checkpoint) and
        errors that are consequences (one per node and kind), then an update for each rank with other
        news (its reports, its exit, its node lost). Only of the ranks' processes in this attempt (a
        save: of its ranks in this attempt's node slot)."""

    def wait(self, timeout_s: float, soonest_s: float) -> None:
        """Until an agent tells of a failure (an exit, an error), answers a request or closes its
        connection, but not before ``soonest_s``; or until ``timeout_s``."""

    def poll_mark(self, ranks: Collection[int] | None = None) -> int:
        """Ask the agents of ``ranks`` (every node's agent by default) for their status now; the
        request is the mark for :meth:`unheard`."""

    def unheard(self, mark: int, ranks: Collection[int]) -> list[int]:
        """Those of ``ranks`` whose node's agent has not answered request ``mark`` (and is not known
        lost): while there are any, their node may be dying and the failure at hand is not fully known."""

    def replace_lost(self, allow_missing: bool) -> list[int]:
        """Find a place for every lost node: a spare node, else one that joins within
        ``fault_tolerance.node_wait_s``. Returns the node slots nothing took (only with ``allow_missing``;
        otherwise that is a :class:`ClusterError`)."""

    def shrink(self, config: Config, slots: Collection[int]) -> None:
        """Drop node slots ``slots`` (lost, not replaced) and stop every rank: the job goes on as ``config``
        (fewer nodes), renumbered in node order, from a full restart."""

    def kill(self, ranks: Collection[int]) -> None:
        """SIGKILL these ranks' processes."""

    def gpu_endpoints(self) -> list[str]:
        """Where each live node's agent serves its GPU metrics (``host:port``), for Prometheus: those
        this machine reaches (with a loopback ``metrics.host``, only its own node's)."""

    def gpu_models(self) -> list[str]:
        """The models of the GPUs the ranks use (NVML's names; none on CPU nodes)."""

    def ensure_spares(self) -> None:
        """Start a warm spare on every node that has none."""

    def warm_spares(self) -> dict[str, int]:
        """Ray node id -> pid of its warm spare, for nodes that have one (as of the last status)."""

    def node_networks(self) -> dict[str, dict[str, Any]]:
        """Ray node id -> what was detected there for the current rendezvous address (``network_configured``)."""

    def layout(self) -> NodeLayout:
        """Where the ranks run and which spare nodes are left (empty before the first start)."""

    def lost_spares(self) -> list[tuple[str, str]]:
        """Spare nodes lost since the last call (found silent or dead while waiting): (address, why)."""

    def stop(self) -> None:
        """Stop and reap every training process; the group can be started again."""

    def close(self) -> None:
        """Stop, then release actors, reserved resources and the Ray connection."""


class RayWorkerGroup:
    """Ranks hosted by one node agent per node, in one placement group. Connects to Ray on the first ``start``.

    Agents are numbered by their placement-group bundle, each known by its :class:`AgentSlot`
    (``_slots[bundle]``): node slot ``s`` (ranks ``s*k .. s*k+k-1``) lives on bundle
    ``_slot_bundle[s]``; bundles past ``cluster.nodes`` are spare nodes until a lost node's slot
    moves onto one.
    """

    def __init__(self, config: Config, run_dir: Path, *, run_id: str | None = None, workdir: Path | None = None) -> None:
        """``run_id`` names the run to scripts (``TORCHELASTIC_RUN_ID``; default: the run directory's
        name); ``workdir`` is where training processes run (default: the current directory)."""
        self._run_id = run_id or run_dir.name
        self._workdir = str(workdir or Path.cwd())
        self.world_size = config.cluster.world_size
        self._per_node = config.cluster.workers_per_node
        # Node slot -> its placement-group bundle (= its agent's index).
        self._slot_bundle = list(range(config.cluster.nodes))
        self._num_bundles = config.cluster.nodes + config.cluster.spare_nodes
        self._networks: dict[tuple[str, str], dict[str, Any]] = {}  # (node id, head address) -> detection
        self._config = config
        self._config_dict = config.model_dump(mode="json")
        self._run_dir = run_dir
        self._ray: Any = None
        self._started_ray = False
        self._pg: Any = None
        self._slots: list[AgentSlot] = []  # per bundle
        self._spare_bundles = list(range(config.cluster.nodes, self._num_bundles))
        self._warm: dict[str, int] = {}  # node id -> its warm spare's pid
        ft = config.fault_tolerance
        self._node_timeout_s = ft.node_timeout_s
        # Ranks stop themselves after this long without a call from us (NodeAgent's lease)...
        self._lease_s = ft.node_timeout_s * _LEASE_FRACTION
        # ...so a rank of a lost node is replaced only once its lease has certainly run out.
        self._fenced_at = 0.0
        self.heartbeat_s = ft.node_timeout_s / _HEARTBEATS_PER_TIMEOUT
        self._inbox: Inbox | None = None
        self._token = secrets.token_hex(16)  # agents present it to the inbox
        self._incarnations = itertools.count(1)  # a new agent's pushes are told from its predecessor's
        # Rank -> the pid of its process in the current attempt: a status of any other process (one
        # stopped for this attempt, its status made before the attempt began) is not this rank's.
        self._pids: dict[int, int] = {}
        self._unanswered = Unanswered()  # calls to agents whose answers nobody waits for
        self._skews: dict[str, float] = {}  # node id -> how far its clock is behind ours (seconds)
        self._spares_lost: list[tuple[str, str]] = []  # (address, why) not yet taken by lost_spares()

    def start(
        self, attempt: int, resume_tag: str | None, faults: list[dict[str, Any]], rejoin: Collection[int] = (),
        interrupt: Collection[int] = (),
    ) -> list[WorkerInfo]:
        self._ensure_agents()
        self.replace_lost(allow_missing=False)
        rejoin, interrupt = set(rejoin), set(interrupt)  # asked of every rank: at 16,384 ranks, lists cost seconds
        placements = self._placements()
        specs = {p.rank: self._spec(p, attempt, resume_tag, faults) for p in placements}
        starts = {bundle: [specs[r] for r in self._slot_ranks(slot) if r not in rejoin]
                  for slot, bundle in enumerate(self._slot_bundle)}
        self._prepare_zygotes([bundle for bundle, new in starts.items() if new])
        calls = {}
        for slot, bundle in enumerate(self._slot_bundle):
            ranks = self._slot_ranks(slot)
            rejoins = [Rejoin(**vars(specs[r])) for r in ranks if r in rejoin]
            stop = [r for r in ranks if r in interrupt]
            calls[bundle] = self._slots[bundle].handle.start_attempt.remote(starts[bundle], rejoins, stop)
        started = []
        for bundle, result in gather(self._ray, self._slots, calls, "start").items():
            node = self._slots[bundle].node
            started += [WorkerInfo(rank=s.rank, pid=s.pid, node=node["hostname"], attempt=attempt, node_ip=node["ip"],
                                   node_id=node["node_id"], spare=s.spare, forked=s.forked) for s in result]
        self._pids = {r: p for r, p in self._pids.items() if r in rejoin} | {info.rank: info.pid for info in started}
        for slot, bundle in enumerate(self._slot_bundle):
            ranks = self._slot_ranks(slot)
            self._slots[bundle].beat_columns = (list(ranks), [self._pids.get(r) for r in ranks])
        return sorted(started, key=lambda info: info.rank)

    def poll(self) -> list[NodeBeat | NodeSaved | NodeLeft | RankUpdate]:
        """The beats, saves and updates of the ranks whose node's agent pushed its status since the last poll
        (or was lost). An agent that has sent nothing for ``fault_tolerance.node_timeout_s`` (or that Ray
        reports dead) takes its whole node with it. Never waits."""
        agents = self._live_agents()
        received = self._inbox.take()
        now = time.monotonic()
        of_nodes: list[NodeBeat | NodeSaved | NodeLeft] = []
        by_rank: dict[int, RankUpdate] = {}
        # Every look visits every live agent (2,048 at 16,384 ranks), most of which sent nothing: the
        # loop for those is kept to a comparison; the few that pushed are read after it.
        quiet_since, pushed, statuses = now - self._node_timeout_s, [], received.statuses
        for index in agents:
            agent = self._slots[index]
            if index in statuses:
                pushed.append(index)
            elif agent.answered_at is None:
                agent.answered_at = now
            elif agent.answered_at < quiet_since:
                agent.failed(f"its node agent sent nothing for {now - agent.answered_at:.1f}s "
                             f"(fault_tolerance.node_timeout_s={self._node_timeout_s:g})", Cause.UNREACHABLE)
        slots = self._slot_of()
        for index in pushed:
            agent = self._slots[index]
            agent.answered_at = received.arrived[index]
            mine = self._slot_ranks(slots[index]) if index in slots else range(0)
            for status in statuses[index]:
                self._take(agent, status, mine, by_rank, of_nodes)
        # An agent whose connection closed may have died: Ray's answer to a call says so (a live one connects again).
        calls = {i: self._slots[i].handle.node_info.remote() for i in received.closed if i in agents}
        self._unanswered.add(self._slots, calls, "a call after its connection closed")
        self._unanswered.check(self._ray, self._slots)
        failing = Standing.FAILING
        lost = {index: agent.why for index, agent in enumerate(self._slots) if agent.standing is failing}
        for index, why in self._lose(lost).items():
            if index in slots:
                for rank in self._slot_ranks(slots[index]):
                    by_rank[rank] = RankUpdate(rank=rank, lost=why)
        return [*of_nodes, *by_rank.values()]

    def _take(self, agent: AgentSlot, status: NodeStatus, mine: range, by_rank: dict[int, RankUpdate],
              of_nodes: list[NodeBeat | NodeSaved | NodeLeft]) -> None:
        """Record one status of ``agent`` (node slot ranks ``mine``): its ranks' news merged into
        ``by_rank``, its beat and consequences' errors (of this attempt's processes only) and saves
        added to ``of_nodes``."""
        agent.heard = max(agent.heard, status.asked)
        skew = self._skew(agent.node["node_id"], time.time() - status.now)
        def ours(rank: int, pid: int) -> bool:
            return rank in mine and pid == self._pids.get(rank)

        for rank, rank_status in status.ranks.items():
            if not ours(rank, rank_status.pid):
                continue
            update = RankUpdate.of(rank, rank_status.moved(skew) if skew else rank_status)
            earlier = by_rank.get(rank)
            if earlier is not None:
                update.reports = earlier.reports + update.reports
            by_rank[rank] = update
        beat = status.beat
        if beat is not None:
            # Nearly always every rank of the node runs this attempt's process: one comparison of lists.
            expected = agent.beat_columns
            if expected is None or beat.ranks != expected[0] or beat.pid != expected[1]:
                entries = [i for i, rank in enumerate(beat.ranks) if ours(rank, beat.pid[i])]
                beat = beat.only(entries) if entries else None
            if beat is not None:
                of_nodes.append(beat.moved(skew) if skew else beat)
        for saved in status.saved:
            if ranks := [rank for rank in saved.ranks if rank in mine]:
                of_nodes.append(dataclasses.replace(saved, ranks=ranks, at=saved.at + skew))
        for left in status.left:
            entries = [i for i, rank in enumerate(left.ranks) if ours(rank, left.pid[i])]
            if entries:
                left = left if len(entries) == len(left.ranks) else left.only(entries)
                of_nodes.append(left.moved(skew) if skew else left)
        node_id = agent.node["node_id"]
        if status.warm_spare is None:
            self._warm.pop(node_id, None)
        else:
            self._warm[node_id] = status.warm_spare

    def _skew(self, node: str, sample: float) -> float:
        """How far the clock of agent ``index``'s node is behind ours. Each answer gives our receipt
        time minus the node's send time: the skew plus the answer's latency, which varies by hundreds
        of milliseconds under load. The smallest sample is the best estimate; below a quarter second
        it is taken as no skew at all, so that ranks on one machine are compared on one clock (their
        order decides the root cause, milliseconds apart)."""
        best = self._skews[node] = min(self._skews.get(node, sample), sample)
        return best if abs(best) > _SKEW_TOLERANCE_S else 0.0

    def wait(self, timeout_s: float, soonest_s: float) -> None:
        if self._inbox is None:  # before the agents are placed
            time.sleep(timeout_s)
        else:
            self._inbox.wait(timeout_s, soonest_s)

    def poll_mark(self, ranks: Collection[int] | None = None) -> int:
        return self._inbox.ask(self._live_agents() if ranks is None else sorted(self._by_agent(ranks)))

    def unheard(self, mark: int, ranks: Collection[int]) -> list[int]:
        return sorted(rank for rank in ranks
                      if not (agent := self._slots[self._home(rank)]).gone and agent.heard < mark)

    def _lose(self, lost: dict[int, str]) -> dict[int, str]:
        """Record lost agents. Returns them, with why."""
        if not lost:
            return {}
        alive_nodes = self._alive_nodes()
        result = {}
        for index, why in lost.items():
            agent = self._slots[index]
            node = agent.node
            node_gone = agent.cause is Cause.UNREACHABLE or node["node_id"] not in alive_nodes
            result[index] = f"node {node['ip']} lost: {why}" if node_gone else why
            agent.advance(Move.GIVEN_UP)
            # Its ranks may still run (a partition, a hung agent): not replaced before their lease ran
            # out. Unless its process is gone on a live node: its ranks died with it (PDEATHSIG).
            if agent.cause is not Cause.DIED or node["node_id"] not in alive_nodes:
                self._fenced_at = max(self._fenced_at, (agent.answered_at or 0.0) + self._lease_s + _FENCE_MARGIN_S)
            if index in self._spare_bundles:
                self._spare_bundles.remove(index)
                self._lose_bundle(index)
                self._spares_lost.append((node["ip"], why))
        return result

    def layout(self) -> NodeLayout:
        if not self._slots:
            return NodeLayout(ranks={}, spares=[])
        ranks = {self._slots[bundle].node["ip"]: list(self._slot_ranks(slot))
                 for slot, bundle in enumerate(self._slot_bundle)}
        return NodeLayout(ranks=ranks, spares=[self._slots[b].node["ip"] for b in self._spare_bundles])

    def lost_spares(self) -> list[tuple[str, str]]:
        lost, self._spares_lost = self._spares_lost, []
        return lost

    def warm_spares(self) -> dict[str, int]:
        return dict(self._warm)

    def node_networks(self) -> dict[str, dict[str, Any]]:
        head = self._head_ip()
        return {node_id: found for (node_id, addr), found in self._networks.items() if addr == head}

    def gpu_endpoints(self) -> list[str]:
        # A loopback endpoint (metrics.host 127.0.0.1) is reachable on its own machine only: another
        # node's, listed here, would be read as whatever listens on that port on this one.
        here = self._inbox.address[0]
        nodes = [self._slots[index].node for index in self._live_agents()]
        return [endpoint for node in nodes if (endpoint := node.get("gpu_endpoint"))
                and (node["ip"] == here or not is_loopback(endpoint.rpartition(":")[0]))]

    def gpu_models(self) -> list[str]:
        return [model for bundle in self._slot_bundle for model in self._slots[bundle].node.get("gpu_models", [])]

    def kill(self, ranks: Collection[int]) -> None:
        # A lost node's ranks are not asked: gone, or fenced (their lease stops them).
        calls = {index: self._slots[index].handle.kill.remote(on) for index, on in self._by_agent(ranks).items()}
        self._unanswered.add(self._slots, calls, "kill")

    def ensure_spares(self) -> None:
        calls = {index: self._slots[index].handle.start_spare.remote(self._config_dict, self._node_env(index))
                 for index in self._live_agents()}
        self._unanswered.add(self._slots, calls, "start_spare")

    def _prepare_zygotes(self, bundles: list[int]) -> None:
        """Have the agents of ``bundles`` start their node's zygote (once per agent) before their ranks:
        the ranks are forked from it, the imports paid once per node. Not on GPU nodes, whose zygote
        cannot fork yet (docs/fault-tolerance.md): waiting for it would only delay fresh processes."""
        if self._config.cluster.device != "cpu":
            return
        todo = [b for b in bundles if not self._slots[b].zygote_asked and not self._slots[b].gone]
        calls = {b: self._slots[b].handle.prepare.remote(self._config_dict, self._node_env(b)) for b in todo}
        self._unanswered.add(self._slots, calls, "prepare")
        for b in todo:
            self._slots[b].zygote_asked = True

    def _node_env(self, index: int) -> dict[str, str]:
        """Agent ``index``'s node's shared settings (threads, devices, network, cluster.env), for its zygote
        and spare; a rank's own come with its start."""
        placement = self._placement(index, local_rank=0, master_port=0)
        return {k: v for k, v in rank_env(self._config, placement).items() if k not in RESERVED_ENV}

    def stop(self) -> None:
        refs = [agent.handle.stop.remote(_STOP_TIMEOUT_S) for agent in self._slots if not agent.gone]
        for ref in refs:
            try:
                self._ray.get(ref, timeout=3 * _STOP_TIMEOUT_S)
            except (self._ray.exceptions.RayActorError, self._ray.exceptions.GetTimeoutError):
                pass  # a dead agent's processes died with it (PDEATHSIG)

    def close(self) -> None:
        try:
            self.stop()
            for agent in self._slots:
                self._ray.kill(agent.handle)
            if self._pg is not None:
                self._ray.util.remove_placement_group(self._pg)
        finally:
            self._slots, self._pg = [], None
            if self._inbox is not None:
                self._inbox.close()
                self._inbox = None
            if self._started_ray:
                from orchestrator.controller import ray_session

                ray_session.disconnect()
                self._started_ray = False

    def _spec(self, p: RankPlacement, attempt: int, resume_tag: str | None, faults: list[dict[str, Any]]) -> Start:
        return Start(
            rank=p.rank,
            local_rank=p.local_rank,
            world_size=self.world_size,
            node=self._slots[self._home(p.rank)].node["hostname"],
            attempt=attempt,
            config=self._config_dict,
            run_dir=str(self._run_dir),
            resume_tag=resume_tag,
            faults=faults,
            env={**rank_env(self._config, p), **torchrun_env(self._config, p.rank, attempt, self._run_id),
                 RUN_DIR_ENV: str(self._run_dir)},
            workdir=self._workdir,
        )

    def _live_agents(self) -> list[int]:
        """Agents of the job's nodes and of its spare nodes that are not known dead."""
        slots = self._slots
        if not slots:  # before the agents are placed
            return []
        return [i for i in sorted((*self._slot_bundle, *self._spare_bundles)) if not slots[i].gone]

    def _slot_of(self) -> dict[int, int]:
        """Agent -> the node slot it holds (spare nodes hold none)."""
        return {bundle: slot for slot, bundle in enumerate(self._slot_bundle)}

    def _slot_ranks(self, slot: int) -> range:
        return range(slot * self._per_node, (slot + 1) * self._per_node)

    def _by_agent(self, ranks: Collection[int]) -> dict[int, list[int]]:
        """Live agent -> which of ``ranks`` it hosts."""
        hosted: dict[int, list[int]] = {}
        for rank in sorted(ranks):
            index = self._home(rank)
            if not self._slots[index].gone:
                hosted.setdefault(index, []).append(rank)
        return hosted

    def _ensure_agents(self) -> None:
        """Connect to Ray, reserve one bundle per node, place one agent in each (once)."""
        if self._slots:
            return
        from orchestrator.controller import ray_session

        self._started_ray = ray_session.connect(self._config, messages_log=self._run_dir / "logs" / "ray.log")
        import ray
        from ray.util.placement_group import placement_group

        self._ray = ray
        # Where the agents reach us: this process's address as Ray knows it (127.0.0.1 on the local mode).
        self._inbox = Inbox(ray.util.get_node_ip_address(), self._token)
        gpu = self._config.cluster.device == "gpu"
        bundle = {"CPU": self._per_node, "GPU": self._per_node} if gpu else {"CPU": self._per_node}
        # STRICT_SPREAD: every bundle on its own Ray node, or none at all.
        self._pg = placement_group([bundle] * self._num_bundles, strategy="STRICT_SPREAD")
        try:
            ray.get(self._pg.ready(), timeout=_PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(
                f"Ray could not reserve {self._num_bundles} node(s) with {bundle} each (cluster.nodes="
                f"{self._config.cluster.nodes} + cluster.spare_nodes={self._config.cluster.spare_nodes}, each on "
                f"its own Ray node) within {_PLACEMENT_TIMEOUT_S:.0f}s; check `ray status` for nodes and free "
                "resources, or lower cluster.nodes/cluster.workers_per_node/cluster.spare_nodes"
            ) from None
        handles = [self._new_agent(index) for index in range(self._num_bundles)]
        nodes = ray.get([handle.node_info.remote() for handle in handles], timeout=_PLACEMENT_TIMEOUT_S)
        self._slots = [AgentSlot(handle=handle, node=node) for handle, node in zip(handles, nodes)]

    def _home(self, rank: int) -> int:
        """The agent that hosts ``rank``: its node slot's."""
        return self._slot_bundle[rank // self._per_node]

    def _head_ip(self) -> str:
        return self._slots[self._home(0)].node["ip"]

    def _detect_networks(self) -> None:
        """Detect each node's network for the current head address, once per node and address."""
        head = self._head_ip()
        todo = {}
        for index in self._live_agents():
            key = (self._slots[index].node["node_id"], head)
            if key not in self._networks and key not in todo.values():
                todo[index] = key
        calls = {index: self._slots[index].handle.network.remote(self._config_dict, head) for index in todo}
        found = gather(self._ray, self._slots, calls, "network")
        for index, detection in found.items():
            self._networks[todo[index]] = detection

    def _new_agent(self, index: int) -> Any:
        """The agent for bundle ``index``: it holds the whole bundle (the node's CPUs, and GPUs)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from orchestrator.agent.node_agent import GpuServing, NodeAgent, UplinkSettings

        gpu = self._config.cluster.device == "gpu"
        incarnation = next(self._incarnations)
        self._inbox.expect(index, incarnation)
        host, port = self._inbox.address
        uplink = UplinkSettings(host=host, port=port, token=self._token, incarnation=incarnation,
                                heartbeat_s=self.heartbeat_s)
        metrics = self._config.metrics
        gpus = GpuServing(host=metrics.host, port=metrics.gpu_port,
                          simulated=self._per_node if metrics.simulated_gpus else 0) if metrics.enabled else None
        return (
            self._ray.remote(NodeAgent)
            .options(
                num_cpus=self._per_node,
                num_gpus=self._per_node if gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=index
                ),
            )
            .remote(index, str(self._run_dir / "logs"), self._lease_s, uplink, gpus)
        )

    def replace_lost(self, allow_missing: bool) -> list[int]:
        """Give every dead agent a successor: a lost node's slot moves to a spare node; an agent that
        died on a live node is made again in its bundle (Ray moves a lost node's bundle to a node that
        joins, so without a spare a lost node's agent is made again too, within node_wait_s)."""
        if not any(agent.gone for agent in self._slots):
            return []
        ft = self._config.fault_tolerance
        missing = []
        for slot, bundle in enumerate(self._slot_bundle):
            agent = self._slots[bundle]
            if not agent.gone:
                continue
            node_id = agent.node["node_id"]
            node_lost = agent.cause is Cause.UNREACHABLE or node_id not in self._alive_nodes()
            wait_s, tried = ft.node_wait_s, False
            if not node_lost:
                # The agent died on a node that answered and that Ray still lists: made again in its
                # bundle. Unless the node is dying: a node killed at once loses its agent seconds before
                # Ray reports the node dead, and its bundle cannot be placed meanwhile; with a spare,
                # that report moves the slot there.
                wait_s, tried = max(wait_s, _PLACEMENT_TIMEOUT_S), True
                if self._recreate(bundle, wait_s, watch=node_id if self._spare_bundles else None):
                    continue
                node_lost = node_id not in self._alive_nodes()
            if node_lost and self._spare_bundles:
                self._slot_bundle[slot] = self._spare_bundles.pop(0)
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
        # A partitioned node's ranks may still run until their lease ends: never two copies of a rank.
        delay = self._fenced_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return missing

    def shrink(self, config: Config, slots: Collection[int]) -> None:
        # The agents that stay stop the ranks renumbered away when the next attempt starts.
        for slot in sorted(slots, reverse=True):
            self._lose_bundle(self._slot_bundle.pop(slot))
        self._config, self._config_dict = config, config.model_dump(mode="json")
        self.world_size = config.cluster.world_size

    def _answers_when_placed(self, refs: list[Any], deadline: float, watch: str | None) -> list[Any] | None:
        """The answers of newly made agents once all have answered; None at ``deadline``, or once Ray
        reports node ``watch`` dead."""
        while (left := deadline - time.monotonic()) > 0:
            ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=min(left, _NODE_CHECK_S))
            if len(ready) == len(refs):
                return self._ray.get(refs, timeout=CALL_TIMEOUT_S)
            if watch is not None and watch not in self._alive_nodes():
                return None
        return None

    def _alive_nodes(self) -> set[str]:
        return {n["NodeID"] for n in self._ray.nodes() if n.get("Alive")}

    def _lose_bundle(self, bundle: int) -> None:
        """Never use ``bundle`` again (its node is gone); its agent is released."""
        agent = self._slots[bundle]
        if agent.standing is Standing.RETIRED:
            return
        agent.advance(Move.RETIRED)
        self._ray.kill(agent.handle, no_restart=True)

    def _recreate(self, bundle: int, wait_s: float, watch: str | None = None) -> bool:
        """A new agent for ``bundle``; False if none was placed within ``wait_s``, or as soon as Ray
        reports node ``watch`` dead.

        Until Ray has moved the bundle off a dead node, agents made for it die at once: made again."""
        deadline = time.monotonic() + max(wait_s, 1.0)
        agent = self._slots[bundle]
        while True:
            self._ray.kill(agent.handle, no_restart=True)
            agent.remade(self._new_agent(bundle))
            try:
                infos = self._answers_when_placed([agent.handle.node_info.remote()], deadline, watch)
            except self._ray.exceptions.RayActorError:
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

    def _placements(self) -> list[RankPlacement]:
        """Every rank's local rank, devices, network and rendezvous address for a new attempt."""
        self._detect_networks()
        # A fresh port every attempt: a reused store would hand out a dead rank's address. If rank 0's
        # agent cannot answer, the next poll reports its node lost and this attempt fails with it.
        host = self._home(0)
        call = {host: self._slots[host].handle.free_port.remote(self._head_ip())}
        port = gather(self._ray, self._slots, call, "free_port").get(host, 0)
        return [self._placement(self._home(rank), rank=rank, local_rank=rank % self._per_node, master_port=port)
                for rank in range(self.world_size)]

    def _placement(self, index: int, *, local_rank: int, master_port: int, rank: int = 0) -> RankPlacement:
        """A process on agent ``index``'s node: the node's GPUs (ordered by local rank), CPUs and network."""
        info = self._slots[index].node
        return RankPlacement(
            rank=rank,
            local_rank=local_rank,
            local_world_size=self._per_node,
            master_addr=self._head_ip(),
            master_port=master_port,
            node_cpus=info["cpus"],
            cuda_visible_devices=",".join(info["gpu_ids"]) if info["gpu_ids"] else None,
            network_env=self._networks.get((info["node_id"], self._head_ip()), {}).get("env", {}),
        )

