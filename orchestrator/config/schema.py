"""The typed config tree: every key a job can set, its default and its bounds.

One frozen pydantic model per section. Field docs here are the source of
``docs/config.md``; keep the two in step. Cross-field rules live in
``Config._check_layout`` so that a bad combination is reported with the key
to change before anything starts.
"""

from __future__ import annotations

import re
import shlex
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_ENTRYPOINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
REDACTED = "<redacted>"
# Half of the built-in corpus (orchestrator/training/corpus.py DEFAULT_MAX_BYTES): the rest is trained on.
HELDOUT_MAX_BYTES = 4 * 1024 * 1024
# Set by the orchestrator for every rank (torchrun's contract, orchestrator/worker/env.py): a user
# value would silently break rendezvous, or tell a script the wrong rank or restart count.
RESERVED_ENV = frozenset({
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
    "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE",
})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)



class NetworkConfig(_Section):
    """How ranks on different nodes reach each other: detected on each node, written into the ranks'
    environment (``orchestrator/worker/network.py``). A variable set in ``cluster.env`` wins."""

    interface: str = Field(
        "auto",
        min_length=1,
        description="Interface for gloo/NCCL sockets (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME): a name such as "
        "eth0, or 'auto' for the one that routes to the head node.",
    )
    ib_hca: str = Field(
        "auto",
        min_length=1,
        description="InfiniBand/RoCE adapters for NCCL (NCCL_IB_HCA), e.g. 'mlx5_0:1,mlx5_1:1'; 'auto' lists "
        "the devices with an ACTIVE port; 'none' turns InfiniBand off (NCCL_IB_DISABLE=1).",
    )
    ib_gid_index: int | Literal["auto"] | None = Field(
        "auto",
        description="RoCE GID index (NCCL_IB_GID_INDEX); 'auto' picks the port's RoCE v2 IPv4 GID; null leaves it to NCCL.",
    )
    nccl_debug: Literal["VERSION", "WARN", "INFO", "TRACE"] | None = Field(
        "WARN", description="NCCL_DEBUG level; null leaves it unset."
    )

    @field_validator("interface", "ib_hca")
    @classmethod
    def _check_names(cls, value: str) -> str:
        if not re.fullmatch(r"[\w.:,@-]+", value):
            raise ValueError(f"{value!r}: expected a name or a comma-separated list of names, without spaces")
        return value

    @field_validator("ib_gid_index")
    @classmethod
    def _check_gid(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"{value} is negative; give a GID index from `show_gids`, 'auto' or null")
        return value


class ClusterConfig(_Section):
    """Where the job runs and how many ranks it has."""

    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'HOST:PORT'); null starts an embedded local Ray."
    )
    nodes: Annotated[int, Field(ge=1)] = Field(1, description="Number of nodes.")
    workers_per_node: Annotated[int, Field(ge=1)] = Field(
        2, description="Ranks per node (one per GPU on GPU clusters)."
    )
    device: Literal["cpu", "gpu"] = Field(
        "cpu", description="cpu: gloo backend; gpu: one GPU per rank, nccl backend."
    )
    spare_nodes: Annotated[int, Field(ge=0)] = Field(
        0, description="Extra nodes held, warm, to take over the ranks of a lost node."
    )
    network: NetworkConfig = NetworkConfig()
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment for every training process (NCCL_*, OMP_*, ...); wins over cluster.network.",
    )

    @field_validator("env", mode="before")
    @classmethod
    def _stringify_env(cls, value: object) -> object:
        # YAML reads NCCL_IB_TIMEOUT: 22 as an int; the environment wants text.
        if isinstance(value, dict):
            return {k: v if isinstance(v, str) else _env_text(v) for k, v in value.items()}
        return value

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
            if name in RESERVED_ENV:
                raise ValueError(f"{name} is set by the orchestrator for each rank; remove it")
            if name.startswith("ORCH_"):
                raise ValueError(f"{name}: variables named ORCH_* are the orchestrator's own (they mark and "
                                 "connect its processes); remove it")
        return value

    @property
    def world_size(self) -> int:
        return self.nodes * self.workers_per_node


def _env_text(value: object) -> object:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return str(value)
    return value


class ParallelConfig(_Section):
    """How the model and optimizer state are split across ranks."""

    zero_stage: Annotated[int, Field(ge=0, le=3)] = Field(2, description="DeepSpeed ZeRO stage, 0 to 3.")
    tensor_parallel: Annotated[int, Field(ge=1)] = Field(
        1, description="Tensor-parallel degree (DeepSpeed AutoTP); must divide the world size."
    )


