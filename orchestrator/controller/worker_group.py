"""The seam between the controller and the processes it runs.

:class:`WorkerGroup` is what the controller needs: start all ranks, poll
them, stop them. :class:`RayWorkerGroup` does it with a placement group
(one bundle per rank) and one :class:`~orchestrator.worker.actor.RankActor`
per rank; controller tests use a fake with the same methods.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orchestrator.config.schema import Config
from orchestrator.errors import ClusterError
from orchestrator.worker.env import RankPlacement, rank_env

_PLACEMENT_TIMEOUT_S = 120.0
_CALL_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerInfo:
    """A started rank: who and where."""

    rank: int
    pid: int
    node: str
    attempt: int


@dataclass(kw_only=True, slots=True)
class RankUpdate:
    """What one poll learned about one rank.

    ``returncode`` is None while the process runs (negative: killed by that
    signal); ``exited_at`` is when its actor saw it end; ``lost`` means its
    actor (and so, likely, its node) is gone.
    """

    rank: int
    messages: list[dict[str, Any]] = field(default_factory=list)
    returncode: int | None = None
    exited_at: float | None = None
    log_tail: str = ""
    lost: str | None = None


class WorkerGroup(Protocol):
    """All ranks of the job, as the controller drives them."""

    world_size: int

    def start(self, attempt: int, resume_tag: str | None) -> list[WorkerInfo]:
        """Start every rank's training process for ``attempt``, resuming from ``resume_tag``."""

    def poll(self) -> list[RankUpdate]:
        """One update per rank."""

    def stop(self) -> None:
        """Stop and reap every training process; the group can be started again."""

    def close(self) -> None:
        """Stop, then release actors, reserved resources and the Ray connection."""


class RayWorkerGroup:
    """Ranks as Ray actors in one placement group. Connects to Ray on the first ``start``."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        self.world_size = config.cluster.world_size
        self._config = config
        self._run_dir = run_dir
        self._ray: Any = None
        self._started_ray = False
        self._pg: Any = None
        self._actors: list[Any] = []
        self._nodes: list[dict[str, Any]] = []

    def start(self, attempt: int, resume_tag: str | None) -> list[WorkerInfo]:
        self._ensure_actors()
        config_dict = self._config.model_dump(mode="json")
        refs = [
            actor.start.remote(
                {
                    "rank": p.rank,
                    "local_rank": p.local_rank,
                    "world_size": self.world_size,
                    "node": self._nodes[p.rank]["hostname"],
                    "attempt": attempt,
                    "config": config_dict,
                    "run_dir": str(self._run_dir),
                    "resume_tag": resume_tag,
                },
                rank_env(self._config, p),
            )
            for actor, p in zip(self._actors, self._placements(), strict=True)
        ]
        pids = self._ray.get(refs, timeout=_CALL_TIMEOUT_S)
        return [
            WorkerInfo(rank=rank, pid=pid, node=self._nodes[rank]["hostname"], attempt=attempt)
            for rank, pid in enumerate(pids)
        ]

    def poll(self) -> list[RankUpdate]:
        refs = [actor.poll.remote() for actor in self._actors]
        updates = []
        for rank, ref in enumerate(refs):
            try:
                result = self._ray.get(ref, timeout=_CALL_TIMEOUT_S)
            except self._ray.exceptions.RayActorError as exc:
                updates.append(RankUpdate(rank=rank, lost=f"worker actor died: {exc}"))
                continue
            updates.append(RankUpdate(rank=rank, **result))
        return updates

    def stop(self) -> None:
        refs = [actor.stop.remote(_STOP_TIMEOUT_S) for actor in self._actors]
        for ref in refs:
            try:
                self._ray.get(ref, timeout=3 * _STOP_TIMEOUT_S)
            except (self._ray.exceptions.RayActorError, self._ray.exceptions.GetTimeoutError):
                pass  # a dead actor's process died with it (PDEATHSIG)

    def close(self) -> None:
        try:
            self.stop()
            for actor in self._actors:
                self._ray.kill(actor)
            if self._pg is not None:
                self._ray.util.remove_placement_group(self._pg)
        finally:
            self._actors, self._pg = [], None
            if self._started_ray:
                from orchestrator.controller import ray_session

                ray_session.disconnect()
                self._started_ray = False

    def _ensure_actors(self) -> None:
        """Connect to Ray, reserve one bundle per rank and place one actor in each (once)."""
        if self._actors:
            return
        from orchestrator.controller import ray_session

        self._started_ray = ray_session.connect(self._config)
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from orchestrator.worker.actor import RankActor

        self._ray = ray
        gpu = self._config.cluster.device == "gpu"
        bundle = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}
        self._pg = placement_group([bundle] * self.world_size, strategy="PACK")
        try:
            ray.get(self._pg.ready(), timeout=_PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(
                f"Ray could not reserve {self.world_size} x {bundle} within {_PLACEMENT_TIMEOUT_S:.0f}s; "
                "check `ray status` for free resources or lower cluster.nodes/cluster.workers_per_node"
            ) from None
        actor_cls = ray.remote(RankActor)
        self._actors = [
            actor_cls.options(
                num_cpus=1,
                num_gpus=1 if gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=rank
                ),
            ).remote(rank, str(self._run_dir / "logs"))
            for rank in range(self.world_size)
        ]
        self._nodes = ray.get([a.node_info.remote() for a in self._actors], timeout=_PLACEMENT_TIMEOUT_S)

    def _placements(self) -> list[RankPlacement]:
        """Local ranks, GPU visibility and the rendezvous address for a new attempt."""
        by_node: dict[str, list[int]] = defaultdict(list)
        for rank, info in enumerate(self._nodes):
            by_node[info["node_id"]].append(rank)
        master = self._nodes[0]["ip"]
        # A fresh port every attempt: a reused store would hand out a dead rank's address.
        port = self._ray.get(self._actors[0].free_port.remote(master), timeout=_CALL_TIMEOUT_S)
        placements = []
        for rank, info in enumerate(self._nodes):
            peers = by_node[info["node_id"]]
            # Every rank of a node sees all of the node's job GPUs, ordered by local rank.
            node_gpus = [g for r in peers for g in self._nodes[r]["gpu_ids"]]
            placements.append(
                RankPlacement(
                    rank=rank,
                    local_rank=peers.index(rank),
                    local_world_size=len(peers),
                    master_addr=master,
                    master_port=port,
                    node_cpus=info["cpus"],
                    cuda_visible_devices=",".join(node_gpus) if node_gpus else None,
                )
            )
        return placements
