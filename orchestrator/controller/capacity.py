"""Whether this machine can hold the ranks asked of it, checked before anything starts (local mode).

Ranks beyond what memory holds do not fail cleanly: the kernel's OOM killer or Ray's memory monitor
kills processes one after another (the node agent among them, which looks like a lost node), and
every restart meets the same wall. So a launch that cannot fit is refused with the numbers, and one
that may fit but will be slow or tight is warned about.

A rank's footprint: the resident size of a rank process of the built-in workload on CPU, measured
on the local config (0.39-0.41 GiB; forked from the zygote it shares about half of that, but a
replacement started while the zygote is not ready shares nothing): ``RANK_BASE_GIB``; plus its
model and optimizer state, which the built-in GPT's shape tells (``model.*``); a user's training
function may need more, which this check cannot know. Besides the ranks, a node holds one spare
and what every node runs (Ray's processes, the agent, the zygote; the controller on the head):
``NODE_OVERHEAD_GIB``, measured as their proportional set size (0.66 GiB).
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator import node_memory
from orchestrator.config.schema import Config
from orchestrator.errors import ConfigError
from orchestrator.node_memory import Memory
from orchestrator.scaling.plan import non_embedding_params
from orchestrator.worker.env import local_cpu_count

RANK_BASE_GIB = 0.40
NODE_OVERHEAD_GIB = 0.7
# fp32 parameters, gradients and Adam's two moments, and the memory snapshot's own copy and a buddy's.
_STATE_BYTES_PER_PARAM = 4 * 4
_SNAPSHOT_COPIES = 2
# More ranks per CPU than this and each step waits on the others' time slices: warn.
_RANKS_PER_CPU_WARNING = 4
_GIB = node_memory.GIB


@dataclass(frozen=True)
class NodeCapacity:
    """What one node offers: CPUs this process may use, and its memory."""

    cpus: int
    memory: Memory

    @classmethod
    def of_this_machine(cls) -> NodeCapacity:
        return cls(cpus=local_cpu_count(), memory=node_memory.memory())

    def describe(self) -> str:
        return f"{self.cpus} CPU(s), {self.memory.describe()}"


def rank_footprint(config: Config) -> int:
    """Bytes one rank needs at least (module docstring)."""
    state = 0
    if config.train.entrypoint is None and not config.train.is_script:
        model = config.model
        # The blocks, then the byte embedding and output layer (256 x dim each) and the positions.
        params = non_embedding_params(model) + (2 * 256 + model.seq_len) * model.dim
        copies = 1 + (_SNAPSHOT_COPIES if config.checkpoint.memory_interval_steps != 0 else 0)
        state = params * _STATE_BYTES_PER_PARAM * copies // max(1, config.parallel.tensor_parallel)
    return int(RANK_BASE_GIB * _GIB) + state


def check(config: Config, node: NodeCapacity) -> str | None:
    """Raise :class:`ConfigError` where ``node`` cannot hold ``cluster.workers_per_node`` ranks; return
    a warning where it may, slowly (None: it fits)."""
    ranks = config.cluster.workers_per_node
    each = rank_footprint(config)
    room = node.memory.available - int(NODE_OVERHEAD_GIB * _GIB)
    if (ranks + 1) * each > room:  # and the node's spare
        fit = max(0, room // each - 1)
        raise ConfigError(
            f"cluster.workers_per_node={ranks}: this node ({node.describe()}) cannot hold {ranks} ranks of about "
            f"{each / _GIB:.2f} GiB each ({ranks * each / _GIB:.1f} GiB); at most {fit} fit: lower "
            "cluster.workers_per_node (or spread the ranks over more nodes: cluster.nodes)")
    if ranks > _RANKS_PER_CPU_WARNING * node.cpus:
        return (f"cluster.workers_per_node={ranks} on {node.describe()}: {ranks / node.cpus:.0f} ranks per CPU, "
                "so every step waits on the others' time slices; expect slow steps and slow recoveries")
    return None