class TrainConfig(_Section):
    """The training loop."""

    steps: Annotated[int, Field(ge=1)] = Field(200, description="Optimizer steps to train.")
    seed: Annotated[int, Field(ge=0)] = Field(1234, description="Seed for weights, data order and RNG.")
    micro_batch_size: Annotated[int, Field(ge=1)] = Field(
        8, description="Sequences per data-parallel rank per step."
    )
    global_batch_size: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="Sequences per optimizer step over all ranks, kept on any world size by gradient "
        "accumulation; null: micro_batch_size x data-parallel size.",
    )
    lr: Annotated[float, Field(gt=0)] = Field(3e-3, description="AdamW learning rate.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="What the model trains in: fp32, or bf16/fp16 with fp32 master weights (DeepSpeed's "
        "bf16 and fp16 sections; fp16 with dynamic loss scaling, GPU only). It also picks the dense peak "
        "that MFU is counted against; a script keeps its own dtype, so set it to what the script trains in.",
    )
    entrypoint: str | None = Field(
        None,
        description="User training function 'module:function'; null (and no script or module) runs the "
        "built-in GPT workload.",
    )
    script: str | None = Field(
        None,
        min_length=1,
        description="A training script run unmodified as __main__ in every rank, as torchrun would "
        "(docs/scripts.md); a relative path is relative to the launch directory. "
        "`orchestrator launch CONFIG -- script.py ARGS` sets it.",
    )
    module: str | None = Field(
        None,
        description="A module run as __main__ in every rank, like `python -m` (`launch CONFIG -- -m MODULE ARGS`).",
    )
    args: list[str] = Field(
        default_factory=list, description="Command-line arguments of train.script or train.module (its sys.argv[1:])."
    )
    show_output: Literal["auto", "rank0", "all", "none"] = Field(
        "auto",
        description="Ranks' own output on the terminal, each line as '[rank N] ...' (it is always in "
        "RUN_DIR/logs/rankN.log): 'auto' shows rank 0's for a script or module until it reports a step "
        "(then the progress line takes over), and none for a training function.",
    )

    @field_validator("entrypoint")
    @classmethod
    def _check_entrypoint(cls, value: str | None) -> str | None:
        if value is not None and not _ENTRYPOINT.match(value):
            raise ValueError(f"{value!r} is not of the form 'package.module:function'")
        return value

    @field_validator("module")
    @classmethod
    def _check_module(cls, value: str | None) -> str | None:
        if value is not None and not _MODULE.match(value):
            raise ValueError(f"{value!r} is not a module name such as 'package.train'")
        return value

    @model_validator(mode="after")
    def _one_program(self) -> TrainConfig:
        given = [k for k in ("entrypoint", "script", "module") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"train.{given[1]}: give one of train.entrypoint, train.script and train.module, "
                             f"not {' and '.join('train.' + k for k in given)}")
        if self.args and self.script is None and self.module is None:
            raise ValueError("train.args: arguments are for train.script or train.module; set one of them "
                             "(or remove train.args)")
        return self

    @property
    def is_script(self) -> bool:
        """A script or module run as ``__main__``: it owns its loop, process group and checkpoints."""
        return self.script is not None or self.module is not None

    @property
    def is_builtin(self) -> bool:
        """The built-in GPT workload (no entry point, script or module)."""
        return self.entrypoint is None and not self.is_script

    def describe(self) -> str:
        """What runs, for headers: the script or module and its arguments, or the entry point."""
        if self.is_script:
            words = [self.script] if self.script is not None else ["-m", self.module]
            return shlex.join([*words, *self.args])
        return self.entrypoint or "built-in GPT"


class ModelConfig(_Section):
    """Shape of the built-in GPT (byte-level, 256-token vocabulary)."""

    layers: Annotated[int, Field(ge=1)] = Field(2, description="Transformer blocks.")
    heads: Annotated[int, Field(ge=1)] = Field(4, description="Attention heads.")
    dim: Annotated[int, Field(ge=8)] = Field(128, description="Hidden size; a multiple of heads.")
    seq_len: Annotated[int, Field(ge=8)] = Field(128, description="Tokens (bytes) per sequence.")


class EvaluationConfig(_Section):
    """Held-out evaluation of the built-in GPT: the last ``heldout_bytes`` of the corpus are never
    trained on, and the loss on fixed windows of them is reported (``heldout_loss`` in step events)."""

    heldout_bytes: Annotated[int, Field(ge=0)] = Field(
        0, description="Bytes at the end of the corpus kept out of training and used for evaluation; 0: no evaluation."
    )
    batches: Annotated[int, Field(ge=1)] = Field(
        32, description="Windows of model.seq_len bytes evaluated, evenly spaced over the held-out bytes."
    )
    interval_steps: Annotated[int, Field(ge=0)] = Field(
        0, description="Evaluate every N steps as well as after the last; 0: after the last step only."
    )


class CheckpointConfig(_Section):
    """When checkpoints are written and how many are kept."""

    interval_steps: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        50, description="Save every N steps (and at the last step); 0 turns checkpoints off; 'auto': the interval "
        "that loses the least time to saves and to recomputation after failures (Young/Daly), from the measured "
        "save cost, step time and failure rate (docs/checkpoints.md).",
    )
    memory_interval_steps: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        1, description="Keep a copy of each rank's training state in host memory every N steps, mirrored to a "
        "buddy rank (on the next node; on a single node, the node's next rank), so that a recovery goes back to "
        "the newest such step instead of the last disk checkpoint (docs/checkpoints.md); 0 turns it off; 'auto': "
        "the power of two steps that loses the least time to snapshots and recomputation (Young/Daly, from the "
        "measured snapshot cost, step time and failure rate). Training functions that call ctx.snapshot.",
    )
    mtbf_s: Annotated[float, Field(gt=0)] = Field(
        3600.0, description="With an interval 'auto', the mean time between failures assumed until the run has "
        "lasted longer than this or seen a failure.",
    )
    keep_last: Annotated[int, Field(ge=1)] = Field(3, description="Committed checkpoints to keep.")
    async_save: bool = Field(
        True, description="Write in the background; training blocks only for the copy to host memory."
    )
    when_busy: Literal["wait", "skip"] = Field(
        "wait", description="A save is due while the previous one is still being written: wait for it, or skip this one."
    )
    on_failure: Literal["continue", "stop"] = Field(
        "continue", description="A save fails (disk full, permission denied): keep training, or stop the run."
    )


