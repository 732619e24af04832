"""The seam between the controller and the processes it runs.

:class:`WorkerGroup` is what the controller needs: start ranks (all of them,
or replacements beside survivors that rejoin in place), poll them,
interrupt or kill some, stop all. :class:`RayWorkerGroup` does it with a
placement group of one bundle per node (``workers_per_node`` CPUs, and GPUs,
each; STRICT_SPREAD puts every bundle on a different Ray node), one
:class:`~orchestrator.worker.actor.RankActor` per rank slot of a bundle and
one warm spare per node; controller tests use a fake with the same methods.

Ranks are numbered in node order: node slot ``s`` holds ranks ``s*k .. s*k+k-1``
(``k = workers_per_node``), so tensor-parallel groups (consecutive ranks, a
divisor of ``k``) lie inside one node and data-parallel replicas span nodes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from orchestrator.config.schema import RESERVED_ENV, Config
from orchestrator.errors import ClusterError
from orchestrator.monitor.gpu import GpuReading
from orchestrator.worker.env import RUN_DIR_ENV, RankPlacement, rank_env, torchrun_env
from orchestrator.worker.messages import Interrupt, RankStatus, Rejoin, Report, Start

_PLACEMENT_TIMEOUT_S = 120.0
# A poll waits at most this long for slow actors; their answers are picked up by a later poll.
_POLL_WAIT_S = 0.5
_FENCE_MARGIN_S = 0.5
_CALL_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 5.0
_RECREATE_PAUSE_S = 0.5
# While actors wait to be placed on a node, how often we ask Ray whether that node is still alive.
_NODE_CHECK_S = 0.5
_RENEWALS_PER_LEASE = 8
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


class WorkerGroup(Protocol):
    """All ranks of the job, as the controller drives them."""

    world_size: int

    def start(
        self, attempt: int, resume_tag: str | None, faults: list[dict[str, Any]], rejoin: Collection[int] = ()
    ) -> list[WorkerInfo]:
        """Start ``attempt``: ranks in ``rejoin`` continue in their live processes, every other
        rank gets a new one (the node's warm spare when there is one). Returns the new ones."""

    def poll(self) -> list[RankUpdate]:
        """One update per rank."""

    def poll_mark(self) -> int:
        """A mark for :meth:`unheard`: the polls issued so far."""

    def unheard(self, mark: int) -> list[int]:
        """Ranks whose host has not answered a poll issued after ``mark`` (and is not known lost):
        while there are any, a node may be dying and the failure at hand is not fully known."""

    def replace_lost(self, allow_missing: bool) -> list[int]:
        """Find a place for every lost node: a spare node, else one that joins within
        ``fault_tolerance.node_wait_s``. Returns the node slots nothing took (only with ``allow_missing``;
        otherwise that is a :class:`ClusterError`)."""

    def shrink(self, config: Config, slots: Collection[int]) -> None:
        """Drop node slots ``slots`` (lost, not replaced) and stop every rank: the job goes on as ``config``
        (fewer nodes), renumbered in node order, from a full restart."""

    def interrupt(self, ranks: Collection[int]) -> None:
        """Make these ranks leave their training function and wait for a rejoin."""

    def kill(self, ranks: Collection[int]) -> None:
        """SIGKILL these ranks' processes."""

    def gpu_metrics(self) -> list[GpuReading]:
        """Read every rank's GPUs (on its actor, off the training loop)."""

    def ensure_spares(self) -> None:
        """Start a warm spare on every node that has none."""

    def warm_spares(self) -> dict[str, int]:
        """Node host name -> pid of its warm spare, for nodes that have one (as of the last poll)."""

    def node_networks(self) -> dict[str, dict[str, Any]]:
        """Ray node id -> what was detected there for the current rendezvous address (``network_configured``)."""

    def stop(self) -> None:
        """Stop and reap every training process; the group can be started again."""

    def close(self) -> None:
        """Stop, then release actors, reserved resources and the Ray connection."""


class RayWorkerGroup:
    """Ranks as Ray actors in one placement group. Connects to Ray on the first ``start``."""

    def __init__(self, config: Config, run_dir: Path, *, run_id: str | None = None, workdir: Path | None = None) -> None:
        """``run_id`` names the run to scripts (``TORCHELASTIC_RUN_ID``; default: the run directory's
        name); ``workdir`` is where training processes run (default: the current directory)."""
        self._run_id = run_id or run_dir.name
        self._workdir = str(workdir or Path.cwd())
        self.world_size = config.cluster.world_size
        self._per_node = config.cluster.workers_per_node
        # Node slot -> its placement-group bundle. Bundles past config.cluster.nodes are spare nodes.
        self._slot_bundle = list(range(config.cluster.nodes))
        self._num_bundles = config.cluster.nodes + config.cluster.spare_nodes
        self._networks: dict[tuple[str, str], dict[str, Any]] = {}  # (node id, head address) -> detection
        self._config = config
        self._config_dict = config.model_dump(mode="json")
        self._run_dir = run_dir
        self._ray: Any = None
        self._started_ray = False
        self._pg: Any = None
        self._actors: list[Any] = []
        self._nodes: list[dict[str, Any]] = []  # per actor: where it landed (RankActor.node_info)
        self._host: dict[int, int] = {}  # rank -> index of the actor hosting its process
        self._dead: set[int] = set()  # actors that died (their node, or their process, is gone)
        self._lost_bundles: set[int] = set()  # bundles whose node was lost (not used again)
        self._spare_bundles = list(range(config.cluster.nodes, self._num_bundles))
        self._warm: dict[str, int] = {}
        ft = config.fault_tolerance
        self._node_timeout_s = ft.node_timeout_s
        # Ranks stop themselves after this long without a call from us (RankActor's lease)...
        self._lease_s = ft.node_timeout_s / 2
        # ...so a rank of a lost node is replaced only once its lease has certainly run out.
        self._fenced_at = 0.0
        self._pending: dict[int, tuple[Any, int]] = {}  # actor -> its poll in flight, and that poll's number
        self._answered: dict[int, float] = {}  # actor -> when it last answered (monotonic)
        self._polls = 0
        self._heard: dict[int, int] = {}  # actor -> number of the last poll it answered
        self._acked: dict[int, int] = {}  # actor -> number of its last answer we received (its lease runs from it)
        # Held to replace an actor, and by the lease keeper to credit an answer: an answer of the
        # actor being replaced must never be credited to its successor (a stale, higher number
        # renews nothing, and the new actor would fence itself).
        self._replacing = threading.Lock()
        self._keepalive: threading.Thread | None = None
        self._closing = threading.Event()
        self._broken: dict[int, str] = {}  # actor -> why a call to it failed (lost at the next poll)
        self._gpu_calls: dict[int, Any] = {}  # actor -> its gpu_metrics call in flight
        self._gpu_readings: dict[int, GpuReading] = {}  # actor -> its latest reading
        self._skews: dict[str, float] = {}  # node id -> how far its clock is behind ours (seconds)

    def start(
        self, attempt: int, resume_tag: str | None, faults: list[dict[str, Any]], rejoin: Collection[int] = ()
    ) -> list[WorkerInfo]:
        self._ensure_actors()
        self.replace_lost(allow_missing=False)
        placements = self._placements()
        specs = {p.rank: self._spec(p, attempt, resume_tag, faults) for p in placements}
        # A call that fails or times out costs its rank, not the run: the next poll reports that rank lost.
        for rank in rejoin:
            host = self._host[rank]
            self._call(self._actors[host].send.remote(rank, Rejoin(**vars(specs[rank]))), index=host)
        started = []
        spare_hosts = self._spare_hosts()
        for p in placements:
            if p.rank in rejoin:
                continue
            home = self._nodes[self._home(p.rank)]
            spare_host = spare_hosts[home["node_id"]]
            # The node's warm spare, else a process forked from its zygote (imports done), else a fresh one.
            pid = self._call(self._actors[spare_host].promote_spare.remote(specs[p.rank]), index=spare_host)
            promoted = pid is not None
            if not promoted:
                pid = self._call(self._actors[spare_host].fork.remote(specs[p.rank]), index=spare_host)
            forked = not promoted and pid is not None
            if pid is not None:
                if self._host[p.rank] != spare_host:
                    self._call(self._actors[self._host[p.rank]].forget.remote(p.rank), dead_ok=True)
                self._host[p.rank] = spare_host
            else:
                host = self._host[p.rank] = self._home(p.rank)
                pid = self._call(self._actors[host].start.remote(specs[p.rank]), index=host)
                if pid is None:
                    continue
            started.append(WorkerInfo(rank=p.rank, pid=pid, node=home["hostname"], attempt=attempt,
                                      node_ip=home["ip"], node_id=home["node_id"], spare=promoted,
                                      forked=forked))
        return started

    def poll(self) -> list[RankUpdate]:
        """One update per rank. Polls run concurrently; an actor that has not answered for
        ``fault_tolerance.node_timeout_s`` (or whose node Ray reports dead) takes its whole node with it."""
        spare_hosts = self._spare_hosts()
        hosts = sorted(set(self._host.values()) | set(spare_hosts.values()))
        now = time.monotonic()
        # A lost actor is asked nothing more: a call that reached it late must not look like a live controller.
        hosts = [index for index in hosts if index not in self._dead]
        self._polls += 1
        for index in hosts:
            if index not in self._pending:
                self._pending[index] = (self._actors[index].poll.remote(self._acked.get(index, 0)), self._polls)
                self._answered.setdefault(index, now)
        refs = [self._pending[index][0] for index in hosts]
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=_POLL_WAIT_S)
        ready_set = set(ready)
        now = time.monotonic()
        by_rank: dict[int, RankUpdate] = {}
        lost: dict[int, str] = {}  # actor -> why
        silent: set[int] = set()  # lost by timeout: its node is unreachable
        died: set[int] = set()  # Ray says the actor's process died
        for index in hosts:
            ref, number = self._pending[index]
            if ref not in ready_set:
                quiet_s = now - self._answered[index]
                if quiet_s > self._node_timeout_s:
                    silent.add(index)
                    lost[index] = (f"its worker actor answered nothing for {quiet_s:.1f}s "
                                   f"(fault_tolerance.node_timeout_s={self._node_timeout_s:g})")
                continue
            del self._pending[index]
            try:
                result = self._ray.get(ref, timeout=_CALL_TIMEOUT_S)
            except (self._ray.exceptions.RayActorError, self._ray.exceptions.RayTaskError) as exc:
                lost[index] = f"worker actor {index} on {self._nodes[index]['ip']} died: {_first_line(exc)}"
                if isinstance(exc, self._ray.exceptions.ActorDiedError):
                    died.add(index)  # not merely unavailable (a network problem): its process is gone
                continue
            self._answered[index] = now
            self._heard[index] = number
            with self._replacing:
                self._acked[index] = max(self._acked.get(index, 0), result.answer)
            skew = self._skew(index, time.time() - result.now)
            for rank, status in result.ranks.items():
                if self._host.get(rank) == index:
                    by_rank[rank] = RankUpdate.of(rank, status.moved(skew) if skew else status)
            node = self._nodes[index]
            if index != spare_hosts[node["node_id"]]:
                continue  # only a node's spare-host actor speaks for its spare
            if result.warm_spare is None:
                self._warm.pop(node["node_id"], None)
            else:
                self._warm[node["node_id"]] = result.warm_spare
        lost.update({i: why for i, why in self._broken.items() if i not in self._dead})
        self._broken.clear()
        for index, why in self._lose(lost, silent, died).items():
            for rank in [r for r, h in self._host.items() if h == index]:
                by_rank[rank] = RankUpdate(rank=rank, lost=why)
        return [by_rank.get(rank, RankUpdate(rank=rank)) for rank in range(self.world_size)]

    def _keep_leases(self) -> None:
        """Renew every live actor's lease while the controller is busy elsewhere (placing nodes,
        converting a checkpoint): a node's ranks stop only when the node cannot reach us.

        An actor's lease runs from the answer we last acknowledged, so answers are collected first
        and the next renewal (acknowledging them) goes out at once: the lease then trails by about
        one period plus a round trip, a quarter of the lease or less in all."""
        in_flight: dict[int, tuple[Any, Any]] = {}  # actor -> (renew call, the actor it went to)
        period = max(0.05, self._lease_s / _RENEWALS_PER_LEASE)
        while not self._closing.wait(period):
            if in_flight:
                refs = [ref for ref, _ in in_flight.values()]
                ready = set(self._ray.wait(refs, num_returns=len(refs), timeout=0)[0])
                for index, (ref, actor) in list(in_flight.items()):
                    if ref not in ready:
                        continue
                    del in_flight[index]
                    try:
                        answer = self._ray.get(ref, timeout=_CALL_TIMEOUT_S)
                    except self._ray.exceptions.RayError:
                        continue  # poll() finds out what happened to it
                    with self._replacing:
                        if index < len(self._actors) and self._actors[index] is actor:
                            self._acked[index] = max(self._acked.get(index, 0), answer)
                            self._answered[index] = time.monotonic()
            for index, actor in enumerate(list(self._actors)):
                current = in_flight.get(index)
                if index not in self._dead and (current is None or current[1] is not actor):
                    in_flight[index] = (actor.renew.remote(self._acked.get(index, 0)), actor)

    def _skew(self, index: int, sample: float) -> float:
        """How far the clock of actor ``index``'s node is behind ours. Each answer gives our receipt
        time minus the node's send time: the skew plus the answer's latency, which varies by hundreds
        of milliseconds under load. The smallest sample is the best estimate; below a quarter second
        it is taken as no skew at all, so that ranks on one machine are compared on one clock (their
        order decides the root cause, milliseconds apart)."""
        node = self._nodes[index]["node_id"]
        best = self._skews[node] = min(self._skews.get(node, sample), sample)
        return best if abs(best) > _SKEW_TOLERANCE_S else 0.0

    def poll_mark(self) -> int:
        return self._polls

    def unheard(self, mark: int) -> list[int]:
        return sorted(rank for rank, index in self._host.items()
                      if index not in self._dead and self._heard.get(index, 0) <= mark)

    def _lose(self, lost: dict[int, str], silent: set[int], died: set[int]) -> dict[int, str]:
        """Record lost actors (``silent``: no answer for the node timeout; ``died``: Ray says its process
        died); when their node is gone (silent, or dead to Ray), every actor on it. Returns every
        actor now lost, with why."""
        if not lost:
            return {}
        alive_nodes = self._alive_nodes()
        result = dict(lost)
        for index, why in lost.items():
            node_id = self._nodes[index]["node_id"]
            if index in silent or node_id not in alive_nodes:
                message = f"node {self._nodes[index]['ip']} lost: {why}"
                for other, info in enumerate(self._nodes):
                    if info["node_id"] == node_id and other not in self._dead:
                        result[other] = message
        for index in result:
            self._dead.add(index)
            self._pending.pop(index, None)
            # Its ranks may still run (a partition, a hung actor): not replaced before their lease ran
            # out. Unless its process is gone on a live node: its ranks died with it (PDEATHSIG).
            if index not in died or self._nodes[index]["node_id"] not in alive_nodes:
                self._fenced_at = max(self._fenced_at,
                                      self._answered.get(index, 0.0) + self._lease_s + _FENCE_MARGIN_S)
            bundle = index // self._per_node
            if bundle in self._spare_bundles and all(
                    i in self._dead for i in range(bundle * self._per_node, (bundle + 1) * self._per_node)):
                self._spare_bundles.remove(bundle)
                self._lose_bundle(bundle)
        return result

    def warm_spares(self) -> dict[str, int]:
        return dict(self._warm)

    def node_networks(self) -> dict[str, dict[str, Any]]:
        head = self._head_ip()
        return {node_id: found for (node_id, addr), found in self._networks.items() if addr == head}

    def gpu_metrics(self) -> list[GpuReading]:
        """The latest reading of every live actor's GPUs. Never waits: the answers to the previous
        call are collected, and a new call goes to every actor without one in flight."""
        readings = []
        if self._gpu_calls:
            ready, _ = self._ray.wait(list(self._gpu_calls.values()), num_returns=len(self._gpu_calls), timeout=0)
            for index, ref in list(self._gpu_calls.items()):
                if ref not in ready:
                    continue
                del self._gpu_calls[index]
                try:
                    reading = self._ray.get(ref, timeout=_CALL_TIMEOUT_S)
                except self._ray.exceptions.RayError:
                    continue  # a lost actor is reported by poll(); its GPUs are missing from this reading
                if reading is not None:
                    self._gpu_readings[index] = reading
        live = [i for i in range(len(self._actors)) if i not in self._dead and i // self._per_node not in self._lost_bundles]
        hosted = {index: str(rank) for rank, index in self._host.items()}
        simulated = self._config.metrics.simulated_gpus
        for index in live:
            if index not in self._gpu_calls:
                self._gpu_calls[index] = self._actors[index].gpu_metrics.remote(
                    index % self._per_node if simulated else None)
            if index in self._gpu_readings:
                # Who uses the GPUs now: the rank this actor hosts (none on a spare node), on its node.
                readings.append(replace(self._gpu_readings[index], rank=hosted.get(index, ""),
                                        node=self._nodes[index]["ip"]))
        return readings

    def interrupt(self, ranks: Collection[int]) -> None:
        for rank in ranks:
            if self._host[rank] in self._dead:
                continue
            self._call(self._actors[self._host[rank]].send.remote(rank, Interrupt()), dead_ok=True)

    def kill(self, ranks: Collection[int]) -> None:
        for rank in ranks:
            if self._host[rank] in self._dead:
                continue  # its node is gone, or fenced: its lease stops it
            self._call(self._actors[self._host[rank]].kill.remote(rank), dead_ok=True)

    def ensure_spares(self) -> None:
        for index in sorted(self._spare_hosts().values()):
            if index in self._dead:
                continue
            # The node's shared settings (threads, devices, network, cluster.env); the rank's own come at promotion.
            placement = self._placement(index, local_rank=index % self._per_node, master_port=0)
            env = {k: v for k, v in rank_env(self._config, placement).items() if k not in RESERVED_ENV}
            self._call(self._actors[index].start_spare.remote(self._config_dict, env), dead_ok=True)

    def stop(self) -> None:
        refs = [actor.stop.remote(_STOP_TIMEOUT_S) for index, actor in enumerate(self._actors)
                if index not in self._dead and index // self._per_node not in self._lost_bundles]
        for ref in refs:
            try:
                self._ray.get(ref, timeout=3 * _STOP_TIMEOUT_S)
            except (self._ray.exceptions.RayActorError, self._ray.exceptions.GetTimeoutError):
                pass  # a dead actor's processes died with it (PDEATHSIG)

    def close(self) -> None:
        try:
            self.stop()
            self._closing.set()
            if self._keepalive is not None:
                self._keepalive.join(timeout=_CALL_TIMEOUT_S)
            for actor in self._actors:
                self._ray.kill(actor)
            if self._pg is not None:
                self._ray.util.remove_placement_group(self._pg)
        finally:
            with self._replacing:
                self._actors, self._pg = [], None
            if self._started_ray:
                from orchestrator.controller import ray_session

                ray_session.disconnect()
                self._started_ray = False

    def _spec(self, p: RankPlacement, attempt: int, resume_tag: str | None, faults: list[dict[str, Any]]) -> Start:
        return Start(
            rank=p.rank,
            local_rank=p.local_rank,
            world_size=self.world_size,
            node=self._nodes[self._home(p.rank)]["hostname"],
            attempt=attempt,
            config=self._config_dict,
            run_dir=str(self._run_dir),
            resume_tag=resume_tag,
            faults=faults,
            env={**rank_env(self._config, p), **torchrun_env(self._config, p.rank, attempt, self._run_id),
                 RUN_DIR_ENV: str(self._run_dir)},
            workdir=self._workdir,
        )

    def _spare_hosts(self) -> dict[str, int]:
        """Node id -> the actor that keeps the node's spare: the lowest bundle index on that node."""
        hosts: dict[str, int] = {}
        for index, info in enumerate(self._nodes):
            if index not in self._dead and index // self._per_node not in self._lost_bundles:
                hosts.setdefault(info["node_id"], index)
        return hosts

    def _call(self, ref: Any, dead_ok: bool = False, index: int | None = None) -> Any:
        """The result of an actor call, waited for at most ``_CALL_TIMEOUT_S``. When it fails: None if
        ``dead_ok``; with ``index`` (the actor called), None and that actor is reported lost by the next
        poll, so its ranks fail and are replaced; otherwise the error is raised."""
        exceptions = self._ray.exceptions
        try:
            return self._ray.get(ref, timeout=_CALL_TIMEOUT_S)
        except (exceptions.RayActorError, exceptions.RayTaskError, exceptions.GetTimeoutError) as exc:
            if index is not None:
                self._broken[index] = f"a call to worker actor {index} on {self._nodes[index]['ip']} failed: {_first_line(exc)}"
                return None
            if dead_ok and isinstance(exc, exceptions.RayActorError):
                return None
            raise

    def _ensure_actors(self) -> None:
        """Connect to Ray, reserve one bundle per node, place one actor per rank slot in each (once)."""
        if self._actors:
            return
        from orchestrator.controller import ray_session

        self._started_ray = ray_session.connect(self._config)
        import ray
        from ray.util.placement_group import placement_group

        self._ray = ray
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
        self._actors = [self._new_actor(index) for index in range(self._num_bundles * self._per_node)]
        self._nodes = ray.get([a.node_info.remote() for a in self._actors], timeout=_PLACEMENT_TIMEOUT_S)
        self._host = {rank: self._home(rank) for rank in range(self.world_size)}
        self._keepalive = threading.Thread(target=self._keep_leases, name="leases", daemon=True)
        self._keepalive.start()

    def _home(self, rank: int) -> int:
        """The actor that normally hosts ``rank``: its local slot on its node slot's bundle."""
        slot, local = divmod(rank, self._per_node)
        return self._slot_bundle[slot] * self._per_node + local

    def _head_ip(self) -> str:
        return self._nodes[self._home(0)]["ip"]

    def _detect_networks(self) -> None:
        """Detect each node's network for the current head address, once per node and address."""
        head = self._head_ip()
        todo = {}
        for index, info in enumerate(self._nodes):
            key = (info["node_id"], head)
            if key not in self._networks and index not in self._dead and key not in todo:
                todo[key] = self._actors[index].network.remote(self._config_dict, head)
        for key, ref in todo.items():
            self._networks[key] = self._call(ref)

    def _new_actor(self, index: int) -> Any:
        """The actor for slot ``index % workers_per_node`` of bundle ``index // workers_per_node``."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from orchestrator.worker.actor import RankActor

        gpu = self._config.cluster.device == "gpu"
        self._acked[index] = 0  # a new actor numbers its answers from 1
        self._pending.pop(index, None)
        return (
            self._ray.remote(RankActor)
            .options(
                num_cpus=1,
                num_gpus=1 if gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=index // self._per_node
                ),
            )
            .remote(index, str(self._run_dir / "logs"), self._lease_s)
        )

    def replace_lost(self, allow_missing: bool) -> list[int]:
        """Give every dead actor a successor: a lost node's slot moves to a spare node; otherwise the
        actors are re-created in their bundles (Ray moves a lost node's bundle to a node that joins)."""
        if not self._dead:
            return []
        alive_nodes = self._alive_nodes()
        ft = self._config.fault_tolerance
        missing = []
        for slot, bundle in enumerate(self._slot_bundle):
            indexes = range(bundle * self._per_node, (bundle + 1) * self._per_node)
            if not any(i in self._dead for i in indexes):
                continue
            node_id = self._nodes[indexes[0]]["node_id"]
            node_lost = node_id not in alive_nodes or all(i in self._dead for i in indexes)
            wait_s, tried = ft.node_wait_s, False
            if not node_lost:
                # Some actors of a live node died: made again in their bundle. Unless the node is dying:
                # a node killed at once loses its actors seconds before Ray reports the node dead, and
                # its bundle cannot be placed meanwhile; with a spare, that report moves the slot there.
                wait_s, tried = max(wait_s, _PLACEMENT_TIMEOUT_S), True
                if self._recreate(indexes, wait_s, watch=node_id if self._spare_bundles else None):
                    continue
                node_lost = node_id not in self._alive_nodes()
            if node_lost and self._spare_bundles:
                self._slot_bundle[slot] = self._spare_bundles.pop(0)
                self._lose_bundle(bundle)
                continue
            if tried or not self._recreate(indexes, wait_s):
                if not allow_missing:
                    raise ClusterError(
                        f"node {self._nodes[indexes[0]]['ip']} was lost and no node took its place within "
                        f"{max(wait_s, 1.0):.0f}s (fault_tolerance.node_wait_s={ft.node_wait_s:g}); hold a spare "
                        "with cluster.spare_nodes, raise fault_tolerance.node_wait_s, or set "
                        "fault_tolerance.allow_shrink=true to go on with the nodes left"
                    )
                self._lose_bundle(bundle)
                missing.append(slot)
        self._dead -= {i for i in self._dead if i // self._per_node not in self._lost_bundles}
        for rank in self._host:
            if self._host[rank] in self._dead or self._host[rank] // self._per_node in self._lost_bundles:
                self._host[rank] = self._home(rank)
        # A partitioned node's ranks may still run until their lease ends: never two copies of a rank.
        delay = self._fenced_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return missing

    def shrink(self, config: Config, slots: Collection[int]) -> None:
        for rank, index in self._host.items():
            if index not in self._dead:
                self._call(self._actors[index].forget.remote(rank), dead_ok=True)
        for slot in sorted(slots, reverse=True):
            self._lose_bundle(self._slot_bundle.pop(slot))
        self._config, self._config_dict = config, config.model_dump(mode="json")
        self.world_size = config.cluster.world_size
        self._host = {rank: self._home(rank) for rank in range(self.world_size)}

    def _answers_when_placed(self, refs: list[Any], deadline: float, watch: str | None) -> list[Any] | None:
        """The answers of newly made actors once all have answered; None at ``deadline``, or once Ray
        reports node ``watch`` dead."""
        while (left := deadline - time.monotonic()) > 0:
            ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=min(left, _NODE_CHECK_S))
            if len(ready) == len(refs):
                return self._ray.get(refs, timeout=_CALL_TIMEOUT_S)
            if watch is not None and watch not in self._alive_nodes():
                return None
        return None

    def _alive_nodes(self) -> set[str]:
        return {n["NodeID"] for n in self._ray.nodes() if n.get("Alive")}

    def _lose_bundle(self, bundle: int) -> None:
        """Never use ``bundle`` again (its node is gone); its actors are released."""
        if bundle in self._lost_bundles:
            return
        self._lost_bundles.add(bundle)
        for i in range(bundle * self._per_node, (bundle + 1) * self._per_node):
            self._ray.kill(self._actors[i], no_restart=True)
            self._dead.add(i)

    def _recreate(self, indexes: range, wait_s: float, watch: str | None = None) -> bool:
        """New actors for the dead ones in ``indexes``' bundle; False if none was placed within ``wait_s``,
        or as soon as Ray reports node ``watch`` dead.

        Until Ray has moved the bundle off a dead node, actors made for it die at once: made again."""
        deadline = time.monotonic() + max(wait_s, 1.0)
        while True:
            for i in indexes:
                if i in self._dead:
                    self._ray.kill(self._actors[i], no_restart=True)
                    with self._replacing:
                        self._actors[i] = self._new_actor(i)
            refs = [self._actors[i].node_info.remote() for i in indexes]
            try:
                infos = self._answers_when_placed(refs, deadline, watch)
            except self._ray.exceptions.RayActorError:
                if time.monotonic() + _RECREATE_PAUSE_S >= deadline:
                    return False
                time.sleep(_RECREATE_PAUSE_S)
                continue
            if infos is None:
                return False
            break
        for i, info in zip(indexes, infos):
            self._nodes[i] = info
            self._answered[i] = time.monotonic()
            self._dead.discard(i)
        return True

    def _placements(self) -> list[RankPlacement]:
        """Every rank's local rank, devices, network and rendezvous address for a new attempt."""
        self._detect_networks()
        # A fresh port every attempt: a reused store would hand out a dead rank's address.
        port = self._call(self._actors[self._host[0]].free_port.remote(self._head_ip()))
        return [self._placement(self._home(rank), rank=rank, local_rank=rank % self._per_node, master_port=port)
                for rank in range(self.world_size)]

    def _placement(self, index: int, *, local_rank: int, master_port: int, rank: int = 0) -> RankPlacement:
        """A process on actor ``index``'s node: the node's GPUs (ordered by local rank), CPUs and network."""
        info = self._nodes[index]
        first = index - index % self._per_node
        node_gpus = [g for i in range(first, first + self._per_node) for g in self._nodes[i]["gpu_ids"]]
        return RankPlacement(
            rank=rank,
            local_rank=local_rank,
            local_world_size=self._per_node,
            master_addr=self._head_ip(),
            master_port=master_port,
            node_cpus=info["cpus"],
            cuda_visible_devices=",".join(node_gpus) if node_gpus else None,
            network_env=self._networks.get((info["node_id"], self._head_ip()), {}).get("env", {}),
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
