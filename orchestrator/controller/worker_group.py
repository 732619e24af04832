"""The seam between the controller and the processes it runs.

:class:`WorkerGroup` is what the controller needs: start ranks (all of them,
or replacements beside survivors that rejoin in place), poll them,
kill some, stop all. :class:`RayWorkerGroup` does it with one
:class:`~orchestrator.agent.node_agent.NodeAgent` per node, which hosts the
node's ranks and its warm spare, placed by :class:`~orchestrator.controller.placement.Placement`
(one placement-group bundle per node, node slot ``s`` holding ranks ``s*k .. s*k+k-1``);
controller tests use a fake with the same methods.
The agents push their nodes' status to the controller's :class:`~orchestrator.controller.inbox.Inbox`
(not Ray calls: those cost the caller too much CPU at thousands of nodes); every call to an
agent goes out to all the nodes concerned at once, and a call that fails or times out costs
that node (its ranks are reported lost by the next poll), never the run. An agent that pushes
nothing for ``node_timeout_s`` loses its node; its ranks are replaced once its lease has run out.
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
from orchestrator.controller.agent_calls import Unanswered, gather
from orchestrator.controller.agent_slots import AgentSlot, Cause, Move, Standing
from orchestrator.controller.inbox import Inbox
from orchestrator.controller.placement import Placement
from orchestrator.controller.zygote_ahead import ZygoteAhead
from orchestrator.messages import (
    Cadence,
    NodeBeat,
    NodeLeft,
    NodeSaved,
    NodeStatus,
    RankStatus,
    Rejoin,
    Report,
    Start,
)
from orchestrator.monitor.gpu_endpoint import is_loopback
from orchestrator.worker.env import RUN_DIR_ENV, RankPlacement, local_cpu_count, rank_env, torchrun_env

# How long after a lost node's lease ran out its ranks are surely dead: the agent's fence fires on time
# (node_agent.py), then SIGKILLs them, on a node that may be loaded.
_FENCE_MARGIN_S = 1.0
_STOP_TIMEOUT_S = 5.0
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
    oom: str = ""  # killed by the kernel's OOM killer: its node's memory then

    @classmethod
    def of(cls, rank: int, status: RankStatus) -> RankUpdate:
        """The update an actor's status of ``rank`` makes."""
        return cls(rank=rank, pid=status.pid, reports=status.reports, returncode=status.returncode,
                   exited_at=status.exited_at, log_tail=status.log_tail, alive_at=status.alive_at,
                   where=status.where, in_collective=status.in_collective, moved_at=status.moved_at,
                   oom=status.oom)


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

    def set_checkpoint_interval(self, steps: int) -> None:
        """``checkpoint.interval_steps: auto``: rank 0 decides checkpoints every ``steps`` steps from now
        on (told now, and in the start of every later attempt)."""

    def set_memory_interval(self, steps: int) -> None:
        """``checkpoint.memory_interval_steps: auto``: every rank snapshots every ``steps`` steps from
        now on (told now, and in the start of every later attempt)."""

    def request_save(self, step: int) -> None:
        """Every rank saves a checkpoint at ``step`` as well (a preemption)."""

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
    """Ranks hosted by one node agent per node, in one placement group (:class:`Placement`: which
    bundle holds which node slot, each bundle's :class:`AgentSlot`). Connects to Ray on the first
    ``start``. Keeps the agents' leases, the ranks' processes and what the agents' pushes told."""

    def __init__(self, config: Config, run_dir: Path, *, run_id: str | None = None,
                 workdir: Path | None = None) -> None:
        """``run_id`` names the run to scripts (``TORCHELASTIC_RUN_ID``; default: the run directory's
        name); ``workdir`` is where training processes run (default: the current directory)."""
        self._run_id = run_id or run_dir.name
        self._workdir = str(workdir or Path.cwd())
        self._checkpoint_interval: int | None = None  # checkpoint.interval_steps: auto
        self._memory_interval: int | None = None  # checkpoint.memory_interval_steps: auto
        self._mirror_key = secrets.token_hex(32)  # the ranks' memory-snapshot side channel (worker/mirror.py)
        self.world_size = config.cluster.world_size
        self._per_node = config.cluster.workers_per_node
        self._placement = Placement(config, self._agent_args)
        self._networks: dict[tuple[str, str], dict[str, Any]] = {}  # (node id, head address) -> detection
        self._config = config
        self._config_dict = config.model_dump(mode="json")
        self._run_dir = run_dir
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
        self._zygote_ahead: ZygoteAhead | None = None  # with an embedded Ray: this node's, started before it

    def start(
        self, attempt: int, resume_tag: str | None, faults: list[dict[str, Any]], rejoin: Collection[int] = (),
        interrupt: Collection[int] = (),
    ) -> list[WorkerInfo]:
        self._ensure_agents()
        self.replace_lost(allow_missing=False)
        where = self._placement
        rejoin, interrupt = set(rejoin), set(interrupt)  # asked of every rank: at 16,384 ranks, lists cost seconds
        placements = self._placements()
        specs = {p.rank: self._spec(p, attempt, resume_tag, faults) for p in placements}
        starts = {bundle: [specs[r] for r in where.slot_ranks(slot) if r not in rejoin]
                  for slot, bundle in enumerate(where.slot_bundle)}
        self._prepare_zygotes([bundle for bundle, new in starts.items() if new])
        calls = {}
        for slot, bundle in enumerate(where.slot_bundle):
            ranks = where.slot_ranks(slot)
            rejoins = [Rejoin(**vars(specs[r])) for r in ranks if r in rejoin]
            stop = [r for r in ranks if r in interrupt]
            calls[bundle] = where.slots[bundle].handle.start_attempt.remote(starts[bundle], rejoins, stop)
        started = []
        for bundle, result in gather(where.ray, where.slots, calls, "start").items():
            node = where.slots[bundle].node
            started += [WorkerInfo(rank=s.rank, pid=s.pid, node=node["hostname"], attempt=attempt, node_ip=node["ip"],
                                   node_id=node["node_id"], spare=s.spare, forked=s.forked) for s in result]
        self._pids = {r: p for r, p in self._pids.items() if r in rejoin} | {info.rank: info.pid for info in started}
        for slot, bundle in enumerate(where.slot_bundle):
            ranks = where.slot_ranks(slot)
            where.slots[bundle].beat_columns = (list(ranks), [self._pids.get(r) for r in ranks])
        return sorted(started, key=lambda info: info.rank)

    def poll(self) -> list[NodeBeat | NodeSaved | NodeLeft | RankUpdate]:
        """The beats, saves and updates of the ranks whose node's agent pushed its status since the last poll
        (or was lost). An agent that has sent nothing for ``fault_tolerance.node_timeout_s`` (or that Ray
        reports dead) takes its whole node with it. Never waits."""
        where = self._placement
        slots, agents = where.slots, where.live_agents()
        received = self._inbox.take()
        now = time.monotonic()
        of_nodes: list[NodeBeat | NodeSaved | NodeLeft] = []
        by_rank: dict[int, RankUpdate] = {}
        # Every look visits every live agent (2,048 at 16,384 ranks), most of which sent nothing: the
        # loop for those is kept to a comparison; the few that pushed are read after it.
        quiet_since, pushed, statuses = now - self._node_timeout_s, [], received.statuses
        for index in agents:
            agent = slots[index]
            if index in statuses:
                pushed.append(index)
            elif agent.answered_at is None:
                agent.answered_at = now
            elif agent.answered_at < quiet_since:
                agent.failed(f"its node agent sent nothing for {now - agent.answered_at:.1f}s "
                             f"(fault_tolerance.node_timeout_s={self._node_timeout_s:g})", Cause.UNREACHABLE)
        slot_of = where.slot_of()
        for index in pushed:
            agent = slots[index]
            agent.answered_at = received.arrived[index]
            mine = where.slot_ranks(slot_of[index]) if index in slot_of else range(0)
            for status in statuses[index]:
                self._take(agent, status, mine, by_rank, of_nodes)
        # An agent whose connection closed may have died: Ray's answer to a call says so (a live one connects again).
        calls = {i: slots[i].handle.node_info.remote() for i in received.closed if i in agents}
        self._unanswered.add(slots, calls, "a call after its connection closed")
        self._unanswered.check(where.ray, slots)
        failing = Standing.FAILING
        lost = {index: agent.why for index, agent in enumerate(slots) if agent.standing is failing}
        for index, why in self._lose(lost).items():
            if index in slot_of:
                for rank in where.slot_ranks(slot_of[index]):
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
        where = self._placement
        return self._inbox.ask(where.live_agents() if ranks is None else sorted(where.by_agent(ranks)))

    def unheard(self, mark: int, ranks: Collection[int]) -> list[int]:
        where = self._placement
        return sorted(rank for rank in ranks
                      if not (agent := where.slots[where.home(rank)]).gone and agent.heard < mark)

    def _lose(self, lost: dict[int, str]) -> dict[int, str]:
        """Record lost agents. Returns them, with why."""
        if not lost:
            return {}
        alive_nodes = self._placement.alive_nodes()
        result = {}
        for index, why in lost.items():
            agent = self._placement.slots[index]
            node = agent.node
            node_gone = agent.cause is Cause.UNREACHABLE or node["node_id"] not in alive_nodes
            result[index] = f"node {node['ip']} lost: {why}" if node_gone else why
            agent.advance(Move.GIVEN_UP)
            # Its ranks may still run (a partition, a hung agent): not replaced before their lease ran
            # out. Unless its process is gone on a live node: its ranks died with it (PDEATHSIG).
            if agent.cause is not Cause.DIED or node["node_id"] not in alive_nodes:
                self._fenced_at = max(self._fenced_at, (agent.answered_at or 0.0) + self._lease_s + _FENCE_MARGIN_S)
            if self._placement.retire_spare(index):
                self._spares_lost.append((node["ip"], why))
        return result

    def replace_lost(self, allow_missing: bool) -> list[int]:
        missing = self._placement.replace_lost(allow_missing)
        # A partitioned node's ranks may still run until their lease ends: never two copies of a rank.
        delay = self._fenced_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return missing

    def shrink(self, config: Config, slots: Collection[int]) -> None:
        # The agents that stay stop the ranks renumbered away when the next attempt starts.
        self._placement.shrink(config, slots)
        self._config, self._config_dict = config, config.model_dump(mode="json")
        self.world_size = config.cluster.world_size

    def layout(self) -> NodeLayout:
        where = self._placement
        if not where.slots:
            return NodeLayout(ranks={}, spares=[])
        ranks = {where.slots[bundle].node["ip"]: list(where.slot_ranks(slot))
                 for slot, bundle in enumerate(where.slot_bundle)}
        return NodeLayout(ranks=ranks, spares=[where.slots[b].node["ip"] for b in where.spare_bundles])

    def lost_spares(self) -> list[tuple[str, str]]:
        lost, self._spares_lost = self._spares_lost, []
        return lost

    def warm_spares(self) -> dict[str, int]:
        return dict(self._warm)

    def node_networks(self) -> dict[str, dict[str, Any]]:
        head = self._placement.head_ip()
        return {node_id: found for (node_id, addr), found in self._networks.items() if addr == head}

    def gpu_endpoints(self) -> list[str]:
        # A loopback endpoint (metrics.host 127.0.0.1) is reachable on its own machine only: another
        # node's, listed here, would be read as whatever listens on that port on this one.
        here = self._inbox.address[0]
        nodes = [self._placement.slots[index].node for index in self._placement.live_agents()]
        return [endpoint for node in nodes if (endpoint := node.get("gpu_endpoint"))
                and (node["ip"] == here or not is_loopback(endpoint.rpartition(":")[0]))]

    def gpu_models(self) -> list[str]:
        where = self._placement
        return [model for bundle in where.slot_bundle for model in where.slots[bundle].node.get("gpu_models", [])]

    def kill(self, ranks: Collection[int]) -> None:
        # A lost node's ranks are not asked: gone, or fenced (their lease stops them).
        slots = self._placement.slots
        calls = {index: slots[index].handle.kill.remote(on) for index, on in self._placement.by_agent(ranks).items()}
        self._unanswered.add(slots, calls, "kill")

    def ensure_spares(self) -> None:
        slots = self._placement.slots
        calls = {index: slots[index].handle.start_spare.remote(self._config_dict, self._node_env(index))
                 for index in self._placement.live_agents()}
        self._unanswered.add(slots, calls, "start_spare")

    def set_checkpoint_interval(self, steps: int) -> None:
        self._checkpoint_interval = steps
        where = self._placement
        if not where.slots:
            return  # before the first start: its specs carry it
        home = where.home(0)
        if not where.slots[home].gone:
            call = where.slots[home].handle.send.remote(0, Cadence(interval_steps=steps))
            self._unanswered.add(where.slots, {home: call}, "send")

    def set_memory_interval(self, steps: int) -> None:
        self._memory_interval = steps
        self._tell_ranks(Cadence(memory_interval_steps=steps))  # before the first start: its specs carry it

    def request_save(self, step: int) -> None:
        self._tell_ranks(Cadence(save_at_step=step))

    def _tell_ranks(self, word: Cadence) -> None:
        slots = self._placement.slots
        calls = {b: slot.handle.tell_ranks.remote(word) for b, slot in enumerate(slots) if not slot.gone}
        self._unanswered.add(slots, calls, "tell_ranks")

    def _prepare_zygotes(self, bundles: list[int]) -> None:
        """Have the agents of ``bundles`` start their node's zygote (once per agent) before their ranks:
        the ranks are forked from it, the imports paid once per node."""
        slots = self._placement.slots
        todo = [b for b in bundles if not slots[b].zygote_asked and not slots[b].gone]
        calls = {}
        for b in todo:
            env = self._node_env(b)
            ahead = self._zygote_ahead.offer(env) if self._zygote_ahead is not None else None
            calls[b] = slots[b].handle.prepare.remote(self._config_dict, env, ahead)
            slots[b].zygote_asked = True
        self._unanswered.add(slots, calls, "prepare")

    def _node_env(self, index: int) -> dict[str, str]:
        """Agent ``index``'s node's shared settings (threads, devices, network, cluster.env), for its zygote
        and spare; a rank's own come with its start."""
        return _node_env(self._config, self._placement_of(index, local_rank=0, master_port=0))

    def _start_zygote_ahead(self) -> None:
        """With an embedded Ray, start this node's zygote before Ray, with the settings its agent will
        have (``cluster.device: gpu``: the GPUs Ray will give it, guessed), so that the imports run
        while Ray starts (``controller/zygote_ahead.py``)."""
        from orchestrator.worker.network import configure

        cluster = self._config.cluster
        if cluster.ray_address is not None:
            return
        head = "127.0.0.1"
        placement = RankPlacement(
            rank=0, local_rank=0, local_world_size=self._per_node, master_addr=head, master_port=0,
            node_cpus=local_cpu_count(),
            cuda_visible_devices=",".join(map(str, range(self._per_node))) if cluster.device == "gpu" else None,
            network_env=configure(self._config, head).env,
        )
        self._zygote_ahead = ZygoteAhead(self._config_dict, _node_env(self._config, placement),
                                         self._run_dir / "logs" / "zygote-0.log")

    def stop(self) -> None:
        ray = self._placement.ray
        refs = [agent.handle.stop.remote(_STOP_TIMEOUT_S) for agent in self._placement.slots if not agent.gone]
        for ref in refs:
            try:
                ray.get(ref, timeout=3 * _STOP_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass  # a dead agent's processes died with it (PDEATHSIG)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            try:
                self._placement.release()
            finally:
                if self._inbox is not None:
                    self._inbox.close()
                    self._inbox = None
                if self._zygote_ahead is not None:
                    self._zygote_ahead.close()

    def _spec(self, p: RankPlacement, attempt: int, resume_tag: str | None, faults: list[dict[str, Any]]) -> Start:
        return Start(
            rank=p.rank,
            local_rank=p.local_rank,
            world_size=self.world_size,
            node=self._placement.slots[self._placement.home(p.rank)].node["hostname"],
            attempt=attempt,
            config=self._config_dict,
            run_dir=str(self._run_dir),
            resume_tag=resume_tag,
            faults=faults,
            env={**rank_env(self._config, p), **torchrun_env(self._config, p.rank, attempt, self._run_id),
                 RUN_DIR_ENV: str(self._run_dir)},
            workdir=self._workdir,
            checkpoint_interval=self._checkpoint_interval,
            memory_interval=self._memory_interval,
            mirror_key=self._mirror_key,
        )

    def _ensure_agents(self) -> None:
        """Connect to Ray, open the inbox, place one agent per bundle (once)."""
        where = self._placement
        if where.slots:
            return
        self._start_zygote_ahead()
        where.connect(messages_log=self._run_dir / "logs" / "ray.log")
        # Where the agents reach us: this process's address as Ray knows it (127.0.0.1 on the local mode).
        self._inbox = Inbox(where.ray.util.get_node_ip_address(), self._token)
        where.place()

    def _agent_args(self, index: int) -> tuple[Any, ...]:
        """A new agent's arguments (:class:`~orchestrator.agent.node_agent.NodeAgent`) for bundle ``index``:
        where it pushes, as which incarnation (its predecessor's pushes are refused), its lease, its GPUs."""
        from orchestrator.agent.node_agent import GpuServing, UplinkSettings

        incarnation = next(self._incarnations)
        self._inbox.expect(index, incarnation)
        host, port = self._inbox.address
        uplink = UplinkSettings(host=host, port=port, token=self._token, incarnation=incarnation,
                                heartbeat_s=self.heartbeat_s)
        metrics = self._config.metrics
        gpus = GpuServing(host=metrics.host, port=metrics.gpu_port,
                          simulated=self._per_node if metrics.simulated_gpus else 0) if metrics.enabled else None
        return index, str(self._run_dir / "logs"), self._lease_s, uplink, gpus

    def _detect_networks(self) -> None:
        """Detect each node's network for the current head address, once per node and address."""
        where = self._placement
        head = where.head_ip()
        todo = {}
        for index in where.live_agents():
            key = (where.slots[index].node["node_id"], head)
            if key not in self._networks and key not in todo.values():
                todo[index] = key
        calls = {index: where.slots[index].handle.network.remote(self._config_dict, head) for index in todo}
        found = gather(where.ray, where.slots, calls, "network")
        for index, detection in found.items():
            self._networks[todo[index]] = detection

    def _placements(self) -> list[RankPlacement]:
        """Every rank's local rank, devices, network and rendezvous address for a new attempt."""
        self._detect_networks()
        # A fresh port every attempt: a reused store would hand out a dead rank's address. If rank 0's
        # agent cannot answer, the next poll reports its node lost and this attempt fails with it.
        where = self._placement
        host = where.home(0)
        call = {host: where.slots[host].handle.free_port.remote(where.head_ip())}
        port = gather(where.ray, where.slots, call, "free_port").get(host, 0)
        return [self._placement_of(where.home(rank), rank=rank, local_rank=rank % self._per_node, master_port=port)
                for rank in range(self.world_size)]

    def _placement_of(self, index: int, *, local_rank: int, master_port: int, rank: int = 0) -> RankPlacement:
        """A process on agent ``index``'s node: the node's GPUs (ordered by local rank), CPUs and network."""
        info = self._placement.slots[index].node
        head = self._placement.head_ip()
        return RankPlacement(
            rank=rank,
            local_rank=local_rank,
            local_world_size=self._per_node,
            master_addr=head,
            master_port=master_port,
            node_cpus=info["cpus"],
            cuda_visible_devices=",".join(info["gpu_ids"]) if info["gpu_ids"] else None,
            network_env=self._networks.get((info["node_id"], head), {}).get("env", {}),
        )


def _node_env(config: Config, placement: RankPlacement) -> dict[str, str]:
    """The settings every process of ``placement``'s node shares (a rank's own removed)."""
    return {k: v for k, v in rank_env(config, placement).items() if k not in RESERVED_ENV}