class FaultToleranceConfig(_Section):
    """Failure detection and the restart budget."""

    max_restarts: Annotated[int, Field(ge=0)] = Field(3, description="Recoveries allowed before the run fails.")
    hang_timeout_s: Annotated[float, Field(gt=0)] = Field(
        30.0, description="A rank with no step heartbeat for this long is declared hung (once it has reported "
        "a step); so is a process with no sign of life at all (stopped, frozen) for this long."
    )
    stuck_timeout_s: Annotated[float, Field(gt=0)] = Field(
        300.0, description="A rank that has reported no step in this attempt (starting up, or a script that never "
        "reports) is hung when its main thread is blocked for this long (call stack unchanged and no CPU used; at least hang_timeout_s)."
    )
    node_timeout_s: Annotated[float, Field(gt=0)] = Field(
        10.0,
        description="A node whose agent sends the controller nothing for this long is lost (agents send their "
        "status at least every quarter of it; also how long its ranks keep "
        "training without the controller before they stop themselves: three quarters of it).",
    )
    node_wait_s: Annotated[float, Field(ge=0)] = Field(
        0.0, description="Without a spare node, wait this long for a lost node (or a new one) to join before "
        "shrinking or failing."
    )
    allow_shrink: bool = Field(
        False, description="Without a spare node, continue on the nodes left (same global batch) instead of failing."
    )
    recovery: Literal["in_place", "full_restart"] = Field(
        "in_place",
        description="in_place: survivors keep their processes and a warm spare replaces the failed rank; "
        "full_restart: every rank gets a new process.",
    )
    preempt_timeout_s: Annotated[float, Field(gt=0)] = Field(
        25.0, description="On SIGUSR1 or SIGTERM (a scheduler preempting or cancelling the job), how long to wait "
        "for the checkpoint it asks for before stopping every rank; keep it under the scheduler's grace time "
        "(Slurm: KillWait, 30 s by default, or the --signal warning's lead).",
    )


class MetricsConfig(_Section):
    """The Prometheus endpoint."""

    enabled: bool = Field(True, description="Serve Prometheus metrics from the controller.")
    host: str = Field("127.0.0.1", min_length=1, description="Address the metrics endpoint binds to.")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(
        9464, description="Port of the metrics endpoint; 0 picks a free one."
    )
    gpu_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        0,
        description="Port of each node agent's GPU endpoint (DCGM names); 0 picks a free one. Prometheus finds "
        "the endpoints in RUN_DIR/prometheus/gpu-targets.json (file-based service discovery).",
    )
    per_rank_limit: Annotated[int, Field(ge=0)] = Field(
        1024,
        description="Jobs of up to this many ranks get per-rank series (orchestrator_rank_*); larger ones get "
        "per-node series, step-time quantiles and the slowest ranks instead, so that a scrape stays small.",
    )
    simulated_gpus: bool = Field(
        False,
        description="Serve one simulated GPU per rank (a busy H100 from a stand-in NVML) instead of the node's "
        "real ones: dashboards, alerts and Prometheus set-ups tried on machines without GPUs. Never on a real run.",
    )


