"""The run's Prometheus metrics on the controller's endpoint: the job's (``orchestrator_*``). The nodes'
GPU metrics (``DCGM_FI_*``) are served by their agents (``gpu_endpoint.py``).

:class:`JobMetrics` owns one ``CollectorRegistry``. The controller feeds it
every event it emits (:meth:`on_event`) and the models of the job's GPUs
(:meth:`set_gpu_models`, for MFU), and lends it a view of its ranks (:meth:`watch_ranks`),
read only when the exporter's HTTP thread renders a scrape: per rank up to
``metrics.per_rank_limit`` ranks, per node above it, so that neither the
controller's loop nor a scrape grows with thousands of ranks.
``docs/monitoring.md`` lists every metric with its type, unit and labels.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.events import (
    CheckpointCommitted,
    CheckpointFailed,
    Event,
    FailureDetected,
    RecoveryStarted,
    RunFinished,
    RunStarted,
    Step,
    WorkerStarted,
    WorldShrunk,
)
from orchestrator.monitor.goodput import CAUSES, GoodputTracker
from orchestrator.types import Reason

# Dense peak FLOP/s by a part of NVML's model name, most specific first: (fp32, bf16 and fp16), from
# NVIDIA's data sheets (their "with sparsity" figures halved; fp32 without TF32). MFU is counted against
# the peak of the dtype trained in (train.precision); other devices get no MFU.
PEAK_FLOPS = (
    ("H100 PCIe", 51e12, 756e12),
    ("H100 NVL", 60e12, 835e12),
    ("H100", 67e12, 989e12),
    ("H200", 67e12, 989e12),
    ("A100", 19.5e12, 312e12),
)


def peak_flops(model: str, precision: str) -> float | None:
    """The dense peak FLOP/s of the GPU ``model`` (NVML's name) in ``precision`` (fp32, bf16 or fp16);
    None for a GPU not in :data:`PEAK_FLOPS`."""
    for part, fp32, half in PEAK_FLOPS:
        if part in model:
            return fp32 if precision == "fp32" else half
    return None

_CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800)
# Step-event fields that not every training code (or every step) reports: each series appears with
# its first report, so that a dashboard shows no data rather than a 0 nobody measured.
_REPORTED = {
    "tokens_per_s": ("orchestrator_tokens_per_second", "Global training throughput of the last step."),
    "lr": ("orchestrator_learning_rate", "Learning rate of the last step."),
    "grad_norm": ("orchestrator_grad_norm", "Global gradient norm of the last step."),
    "heldout_loss": ("orchestrator_heldout_loss",
                     "Loss on the held-out bytes at the last evaluation (evaluation.heldout_bytes)."),
}


# Above metrics.per_rank_limit ranks: this many of the slowest ranks keep a series of their own.
SLOWEST_RANKS = 10
_QUANTILES = (0.5, 0.9, 0.99, 1.0)


@dataclass(frozen=True, slots=True)
class RankSample:
    """One rank as the controller sees it now."""

    rank: int
    running: bool
    age_s: float  # since its last progress (a step or checkpoint work)
    step: int
    step_time_s: float | None


class JobMetrics:
    """Everything the endpoint serves for one run."""

    def __init__(self, clock: Any = time.time, prediction: dict[str, Any] | None = None,
                 per_rank_limit: int = 1024) -> None:
        """``prediction``: a scaling prediction for this run (``orchestrator scaling fit``), watched
        against its held-out losses; ``per_rank_limit``: ranks above which rank series become
        per-node ones (``metrics.per_rank_limit``)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._lock = threading.Lock()
        r = self.registry
        self.info = Gauge("orchestrator_run_info", "The run: always 1, its identity in labels.",
                          ["run_id", "world_size", "zero_stage", "tensor_parallel"], registry=r)
        self.loss = Gauge("orchestrator_training_loss", "Training loss of the last step (rank 0's report).", registry=r)
        self.step = Gauge("orchestrator_training_step", "Last completed training step.", registry=r)
        self.step_time = Gauge("orchestrator_step_time_seconds", "Wall time of the last step (rank 0).", registry=r)
        self._reported: dict[str, Gauge] = {}  # by _REPORTED's key, registered on first report
        self.mfu: Gauge | None = None  # registered once a GPU with a known peak reports
        self._rank_nodes: dict[int, str] = {}  # rank -> its node's address, from worker_started
        self.ranks = _RankFamilies(self._rank_nodes, per_rank_limit)
        self.spare_nodes = Gauge("orchestrator_spare_nodes", "Spare nodes available to take a lost node's place.",
                                 registry=r)
        self.spare_nodes_configured = Gauge("orchestrator_spare_nodes_configured",
                                            "Spare nodes the job asked for (cluster.spare_nodes).", registry=r)
        self.restarts = Counter("orchestrator_restarts", "Recoveries, by the root cause's reason.", ["reason"], registry=r)
        self.failures = Counter("orchestrator_failures", "Failures, by the root cause's reason (one per incident).",
                                ["reason"], registry=r)
        self.ckpt_duration = Histogram("orchestrator_checkpoint_duration_seconds",
                                       "Save time of committed checkpoints (slowest rank: blocked + write).",
                                       buckets=_CHECKPOINT_BUCKETS, registry=r)
        self.ckpt_blocked = Histogram("orchestrator_checkpoint_blocked_seconds",
                                      "Training time blocked per committed checkpoint (slowest rank).",
                                      buckets=_CHECKPOINT_BUCKETS, registry=r)
        self.ckpt_bytes = Gauge("orchestrator_checkpoint_bytes", "Size of the last committed checkpoint.", registry=r)
        self.ckpt_step = Gauge("orchestrator_checkpoint_last_step", "Step of the last committed checkpoint.", registry=r)
        self.ckpt_failures = Counter("orchestrator_checkpoint_failures", "Checkpoint saves that failed.", registry=r)
        self.preemptions = Counter("orchestrator_preemptions", "Stops asked by the scheduler (SIGUSR1, SIGTERM): "
                                   "the run ends with a checkpoint, counted apart from failures.", registry=r)
        self.goodput = Gauge("orchestrator_goodput_ratio", "Productive training time / wall time of this launch.",
                             registry=r)
        self.productive = Gauge("orchestrator_productive_seconds", "Step time of steps trained for the first time.",
                                registry=r)
        self.wall = Gauge("orchestrator_wall_seconds", "Wall time since this launch started.", registry=r)
        self.badput = Gauge("orchestrator_badput_seconds", "Wall time not spent on productive steps, by cause.",
                            ["cause"], registry=r)
        # Every known reason has a series from the start, so increase() sees the first restart.
        for reason in get_args(Reason):
            self.restarts.labels(reason=reason)
            self.failures.labels(reason=reason)
        self._peak_flops = 0.0
        self._prediction = prediction
        if prediction is not None:
            self.predicted_final = Gauge("orchestrator_predicted_final_loss",
                                         "The scaling prediction of this run's final held-out loss: its point and "
                                         "interval bounds.", ["bound"], registry=r)
            self.predicted_heldout = Gauge("orchestrator_predicted_heldout_loss",
                                           "The held-out loss predicted at the step of the last evaluation (point and "
                                           "interval bounds), beside orchestrator_heldout_loss.", ["bound"], registry=r)
            low, high = prediction["prediction"]["interval"]
            for bound, value in (("point", prediction["prediction"]["final_loss"]), ("low", low), ("high", high)):
                self.predicted_final.labels(bound=bound).set(value)
        r.register(self.ranks)
        self.goodput.set_function(lambda: self._goodput_report().ratio)
        self.productive.set_function(lambda: self._goodput_report().productive_s)
        self.wall.set_function(lambda: self._goodput_report().wall_s)
        for cause in CAUSES:
            self.badput.labels(cause=cause).set_function(lambda cause=cause: self._goodput_report().badput_s[cause])
        self._goodput = GoodputTracker()
        self._flops_per_step: float | None = None
        self._info: dict[str, str] = {}

    def on_event(self, event: Event) -> None:
        """Update from one event of the run's event log (the controller calls this for each)."""
        with self._lock:
            self._goodput.on_event(event)
        match event:
            case RunStarted():
                parallel = event.config["parallel"]
                self._info = {"run_id": event.run_id, "world_size": str(event.world_size),
                              "zero_stage": str(parallel["zero_stage"]),
                              "tensor_parallel": str(parallel["tensor_parallel"])}
                self.info.labels(**self._info).set(1)
            case WorldShrunk():
                self.info.clear()
                self._info["world_size"] = str(event.world_size)
                self.info.labels(**self._info).set(1)
            case WorkerStarted():
                self._rank_nodes[event.rank] = event.node_ip
            case Step():
                self.step.set(event.step)
                if event.loss is not None:
                    self.loss.set(event.loss)
                self.step_time.set(event.step_time_s)
                for key, (name, documentation) in _REPORTED.items():
                    if (value := getattr(event, key)) is not None:
                        if key not in self._reported:
                            self._reported[key] = Gauge(name, documentation, registry=self.registry)
                        self._reported[key].set(value)
                self._update_mfu(event)
                if self._prediction is not None and event.heldout_loss is not None:
                    self._update_prediction(event.step)
            case CheckpointCommitted():
                self.ckpt_duration.observe(event.seconds)
                self.ckpt_blocked.observe(event.blocked_s)
                self.ckpt_bytes.set(event.bytes)
                self.ckpt_step.set(event.step)
            case CheckpointFailed():
                self.ckpt_failures.inc()
            case RunFinished(status="preempted"):
                self.preemptions.inc()
            case FailureDetected(root_cause=True):
                self.failures.labels(reason=event.reason).inc()
            case RecoveryStarted():
                self.restarts.labels(reason=event.reason).inc()

    def _update_prediction(self, step: int) -> None:
        from orchestrator.scaling.predict import predicted_at

        predicted = predicted_at(self._prediction, step)
        if predicted is not None:
            for bound, value in zip(("point", "low", "high"), predicted):
                self.predicted_heldout.labels(bound=bound).set(value)

    def watch_ranks(self, source: Callable[[], list[RankSample]]) -> None:
        """Read the ranks from ``source`` at each scrape (called on the exporter's thread)."""
        self.ranks.source = source

    def update_spare_nodes(self, available: int, configured: int) -> None:
        """Spare nodes left (lost ones and ones that took a lost node's place are gone) and asked for."""
        self.spare_nodes.set(available)
        self.spare_nodes_configured.set(configured)

    def set_gpu_models(self, models: list[str], precision: str = "fp32") -> None:
        """The models of the GPUs the ranks use (NVML's names) and the dtype trained in: MFU is counted
        against their summed peak in that dtype, and not at all where one has no known peak (or there
        are none)."""
        peaks = [peak_flops(model, precision) for model in models]
        self._peak_flops = sum(peaks) if peaks and all(peaks) else 0.0

    def _goodput_report(self) -> Any:
        with self._lock:
            return self._goodput.report(self._clock())

    def _update_mfu(self, event: Step) -> None:
        peak = self._peak_flops
        if event.flops and peak and event.step_time_s > 0:
            if self.mfu is None:
                self.mfu = Gauge("orchestrator_model_flops_utilization",
                                 "Model FLOPs of the last step / (step time x summed dense peak FLOP/s of "
                                 "the job's GPUs in train.precision); only where every GPU's peak is known.",
                                 registry=self.registry)
            self.mfu.set(event.flops / event.step_time_s / peak)


class _RankFamilies(Collector):
    """The ranks' series, rendered at each scrape from the controller's view of them.

    Up to ``limit`` ranks, one series per rank (``orchestrator_rank_*``). Above it, four per node
    (by address): ranks down, the oldest progress, the lowest step and the slowest step; for the
    job, quantiles of the ranks' step times and the ``SLOWEST_RANKS`` slowest ranks."""

    def __init__(self, nodes: dict[int, str], limit: int) -> None:
        self.source: Callable[[], list[RankSample]] = list
        self._nodes = nodes
        self._limit = limit

    def collect(self) -> Iterator[Metric]:
        samples = self.source()
        if len(samples) <= self._limit:
            yield from self._per_rank(samples)
        else:
            yield from self._per_node(samples)

    def _per_rank(self, samples: list[RankSample]) -> Iterator[Metric]:
        up = GaugeMetricFamily("orchestrator_rank_up", "1 while the rank's training process runs.", labels=["rank"])
        age = GaugeMetricFamily("orchestrator_rank_heartbeat_age_seconds",
                                "Seconds since the rank last reported progress (a step or checkpoint work).",
                                labels=["rank"])
        step = GaugeMetricFamily("orchestrator_rank_step", "Last step the rank reported.", labels=["rank"])
        step_time = GaugeMetricFamily("orchestrator_rank_step_time_seconds", "Wall time of the rank's last step.",
                                      labels=["rank"])
        info = GaugeMetricFamily("orchestrator_rank_info",
                                 "1 for the node each rank runs on (its address): joins the rank's series with its "
                                 "node's GPUs (DCGM_* series carry rank and node).", labels=["rank", "node"])
        for s in samples:
            label = [str(s.rank)]
            up.add_metric(label, 1 if s.running else 0)
            age.add_metric(label, s.age_s)
            step.add_metric(label, s.step)
            if s.step_time_s is not None:
                step_time.add_metric(label, s.step_time_s)
            if s.rank in self._nodes:
                info.add_metric([str(s.rank), self._nodes[s.rank]], 1)
        yield from (up, age, step, step_time, info)

    def _per_node(self, samples: list[RankSample]) -> Iterator[Metric]:
        by_node: dict[str, list[RankSample]] = {}
        for s in samples:
            by_node.setdefault(self._nodes.get(s.rank, ""), []).append(s)
        down = GaugeMetricFamily("orchestrator_node_ranks_down", "The node's ranks whose training process does not run.",
                                 labels=["node"])
        age = GaugeMetricFamily("orchestrator_node_heartbeat_age_seconds",
                                "Seconds since the node's least recent rank last reported progress.", labels=["node"])
        step = GaugeMetricFamily("orchestrator_node_step", "Lowest step a rank of the node reported.", labels=["node"])
        step_time = GaugeMetricFamily("orchestrator_node_step_time_seconds",
                                      "Wall time of the slowest last step among the node's ranks.", labels=["node"])
        for node, group in by_node.items():
            down.add_metric([node], sum(not s.running for s in group))
            age.add_metric([node], max(s.age_s for s in group))
            step.add_metric([node], min(s.step for s in group))
            times = [s.step_time_s for s in group if s.step_time_s is not None]
            if times:
                step_time.add_metric([node], max(times))
        yield from (down, age, step, step_time)
        timed = sorted((s for s in samples if s.step_time_s is not None), key=lambda s: s.step_time_s)
        quantiles = GaugeMetricFamily("orchestrator_rank_step_time_quantile_seconds",
                                      "Quantiles of the ranks' last step times (1: the slowest).", labels=["quantile"])
        slowest = GaugeMetricFamily("orchestrator_slowest_rank_step_time_seconds",
                                    f"Last step time of the {SLOWEST_RANKS} slowest ranks.", labels=["rank", "node"])
        if timed:
            for q in _QUANTILES:
                quantiles.add_metric([f"{q:g}"], timed[min(len(timed) - 1, math.ceil(q * len(timed)) - 1)].step_time_s)
            for s in timed[-SLOWEST_RANKS:]:
                slowest.add_metric([str(s.rank), self._nodes.get(s.rank, "")], s.step_time_s)
        yield from (quantiles, slowest)