class Config(_Section):
    """The whole job: one tree, validated when loaded."""

    cluster: ClusterConfig = ClusterConfig()
    parallel: ParallelConfig = ParallelConfig()
    train: TrainConfig = TrainConfig()
    model: ModelConfig = ModelConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    fault_tolerance: FaultToleranceConfig = FaultToleranceConfig()
    metrics: MetricsConfig = MetricsConfig()

    @model_validator(mode="after")
    def _check_layout(self) -> Config:
        world = self.cluster.world_size
        if self.cluster.ray_address is None and self.cluster.nodes > 1:
            raise ValueError(
                "cluster.nodes: the embedded local Ray has one node; set cluster.nodes=1 "
                "or give cluster.ray_address of a running Ray cluster"
            )
        if self.cluster.ray_address is None and self.cluster.spare_nodes:
            raise ValueError(
                "cluster.spare_nodes: the embedded local Ray has one node; set cluster.spare_nodes=0 "
                "or give cluster.ray_address of a running Ray cluster"
            )
        if self.parallel.tensor_parallel > self.cluster.workers_per_node and self.cluster.nodes > 1:
            raise ValueError(
                f"parallel.tensor_parallel: {self.parallel.tensor_parallel} is more than "
                f"cluster.workers_per_node={self.cluster.workers_per_node}; a tensor-parallel group must lie "
                "inside one node (its collectives run every layer)"
            )
        if self.cluster.workers_per_node % self.parallel.tensor_parallel and self.cluster.nodes > 1:
            raise ValueError(
                f"parallel.tensor_parallel: {self.parallel.tensor_parallel} does not divide "
                f"cluster.workers_per_node={self.cluster.workers_per_node}; tensor-parallel groups must not "
                "straddle nodes"
            )
        if world % self.parallel.tensor_parallel:
            raise ValueError(
                f"parallel.tensor_parallel: {self.parallel.tensor_parallel} does not divide the "
                f"world size {world} (cluster.nodes x cluster.workers_per_node); pick a divisor of {world}"
            )
        if self.train.is_builtin:
            if self.model.dim % self.model.heads:
                raise ValueError(
                    f"model.dim: {self.model.dim} is not a multiple of model.heads={self.model.heads}"
                )
            heldout = self.evaluation.heldout_bytes
            if heldout and not self.model.seq_len < heldout <= HELDOUT_MAX_BYTES:
                raise ValueError(
                    f"evaluation.heldout_bytes: {heldout} must be more than model.seq_len={self.model.seq_len} "
                    f"and at most {HELDOUT_MAX_BYTES} (half the corpus), or 0 for no evaluation"
                )
            if self.model.heads % self.parallel.tensor_parallel:
                raise ValueError(
                    f"parallel.tensor_parallel: {self.parallel.tensor_parallel} does not divide "
                    f"model.heads={self.model.heads}; tensor parallelism splits attention heads"
                )
        if self.train.global_batch_size is not None:
            self.accumulation_steps(self.data_parallel_size)  # raises when it does not divide
        if self.checkpoint.interval_steps == "auto" and self.train.is_script:
            raise ValueError(
                "checkpoint.interval_steps: auto is for training functions (ctx.should_checkpoint); a script "
                "keeps its own checkpoint cadence, so give a number or leave it out"
            )
        if self.train.precision == "fp16" and self.cluster.device == "cpu":
            raise ValueError(
                "train.precision: fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16 training); "
                "use bf16 or fp32 with cluster.device=cpu"
            )
        return self

    def redacted_dump(self) -> dict:
        """The config as JSON data for records others may read (events, manifests): ``cluster.env``
        values can be secrets (tokens, keys), so only their names are kept."""
        data = self.model_dump(mode="json")
        data["cluster"]["env"] = {name: REDACTED for name in data["cluster"]["env"]}
        return data

    @property
    def data_parallel_size(self) -> int:
        return self.cluster.world_size // self.parallel.tensor_parallel

    def accumulation_steps(self, data_parallel_size: int) -> int:
        """Micro-batches per optimizer step that keep ``train.global_batch_size`` on this many replicas."""
        per_step = self.train.micro_batch_size * data_parallel_size
        wanted = self.train.global_batch_size
        if wanted is None:
            return 1
        if wanted % per_step:
            raise ValueError(
                f"train.global_batch_size: {wanted} is not a multiple of train.micro_batch_size x data-parallel "
                f"size = {self.train.micro_batch_size} x {data_parallel_size} = {per_step}; pick a multiple "
                "of it (or a micro batch that divides it)"
            )
        return wanted // per_step

    @property
    def layout(self) -> tuple[int, int]:
        """(data-parallel size, tensor-parallel size): what a checkpoint must match or be converted to."""
        return self.data_parallel_size, self.parallel.tensor_parallel

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all data-parallel ranks."""
        return self.train.micro_batch_size * self.data_parallel_size * self.accumulation_steps(self.data_parallel_size)
